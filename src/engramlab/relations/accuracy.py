"""Factual recall by greedy two-token prefix match (paper 1 §2.1 step 3 and §2.3), with neurons switched off.

A prompt is answered correctly when the greedy continuation of `max_new_tokens` (2 in the paper) tokens matches
the start of the gold object. The paper leaves normalisation open (spec §6.1); engramlab's rule, after
stripping whitespace and lower-casing both sides:

    correct  <=>  prediction is non-empty and (gold starts with prediction, or prediction starts with gold
                  and the next character is not a letter or digit)

The second arm accepts a one-token object followed by punctuation ("paris." for "Paris", not "parisian");
case-insensitivity follows the paper's Table 7 ("Quarterback" accepted for "quarterback").

Deactivation runs many unit sets over many prompts as one stream of rows (set, prompt); each batch carries a
per-row mask, so the target set, its random controls and a k-sweep share batched `generate` calls. Under torchrun
the batches of that stream are shared out among the ranks (`distributed.map_batches`) and gathered back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engramlab.data.facts import prefix_correct
from engramlab.distributed import map_batches
from engramlab.models.loading import LoadedModel
from engramlab.relations.units import UnitSpace


def is_correct(prediction: str, gold: str) -> bool:
    """The recall rule shared with the organisms' evaluation (`engramlab.data.facts.prefix_correct`)."""
    return prefix_correct(prediction, gold)


@dataclass
class Recall:
    """Outcome of a recall run: `correct[s, p]` for unit set s (row 0 of `sets` may be the empty set) and prompt p."""

    correct: np.ndarray  # [n_sets, n_prompts] bool
    predictions: np.ndarray  # [n_sets, n_prompts] object (decoded continuations)

    def accuracy(self, prompt_index: np.ndarray | None = None) -> np.ndarray:
        """Accuracy per set, over all prompts or a subset. [n_sets] float."""
        cols = self.correct if prompt_index is None else self.correct[:, prompt_index]
        return cols.mean(axis=1) if cols.shape[1] else np.full(cols.shape[0], np.nan)


@torch.inference_mode()
def recall(
    loaded: LoadedModel,
    prompts: Sequence[str],
    golds: Sequence[str],
    space: UnitSpace | None = None,
    unit_sets: Sequence[np.ndarray] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 2,
    description: str = "recall",
) -> Recall:
    """Greedy recall of `golds` for every prompt under every unit set (None = no deactivation, one set)."""
    tokenizer = loaded.require_tokenizer()
    sets = list(unit_sets) if unit_sets is not None else [np.array([], dtype=np.int64)]
    n_sets, n_prompts = len(sets), len(prompts)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: less padding
    rows = [(s, int(p)) for s in range(n_sets) for p in order]
    correct = np.zeros((n_sets, n_prompts), dtype=bool)
    predictions = np.empty((n_sets, n_prompts), dtype=object)
    generate = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def run(start: int) -> list[str]:
        chunk = rows[start : start + batch_size]
        batch = tokenizer([prompts[p] for _, p in chunk], return_tensors="pt", padding=True).to(loaded.device)
        chunk_sets = [sets[s] for s, _ in chunk]
        if any(len(ids) for ids in chunk_sets):
            if space is None:
                raise ValueError("unit sets need the UnitSpace they index")
            with loaded.hooks.edit_neurons(space.masks(chunk_sets), "zero"):
                out = loaded.model.generate(**batch, **generate)
        else:
            out = loaded.model.generate(**batch, **generate)
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    starts = range(0, len(rows), batch_size)
    for start, decoded in zip(starts, map_batches(starts, run, description), strict=True):
        for (s, p), text in zip(rows[start : start + batch_size], decoded, strict=True):
            predictions[s, p] = text
            correct[s, p] = is_correct(text, golds[p])
    return Recall(correct=correct, predictions=predictions)
