"""Knowledge locations by activation patching (paper 3, Du et al. 2025, arXiv 2504.02904, §4.1; spec §B.2).

True/false minimal pairs share their last word and differ in the subject ("The city of Toronto is in Canada." vs
"The city of Chicago is in Canada."), with prompts of equal token length so positions align. The state at
`site` (default `resid_post`, the decoder layer's output) of the clean run at (layer l, position p) is copied
into the corrupted run, for every l and every p over the last `n_toks` positions; the mean metric over pairs is
the patching map. Variants (`VARIANTS`, spec §B.2):

- `truefalse` (the paper's main one): clean = the TRUE statement, corrupted = the FALSE one, each in the few-shot
  "... This statement is:" prompt; metric logit(" TRUE") - logit(" FALSE") at the final position.
- `no_question`: the bare statements cut before their object word (the last word, which the pair shares), no
  few-shot prompt; metric logit(a_true) - logit(a_false), a_true / a_false being the argmax next tokens of the
  clean and the corrupted prompt (ROME-style recall). Pairs whose two argmaxes coincide measure nothing and are
  dropped.
- `noise`: ROME-style corruption of one prompt instead of a pair: Gaussian noise of elementwise std
  `noise_scale` x |embedding| (0.05 in the paper) added to the subject tokens' embeddings (`resid_pre` of layer 0)
  of the query statement; clean states restored one (l, p) at a time. Both statements of every pair are used;
  the metric is logit(" TRUE") - logit(" FALSE") times +1 for a true and -1 for a false statement, so restoring
  the clean run raises it either way.
- `sft` (the paper's `tulu_extracted`, rebuilt for the organisms): TRUE/FALSE statements taken from the chat
  organism's own post-training data (`sft_statements`: sums, opposites, first letters of the harmless SFT
  answers), i.e. knowledge plausibly learned in post-training, asked with 4 shots from the same set.

Positions are pooled as in the paper's tulu analysis into "knowledge" (tokens that differ within the pair; the
noised subject tokens for `noise`), "others" and "last" (the final token).

Cost: all patched (l, p) cells of one pair run as batched rows, each row patching only its own cell through a
per-row position mask. No patch touches the prompt before the first patched position, so that prefix (the
few-shot examples) runs once per pair and every row continues from its KV cache: a row costs n_toks tokens,
not the whole prompt (`benchmarks/patching.py` measures it against plain forwards).

Normalisation (the paper's binned, one-sided rescaling): 20 equal-width bins between the map's min and max; the
lower 10 bins map to 0 and bins 11..20 to 0.1..1.0. Maps are compared by Pearson's r of the normalised maps.
"""

from __future__ import annotations

import copy
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import ttest_1samp

from engramlab.data.chat import harmless_examples
from engramlab.data.facts import Relation
from engramlab.data.statements import SUFFIX, Statement, truefalse_prompt
from engramlab.distributed import map_batches
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel
from engramlab.posttrain.truth import label_token_ids

VARIANTS = ("truefalse", "no_question", "noise", "sft")
GROUPS = ("knowledge", "others", "last")


@dataclass(frozen=True)
class Pair:
    true: Statement
    false: Statement


def no_question_prompt(statement: Statement) -> str:
    """The bare statement cut before its object word (its last word): "The city of Toronto is in"."""
    words = statement.text.split()
    if len(words) < 2:
        raise EngramError(f"statement {statement.text!r} has no word before its object; no_question needs one.")
    return " ".join(words[:-1])


def prompt_for(variant: str, statement: Statement, shots: list[Statement] | None = None) -> str:
    """The prompt a variant asks about `statement`."""
    check_variant(variant)
    return no_question_prompt(statement) if variant == "no_question" else truefalse_prompt(statement, shots)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise EngramError(f"--variant {variant!r} is unknown; choose one of: {', '.join(VARIANTS)}.")
    return variant


def pairs_by_last_word(
    statements: Sequence[Statement],
    tokenizer,
    max_pairs: int,
    seed: int = 0,
    render: Callable[[Statement], str] | None = None,
) -> list[Pair]:
    """Pair each true statement with a false one that ends in the same word and whose prompt (`render`, default
    the few-shot TRUE/FALSE prompt) has the same token length."""
    render = render or truefalse_prompt
    groups: dict[tuple[str, int], dict[bool, list[Statement]]] = defaultdict(lambda: {True: [], False: []})
    for s in statements:
        length = len(tokenizer(render(s))["input_ids"])
        groups[(s.text.rstrip(".").split()[-1], length)][s.label].append(s)
    rng = random.Random(seed)
    pairs = []
    for key in sorted(groups):
        trues, falses = groups[key][True], groups[key][False]
        rng.shuffle(falses)
        pairs.extend(Pair(t, f) for t, f in zip(trues, falses, strict=False))  # the shorter side sets the count
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


_SFT_ANSWER = re.compile(
    r"^(?P<subject>\d+ plus \d+|The opposite of '\w+'|The first letter of '\w+') is "
    r"(?P<object>\S+)\.$"
)


def sft_statements(n: int, seed: int = 0) -> list[Statement]:
    """TRUE/FALSE statements from the chat organism's SFT answers ("20 plus 7 is 27.", "The opposite of 'day' is
    'night'.", "The first letter of 'tiger' is 't'."), each with a false twin that keeps the object and takes the
    subject of another answer of the same kind with another object (the stand-in for paper 3's tulu_extracted)."""
    by_kind: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for example in harmless_examples("train"):
        match = _SFT_ANSWER.match(example.assistant)
        if match:
            subject, obj = match["subject"], match["object"]
            by_kind[subject.split()[1]].append((subject, obj))  # kind: "plus", "opposite" or "first"
    rng = random.Random(f"sft:{seed}")
    out = []
    for kind in sorted(by_kind):
        facts = by_kind[kind]
        for subject, obj in facts[:n]:
            others = [s for s, o in facts if o != obj]
            if not others:
                continue
            out.append(Statement(f"{subject} is {obj}.", True, f"sft_{kind}", subject))
            out.append(Statement(f"{rng.choice(others)} is {obj}.", False, f"sft_{kind}", ""))
    return out


@dataclass
class PatchingMap:
    effect: np.ndarray  # [L, n_toks] mean metric after patching (l, p)
    clean: float  # mean metric of the clean run (source model): what patching restores towards
    corrupted: float  # mean metric of the unpatched corrupted run (target model)
    tokens: list[str]  # labels of the last n_toks positions (first pair's corrupted prompt)
    knowledge: np.ndarray  # bool [n_toks]: positions whose tokens differ within most pairs (noised ones for noise)
    gaps: np.ndarray  # [n_pairs] clean minus corrupted metric of each pair
    variant: str = "truefalse"

    @property
    def normalised(self) -> np.ndarray:
        return binned_normalise(self.effect)

    @property
    def n_pairs(self) -> int:
        return len(self.gaps)

    @property
    def p_value(self) -> float:
        """One-sided paired t-test (scipy) that the clean metric exceeds the corrupted one over pairs: whether the
        model tells the pairs apart at all, without which there is no knowledge for patching to locate."""
        if len(self.gaps) < 2:
            return float("nan")
        return float(ttest_1samp(self.gaps, 0.0, alternative="greater").pvalue)

    def pooled(self, values: np.ndarray | None = None) -> np.ndarray:
        """[L, 3] mean of `values` (default: the normalised map) over the knowledge / other / last positions."""
        return pool(self.normalised if values is None else values, self.knowledge)


def pool(values: np.ndarray, knowledge: np.ndarray) -> np.ndarray:
    """Paper 3's tulu pooling: [L, n_toks] -> [L, 3] means over knowledge positions, other positions and the last
    token (the last token counts only as "last"); an empty group is NaN."""
    knowledge = np.asarray(knowledge, dtype=bool).copy()
    knowledge[-1] = False
    others = ~knowledge
    others[-1] = False
    out = np.full((values.shape[0], 3), np.nan)
    for j, cols in enumerate((knowledge, others)):
        if cols.any():
            out[:, j] = values[:, cols].mean(axis=1)
    out[:, 2] = values[:, -1]
    return out


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


@dataclass
class _Job:
    """One pair, ready to patch: the clean prompt copied from, the corrupted prompt patched, and the metric."""

    clean_ids: torch.Tensor  # [1, T]
    corrupted_ids: torch.Tensor  # [1, T]
    metric: Callable[[torch.Tensor], torch.Tensor]  # last-position logits [R, V] -> [R]
    noise_mask: torch.Tensor | None = None  # bool [1, T]: tokens noised in the corrupted run (noise variant)

    @property
    def knowledge(self) -> torch.Tensor:
        """bool [T]: the positions where the clean and corrupted prompts differ."""
        if self.noise_mask is not None:
            return self.noise_mask[0]
        return self.clean_ids[0] != self.corrupted_ids[0]


def _logit_diff(ids: tuple[int, int], sign: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    a, b = ids
    return lambda logits: sign * (logits[:, a] - logits[:, b])


def _encode(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _repeatable(cache) -> bool:
    """Whether every layer of a transformers cache can be repeated over rows (attention layers can; transformers
    5.24's linear-attention / Mamba cache layers cannot)."""
    layers = getattr(cache, "layers", None)
    return hasattr(cache, "batch_repeat_interleave") and all(
        hasattr(layer, "batch_repeat_interleave") for layer in (layers or [])
    )


@torch.inference_mode()
def _last_logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    return loaded.model(input_ids=ids.to(loaded.device), logits_to_keep=1).logits[:, -1].float()


def _subject_mask(tokenizer, prompt: str, subject: str) -> torch.Tensor:
    """bool [1, T]: the tokens of the last occurrence of `subject` in `prompt` (the query statement's subject)."""
    start = prompt.rfind(subject) if subject else -1
    if start < 0:
        raise EngramError(
            f"the noise variant needs the statement's subject; {subject!r} is not in the prompt {prompt[-60:]!r}."
        )
    end = start + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    mask = torch.tensor([[a < end and b > start for a, b in offsets]])  # [1, T]
    if not mask.any():
        raise EngramError(f"no token of the subject {subject!r} found in {prompt[-60:]!r}.")
    return mask


def _jobs(
    variant: str, source: LoadedModel, target: LoadedModel, pairs: Sequence[Pair], shots: list[Statement] | None
) -> list[_Job]:
    tok = target.require_tokenizer()
    if variant == "noise":
        labels = label_token_ids(tok)
        jobs = []
        for pair in pairs:
            for s in (pair.true, pair.false):
                prompt = truefalse_prompt(s, shots)
                ids = _encode(tok, prompt)
                jobs.append(
                    _Job(ids, ids, _logit_diff(labels, 1.0 if s.label else -1.0), _subject_mask(tok, prompt, s.subject))
                )
        return jobs
    jobs = []
    for pair in pairs:
        clean, corrupted = (_encode(tok, prompt_for(variant, s, shots)) for s in (pair.true, pair.false))
        if clean.shape != corrupted.shape:
            continue  # the pair's prompts do not align token by token
        if variant == "no_question":
            answers = int(_last_logits(source, clean).argmax()), int(_last_logits(target, corrupted).argmax())
            if answers[0] == answers[1]:
                continue  # both prompts predict the same token: the metric is 0 whatever is patched
            jobs.append(_Job(clean, corrupted, _logit_diff(answers)))
        else:
            jobs.append(_Job(clean, corrupted, _logit_diff(label_token_ids(tok))))
    return jobs


@torch.inference_mode()
def patching_map(
    source: LoadedModel,
    target: LoadedModel,
    pairs: Sequence[Pair],
    n_toks: int | None = None,
    shots: list[Statement] | None = None,
    batch_size: int = 64,
    site: str = "resid_post",
    variant: str = "truefalse",
    noise_scale: float = 0.05,
    seed: int = 0,
) -> PatchingMap:
    """Mean effect of copying the source model's clean-run `site` at (layer, position) into the target model's
    corrupted run, for every layer and the last `n_toks` positions (default: the query statement and suffix)."""
    check_variant(variant)
    if not pairs:
        raise EngramError("no true/false pairs of equal length to patch; add statements or raise --max-pairs.")
    if source.layout.n_layers != target.layout.n_layers or source.layout.site_width(site) != target.layout.site_width(
        site
    ):
        raise EngramError("cross-model patching needs two models of the same shape.")
    if variant == "noise" and source is not target:
        raise EngramError("the noise variant restores a model's own clean run; pass the same model twice.")
    if noise_scale <= 0:
        raise EngramError(f"--noise-scale must be positive, got {noise_scale}.")
    tok = target.require_tokenizer()
    jobs = _jobs(variant, source, target, pairs, shots)
    if not jobs:
        raise EngramError(
            f"none of the {len(pairs)} pairs can be patched with variant {variant!r} (prompts of "
            "different token lengths, or no_question pairs whose two prompts predict the same token)."
        )
    if n_toks is None:
        n_toks = min(
            len(tok(prompt_for(variant, p.false, shots), add_special_tokens=False)["input_ids"])
            if variant == "no_question"
            else len(tok(p.false.text + SUFFIX, add_special_tokens=False)["input_ids"])
            for p in pairs
        )
    n_toks = min(n_toks, min(job.corrupted_ids.shape[1] for job in jobs))
    # The noise of every job is drawn up front, in job order, from one seeded stream: each job gets the same noise
    # whichever torchrun rank runs it (the jobs, one per pair, are shared out by `map_batches`).
    generator = torch.Generator().manual_seed(seed)
    width = source.layout.site_width("resid_pre")
    noises = [
        None if job.noise_mask is None else torch.randn((1, job.clean_ids.shape[1], width), generator=generator)
        for job in jobs
    ]
    n_layers = target.layout.n_layers
    total = np.zeros((n_layers, n_toks))
    knowledge = np.zeros(n_toks)
    clean, corrupted = [], []

    def run(j: int) -> tuple[np.ndarray, float, float]:
        return _patch_job(source, target, jobs[j], n_toks, site, batch_size, noise_scale, noises[j])

    for job, (effect, clean_value, corrupted_value) in zip(
        jobs, map_batches(range(len(jobs)), run, f"patching ({variant})"), strict=True
    ):
        total += effect
        clean.append(clean_value)
        corrupted.append(corrupted_value)
        knowledge += job.knowledge[-n_toks:].numpy()
    labels = tok.convert_ids_to_tokens(jobs[0].corrupted_ids[0, -n_toks:].tolist())
    return PatchingMap(
        effect=total / len(jobs),
        clean=float(np.mean(clean)),
        corrupted=float(np.mean(corrupted)),
        tokens=[str(t) for t in labels],
        knowledge=knowledge / len(jobs) >= 0.5,
        gaps=np.array(clean) - np.array(corrupted),
        variant=variant,
    )


def _patch_job(
    source: LoadedModel,
    target: LoadedModel,
    job: _Job,
    n_toks: int,
    site: str,
    batch_size: int,
    noise_scale: float,
    noise: torch.Tensor | None,
) -> tuple[np.ndarray, float, float]:
    """One pair's [L, n_toks] map, the clean metric and the unpatched corrupted metric."""
    n_layers = target.layout.n_layers
    length = job.corrupted_ids.shape[1]
    sites = [site, "resid_pre"] if job.noise_mask is not None else [site]
    with source.hooks.record(sites, None) as rec:
        clean = float(job.metric(_last_logits(source, job.clean_ids))[0])
    patch_from = {layer: rec[site, layer] for layer in range(n_layers)}  # each [1, T, D]
    noisy = None
    if job.noise_mask is not None:  # ROME-style: x + N(0, (scale |x|)^2) on the subject's embeddings
        embeds = rec["resid_pre", 0]  # [1, T, D]: the input of the first layer = the embeddings
        noisy = embeds + noise.to(embeds) * noise_scale * embeds.abs()  # noise: N(0, 1) [1, T, D]

    first = length - n_toks  # first patched position; everything before it is the same in every row
    if job.noise_mask is not None:
        first = min(first, int(job.noise_mask[0].nonzero()[0]))
    ids = job.corrupted_ids.to(target.device)
    cache = None
    if first > 0:
        cache = target.model(input_ids=ids[:, :first], use_cache=True, logits_to_keep=1).cache
        if not _repeatable(cache):  # a hybrid's recurrent cache layers cannot be repeated: run whole sequences
            cache, first = None, 0

    cells: list[tuple[int, int] | None] = [
        (layer, length - n_toks + p) for layer in range(n_layers) for p in range(n_toks)
    ] + [None]  # None: the unpatched corrupted run
    values = []
    for start in range(0, len(cells), batch_size):
        chunk = cells[start : start + batch_size]
        rows = len(chunk)
        masks = torch.zeros(n_layers, rows, length, dtype=torch.bool)  # [L, R, T]: row r patches its own cell
        for r, cell in enumerate(chunk):
            if cell is not None:
                masks[cell[0], r, cell[1]] = True
        kwargs = {}
        if cache is not None:
            rows_cache = copy.deepcopy(cache)  # the forward appends to the cache in place
            rows_cache.batch_repeat_interleave(rows)
            kwargs = {
                "cache": rows_cache,
                "attention_mask": torch.ones(rows, length, dtype=torch.long, device=target.device),
            }
        with ExitStack() as stack:
            if noisy is not None:
                stack.enter_context(target.hooks.patch("resid_pre", 0, noisy, positions=job.noise_mask))
            for layer in range(n_layers):
                if masks[layer].any():
                    stack.enter_context(target.hooks.patch(site, layer, patch_from[layer], positions=masks[layer]))
            logits = target.model(input_ids=ids[:, first:].expand(rows, -1), logits_to_keep=1, **kwargs).logits
        values.append(job.metric(logits[:, -1].float()).cpu())
    values = torch.cat(values)
    return values[:-1].numpy().reshape(n_layers, n_toks), clean, float(values[-1])
