"""Knowledge locations by activation patching (paper 3 §B.2).

True/false minimal pairs share their last word and differ in the subject ("The city of Paris is in France." vs
"The city of Lyon... is in France." with a false subject), and have the same token length so positions align.
Each is asked in the few-shot "This statement is:" format; the metric is logit(" TRUE") - logit(" FALSE") at the
final position. The residual stream leaving layer l (`resid_post`) at position p of the TRUE run is copied into
the FALSE run, for every (l, p) over the last `n_toks` positions; the mean over pairs is the patching map.

All (l, p) patches of one pair run as one batch: row r patches only its own (l, p) through per-row position
masks, so a map costs about L x n_toks forwards of one prompt, batched. Cross-model patching caches the TRUE
run in one model and patches it into the other (same architecture and tokenizer).

Normalisation (the paper's binned, one-sided rescaling): 20 equal-width bins between the map's min and max; the
lower 10 bins map to 0 and bins 11..20 to 0.1..1.0. Maps are compared by Pearson's r of the normalised maps.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engramlab.data.facts import Relation
from engramlab.data.statements import Statement, truefalse_prompt
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel
from engramlab.progress import track
from engramlab.posttrain.truth import label_token_ids


@dataclass(frozen=True)
class Pair:
    true: Statement
    false: Statement


def pairs_by_last_word(statements: Sequence[Statement], tokenizer, max_pairs: int, seed: int = 0,
                       shots: list[Statement] | None = None) -> list[Pair]:
    """Pair each true statement with a false one that ends in the same word and has the same prompt length."""
    groups: dict[tuple[str, int], dict[bool, list[Statement]]] = defaultdict(lambda: {True: [], False: []})
    for s in statements:
        length = len(tokenizer(truefalse_prompt(s, shots))["input_ids"])
        groups[(s.text.rstrip(".").split()[-1], length)][s.label].append(s)
    rng = random.Random(seed)
    pairs = []
    for key in sorted(groups):
        trues, falses = groups[key][True], groups[key][False]
        rng.shuffle(falses)
        pairs.extend(Pair(t, f) for t, f in zip(trues, falses))
    rng.shuffle(pairs)
    return pairs[:max_pairs]


def fact_pairs(relation: Relation, n: int, seed: int = 0) -> list[Statement]:
    """True fact statements and false twins that keep the object but swap in another subject (same last word)."""
    template = next(t for t in relation.templates if t.frame == "stmt")
    rng = random.Random(f"{seed}:{relation.name}")
    facts = list(relation.facts)
    rng.shuffle(facts)
    out = []
    for fact in facts[:n]:
        other = rng.choice([f for f in relation.facts if f.object != fact.object] or [fact])
        if other.object == fact.object:
            continue
        out.append(Statement(template.render(fact.subject, fact.object), True, relation.name, fact.subject))
        out.append(Statement(template.render(other.subject, fact.object), False, relation.name, other.subject))
    return out


@dataclass
class PatchingMap:
    effect: np.ndarray  # [L, n_toks] mean metric after patching (l, p)
    clean_true: float  # mean metric of the TRUE prompts (source model)
    clean_false: float  # mean metric of the FALSE prompts (target model)
    tokens: list[str]  # labels of the last n_toks positions (first pair's FALSE prompt)

    @property
    def normalised(self) -> np.ndarray:
        return binned_normalise(self.effect)


def binned_normalise(effect: np.ndarray, bins: int = 20) -> np.ndarray:
    """Paper 3's one-sided binned min-max rescaling to {0, 0.1, ..., 1.0}."""
    lo, hi = float(effect.min()), float(effect.max())
    if hi <= lo:
        return np.zeros_like(effect)
    index = np.minimum(((effect - lo) / (hi - lo) * bins).astype(int), bins - 1) + 1  # 1..bins
    return np.where(index <= bins // 2, 0.0, (index - bins // 2) / (bins // 2))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@torch.inference_mode()
def _metric(loaded: LoadedModel, batch) -> torch.Tensor:
    true_id, false_id = label_token_ids(loaded.tokenizer)
    logits = loaded.model(**batch).logits[:, -1].float()
    return logits[:, true_id] - logits[:, false_id]


@torch.inference_mode()
def patching_map(source: LoadedModel, target: LoadedModel, pairs: Sequence[Pair], n_toks: int | None = None,
                 shots: list[Statement] | None = None, batch_size: int = 64, site: str = "resid_post") -> PatchingMap:
    """Mean effect of copying the source model's TRUE-run `site` at (layer, position) into the target's FALSE run."""
    if not pairs:
        raise EngramError("no true/false pairs of equal length to patch; add statements or relax --max-pairs.")
    if source.layout.n_layers != target.layout.n_layers or \
            source.layout.site_width(site) != target.layout.site_width(site):
        raise EngramError("cross-model patching needs two models of the same shape.")
    tok = target.require_tokenizer()
    n_layers = target.layout.n_layers
    encoded = [(tok(truefalse_prompt(p.true, shots), return_tensors="pt"),
                tok(truefalse_prompt(p.false, shots), return_tensors="pt")) for p in pairs]
    query_len = min(len(tok(p.false.text + " This statement is:", add_special_tokens=False)["input_ids"]) for p in pairs)
    n_toks = n_toks or query_len
    total = np.zeros((n_layers, n_toks))
    clean_true, clean_false = [], []
    for true_batch, false_batch in track(encoded, "patching", total=len(encoded)):
        true_batch, false_batch = true_batch.to(source.device), false_batch.to(target.device)
        length = false_batch["input_ids"].shape[1]
        if true_batch["input_ids"].shape[1] != length:
            raise EngramError("a true/false pair has prompts of different token lengths; pairs must align.")
        with source.hooks.record(site, None) as rec:
            clean_true.append(float(_metric(source, true_batch)[0]))
        clean_false.append(float(_metric(target, false_batch)[0]))
        cells = [(layer, length - n_toks + p) for layer in range(n_layers) for p in range(n_toks)]
        effects = []
        for start in range(0, len(cells), batch_size):
            chunk = cells[start : start + batch_size]
            rows = {key: v.repeat(len(chunk), 1) for key, v in false_batch.items()}
            masks = torch.zeros(n_layers, len(chunk), length, dtype=torch.bool)
            for r, (layer, pos) in enumerate(chunk):
                masks[layer, r, pos] = True
            with _patches(target, site, rec, masks):
                effects.append(_metric(target, rows).cpu())
        total += torch.cat(effects).numpy().reshape(n_layers, n_toks)
    labels = tok.convert_ids_to_tokens(encoded[0][1]["input_ids"][0, -n_toks:].tolist())
    return PatchingMap(effect=total / len(encoded), clean_true=float(np.mean(clean_true)),
                       clean_false=float(np.mean(clean_false)), tokens=[str(t) for t in labels])


def _patches(target: LoadedModel, site: str, rec, masks: torch.Tensor):
    """One patch context per layer that any row patches."""
    from contextlib import ExitStack

    stack = ExitStack()
    for layer in range(masks.shape[0]):
        if masks[layer].any():
            stack.enter_context(target.hooks.patch(site, layer, rec[site, layer], positions=masks[layer]))
    return stack
