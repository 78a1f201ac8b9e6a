"""The truthfulness direction (paper 3, Du et al. 2025, §4.2; spec §B.3, after Marks & Tegmark's "geometry of truth").

- Activations: residual stream leaving layer L (`resid_post`) at the last token of the bare statement (its final
  "."), no few-shot context, left padding. `drop_period=True` reads the statement without its final "." (the
  geometry-of-truth `noperiod` setting: the last token of the object word).
- Direction: difference in means ("MMProbe"), d = mean(acts | true) - mean(acts | false).
- Probe: project on d (activations centred by their own set's mean) and fit a one-dimensional logistic
  regression with intercept (scikit-learn) for the threshold. Generalisation is leave-one-dataset-out.
- Transfer: cosine(d_base, d_post); a direction applied to the other model's activations.
- Intervention: in the few-shot prompt, add v = d (coefficient 1) to `resid_post` of layers `layers` at
  `positions` (`INTERVENTION_POSITIONS`; the paper's are the last statement token before "." and the "." token)
  — subtracted on true statements, added on false ones — and measure PD = P(" TRUE") - P(" FALSE") at the final
  position. With PD averaged over the true and over the false statements (as the paper's
  `interventions.py` does before dividing), NIE_true = (PD_int - PD)/(-1 - PD), NIE_false = (PD_int - PD)/(1 - PD);
  the reported NIE is their mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from engramlab.data.statements import SUFFIX, Statement, truefalse_prompt
from engramlab.distributed import map_batches
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel


@torch.inference_mode()
def statement_acts(
    loaded: LoadedModel, texts: Sequence[str], layers: Sequence[int], batch_size: int = 32, drop_period: bool = False
) -> dict[int, np.ndarray]:
    """resid_post at the last token of each text (without its final "." if `drop_period`): {layer: [n, H]}."""
    tokenizer = loaded.require_tokenizer()
    if drop_period:
        texts = [t.removesuffix(".") for t in texts]

    def run(start: int) -> list[np.ndarray]:
        batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True)
        with loaded.hooks.record("resid_post", list(layers), positions="last", stop=True) as rec:
            loaded.model(**batch.to(loaded.device))
        return [rec["resid_post", layer].float().cpu().numpy() for layer in layers]  # each [B, H]

    # under torchrun each rank runs its share of the batches; the probes are fitted on the gathered activations
    parts = map_batches(range(0, len(texts), batch_size), run)
    return {layer: np.concatenate([p[i] for p in parts]) for i, layer in enumerate(layers)}


def mm_direction(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Difference in means: mean of true minus mean of false."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise EngramError("a truth direction needs both true and false statements.")
    return acts[labels].mean(0) - acts[~labels].mean(0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@dataclass
class Probe:
    """Projection on a direction plus a fitted 1-D logistic threshold."""

    direction: np.ndarray
    model: LogisticRegression

    @classmethod
    def fit(cls, direction: np.ndarray, acts: np.ndarray, labels: np.ndarray) -> Probe:
        proj = ((acts - acts.mean(0)) @ direction)[:, None]
        return cls(direction, LogisticRegression(C=1e6).fit(proj, np.asarray(labels, dtype=int)))

    def accuracy(self, acts: np.ndarray, labels: np.ndarray) -> float:
        proj = ((acts - acts.mean(0)) @ self.direction)[:, None]  # centred by the evaluated set's own mean
        return float((self.model.predict(proj) == np.asarray(labels, dtype=int)).mean())


def leave_one_out(acts_by_set: dict[str, np.ndarray], labels_by_set: dict[str, np.ndarray]) -> dict[str, float]:
    """Train the MM probe on all sets but one (each centred by its own mean), test on the held-out one."""
    results = {}
    for held in acts_by_set:
        train = [s for s in acts_by_set if s != held]
        if not train:
            continue
        acts = np.concatenate([acts_by_set[s] - acts_by_set[s].mean(0) for s in train])
        labels = np.concatenate([labels_by_set[s] for s in train])
        probe = Probe.fit(mm_direction(acts, labels), acts, labels)
        results[held] = probe.accuracy(acts_by_set[held], labels_by_set[held])
    return results


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of " TRUE" and " FALSE" (their first token)."""
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in (" TRUE", " FALSE")]
    if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
        raise EngramError("the tokenizer cannot tell ' TRUE' from ' FALSE' by their first token.")
    return ids[0][0], ids[1][0]


# Where the direction is added in the few-shot prompt: the paper's two positions (geometry-of-truth's default,
# `noperiod = False`), the last token before "." alone (`noperiod = True`), or the final token, where the answer
# is read out (a diagnostic the paper does not run).
INTERVENTION_POSITIONS = ("statement", "object", "last")


def intervention_positions(tokenizer, prompts: list[str], length: int, where: str = "statement") -> torch.Tensor:
    """Bool [B, L] over a left-padded batch: the query statement's last token before its final "." and that "."
    token (`statement`), the first of them alone (`object`), or the prompt's final token (`last`)."""
    if where not in INTERVENTION_POSITIONS:
        raise EngramError(
            f"intervention positions {where!r} are unknown; choose one of: {', '.join(INTERVENTION_POSITIONS)}."
        )
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    if where == "last":
        mask[:, -1] = True
        return mask
    for row, prompt in enumerate(prompts):
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        dot = len(prompt) - len(SUFFIX) - 1  # character index of the statement's final "."
        hit = [i for i, (a, b) in enumerate(offsets) if a <= dot < b]
        if not hit or prompt[dot] != ".":
            raise EngramError(f"cannot find the statement's final '.' in the prompt {prompt[-60:]!r}.")
        pad = length - len(offsets)
        mask[row, pad + hit[0] - 1] = True
        if where == "statement":
            mask[row, pad + hit[0]] = True
    return mask


@torch.inference_mode()
def prob_difference(
    loaded: LoadedModel,
    statements: Sequence[Statement],
    direction: np.ndarray | None = None,
    layers: Sequence[int] = (),
    shots: list[Statement] | None = None,
    batch_size: int = 16,
    positions: str = "statement",
) -> np.ndarray:
    """PD = P(TRUE) - P(FALSE) for each statement's few-shot prompt, optionally with the direction intervention
    at `layers` and `positions` (subtracted on true statements, added on false ones)."""
    tokenizer = loaded.require_tokenizer()
    true_id, false_id = label_token_ids(tokenizer)

    def run(start: int) -> np.ndarray:
        chunk = list(statements[start : start + batch_size])
        prompts = [truefalse_prompt(s, shots) for s in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(loaded.device)
        if direction is None or not layers:
            logits = loaded.model(**batch).logits[:, -1]
        else:
            mask = intervention_positions(tokenizer, prompts, batch["input_ids"].shape[1], positions)
            sign = torch.tensor([-1.0 if s.label else 1.0 for s in chunk])
            vector = torch.as_tensor(direction, dtype=torch.float32)
            with loaded.hooks.add_direction("resid_post", list(layers), vector, coeff=sign, positions=mask):
                logits = loaded.model(**batch).logits[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        return (probs[:, true_id] - probs[:, false_id]).cpu().numpy()

    return np.concatenate(map_batches(range(0, len(statements), batch_size), run))


def nie(pd_base: np.ndarray, pd_int: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Normalised indirect effect of flipping the label (spec §B.3), from PD averaged over the true and over the
    false statements first, as the paper's `interventions.py` does: true statements towards -1, false towards +1.
    (A mean of per-statement ratios would let a statement the model already gets wrong, PD near the target, divide
    by almost zero.)"""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise EngramError("the NIE needs both true and false statements.")
    base_t, base_f = float(pd_base[labels].mean()), float(pd_base[~labels].mean())
    int_t, int_f = float(pd_int[labels].mean()), float(pd_int[~labels].mean())
    t2f = (int_t - base_t) / (-1 - base_t)
    f2t = (int_f - base_f) / (1 - base_f)
    return {
        "nie_true_to_false": t2f,
        "nie_false_to_true": f2t,
        "nie": (t2f + f2t) / 2,
        "pd_true": base_t,
        "pd_false": base_f,
        "pd_true_intervened": int_t,
        "pd_false_intervened": int_f,
    }
