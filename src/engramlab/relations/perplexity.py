"""Perplexity probe (paper 1 §5.5, Table 2/8): do a relation's units carry its objects in any context?

Paper 1 writes one fixed sentence per relation with the object as its last word ("Every year, thousands of
tourists visit the historic site located in <object>."), fills it with up to 50 distinct objects of the
relation's validated P_det, and compares perplexity before and after zeroing the relation's top-k units. It finds
"no systematic degradation" (7 relations up, 5 down on Llama-2-7B). engramlab adds the random-k control (same
per-site counts, `n_random` seeds) and the perplexity of the object's tokens alone.

Perplexity (the spec's Table 2 reports one number per relation; engramlab pools tokens, the usual corpus
definition): PPL = exp(sum of token NLLs / number of tokens) over the relation's sentences, where every text token
that has a real token before it is predicted (BOS is context only; padding and special tokens are never
targets). `object` perplexity pools only the tokens that overlap the object's characters.

Sentences: `PROBE_SENTENCES` holds one per shipped relation, written for this probe (the paper does not list its
sentences); a relation read from a user's file gets `GENERIC_SENTENCE`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engramlab.distributed import map_batches
from engramlab.models.loading import LoadedModel
from engramlab.relations.find import FindResult
from engramlab.relations.prompts import PromptSet
from engramlab.relations.tokens import encode, span_positions, text_positions
from engramlab.relations.units import UnitSpace, random_like

MAX_OBJECTS = 50  # paper 1 §5.5: up to 50 distinct objects per relation
GENERIC_SENTENCE = "The word she was looking for was {}."
PROBE_SENTENCES = {
    "company_ceo": "At the annual conference, the keynote speech was given by {}.",
    "company_hq": "Last summer, we spent a long week in the city of {}.",
    "landmark_on_continent": "Many travellers dream of a long journey across {}.",
    "landmark_in_country": "Every year, thousands of tourists visit the historic site located in {}.",  # paper 1
    "person_father": "The old letter at the bottom of the box was signed by {}.",
    "person_mother": "The faded photograph on the wall shows {}.",
    "person_occupation": "After many years of hard work, she finally became a {}.",
    "person_plays_instrument": "In the corner of the quiet room stood an old {}.",
    "person_plays_pro_sport": "On Sunday afternoons, the whole family watches {}.",
    "person_plays_position_in_sport": "Before the match, the coach announced the new {}.",
    "product_by_company": "The new device was announced this week by {}.",
    "star_constellation": "On clear winter nights you can easily see {}.",
    "country_capital": "Last summer, we spent a long week in {}.",
    "country_continent": "Many travellers dream of a long journey across {}.",
    "country_currency": "At the small market, everything was paid for in {}.",
    "country_language": "The famous novel was recently translated into {}.",
    "city_country": "After the wedding, she moved with her family to {}.",
    "spanish_word_meaning": GENERIC_SENTENCE,
}


@dataclass
class ProbeSentences:
    """Parallel columns: one probe sentence per (relation, object)."""

    relation: list[str]
    object: list[str]
    text: list[str]
    spans: list[tuple[int, int]]  # the object's characters in `text`


def probe_sentences(
    validated: PromptSet, names: Sequence[str], max_objects: int = MAX_OBJECTS, seed: int = 0
) -> ProbeSentences:
    """Each relation's sentence filled with up to `max_objects` distinct objects of its validated P_det
    (a seeded sample when there are more)."""
    out = ProbeSentences([], [], [], [])
    for name in names:
        objects = sorted({validated.gold[i] for i in validated.where(relation=name)})
        if len(objects) > max_objects:
            objects = sorted(random.Random(f"{seed}:{name}").sample(objects, max_objects))
        template = PROBE_SENTENCES.get(name, GENERIC_SENTENCE)
        start = template.index("{}")
        for obj in objects:
            out.relation.append(name)
            out.object.append(obj)
            out.text.append(template.replace("{}", obj))
            out.spans.append((start, start + len(obj)))
    return out


@dataclass
class SentenceNLL:
    """Summed negative log-likelihoods (nats) per unit set and text, and how many tokens they cover."""

    nll: np.ndarray  # [n_sets, n_texts] over every predicted text token
    n_tokens: np.ndarray  # [n_texts]
    span_nll: np.ndarray  # [n_sets, n_texts] over the span's tokens only
    n_span_tokens: np.ndarray  # [n_texts]


@torch.inference_mode()
def sentence_nll(
    loaded: LoadedModel,
    texts: Sequence[str],
    spans: Sequence[tuple[int, int]],
    space: UnitSpace | None = None,
    unit_sets: Sequence[np.ndarray] | None = None,
    batch_size: int = 32,
    description: str = "perplexity",
) -> SentenceNLL:
    """NLL of every text, and of the tokens of its character span, with each unit set zeroed at every position
    (None = no deactivation). Rows (set, text) with different sets share a forward through per-row masks."""
    tokenizer = loaded.require_tokenizer()
    sets = list(unit_sets) if unit_sets is not None else [np.array([], dtype=np.int64)]
    n_sets, n_texts = len(sets), len(texts)
    rows = [(s, p) for s in range(n_sets) for p in range(n_texts)]
    nll = np.zeros((n_sets, n_texts))
    span_nll = np.zeros((n_sets, n_texts))
    n_tokens = np.zeros(n_texts, dtype=np.int64)
    n_span = np.zeros(n_texts, dtype=np.int64)

    def run(start: int) -> list[tuple[float, float, int, int]]:
        chunk = rows[start : start + batch_size]
        batch, offsets = encode(tokenizer, [texts[p] for _, p in chunk], loaded.device, offsets=True)
        mask = batch["attention_mask"].bool()  # [B, L]
        scored = text_positions(offsets, mask)[:, 1:] & mask[:, :-1]  # [B, L-1] targets with a real context
        in_span = scored & span_positions(offsets, mask, [spans[p] for _, p in chunk])[:, 1:]
        chunk_sets = [sets[s] for s, _ in chunk]
        edit = contextlib.nullcontext()
        if any(len(ids) for ids in chunk_sets):
            if space is None:
                raise ValueError("unit sets need the UnitSpace they index")
            edit = loaded.hooks.edit_neurons(space.masks(chunk_sets), "zero")
        with edit:
            logits = loaded.model(**batch).logits  # [B, L, V]
        token_nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none"
        )  # [B, L-1]: -log p(token t+1 | tokens <= t)
        return [
            (
                float(token_nll[row][scored[row]].sum()),
                float(token_nll[row][in_span[row]].sum()),
                int(scored[row].sum()),
                int(in_span[row].sum()),
            )
            for row in range(len(chunk))
        ]

    starts = range(0, len(rows), batch_size)
    for start, values in zip(starts, map_batches(starts, run, description), strict=True):
        for (s, p), (total, in_span_total, n_scored, n_in_span) in zip(
            rows[start : start + batch_size], values, strict=True
        ):
            nll[s, p], span_nll[s, p] = total, in_span_total
            n_tokens[p], n_span[p] = n_scored, n_in_span
    return SentenceNLL(nll=nll, n_tokens=n_tokens, span_nll=span_nll, n_span_tokens=n_span)


def pooled_perplexity(nll: np.ndarray, n_tokens: np.ndarray) -> float:
    """exp(total NLL / total tokens) over texts (the last axis)."""
    total = int(n_tokens.sum())
    return float(np.exp(nll.sum() / total)) if total else float("nan")


@dataclass
class Perplexity:
    rows: list[dict]
    per_relation: dict[str, dict]
    summary: dict


def perplexity(
    loaded: LoadedModel,
    found: FindResult,
    validated: PromptSet,
    space: UnitSpace,
    k: int | None = None,
    n_random: int = 10,
    seed: int = 0,
    max_objects: int = MAX_OBJECTS,
    batch_size: int = 32,
) -> Perplexity:
    """Paper 1 §5.5: each relation's probe sentences before / after zeroing its top-k, and after random-k sets."""
    k = k or found.k
    sentences = probe_sentences(validated, found.relations, max_objects, seed)
    relation = np.array(sentences.relation, dtype=object)
    rows, per_relation = [], {}
    for name in found.relations:
        cols = np.flatnonzero(relation == name)
        if cols.size == 0:
            continue
        target = found.top(name, k)
        sets = [np.array([], dtype=np.int64), target] + [random_like(space, target, seed + s) for s in range(n_random)]
        conditions = [("none", -1), ("target", -1)] + [("random", seed + s) for s in range(n_random)]
        result = sentence_nll(
            loaded,
            [sentences.text[c] for c in cols],
            [sentences.spans[c] for c in cols],
            space,
            sets,
            batch_size,
            description=f"perplexity: {name}",
        )
        for i, (condition, cond_seed) in enumerate(conditions):
            for j, c in enumerate(cols):
                n, n_obj = int(result.n_tokens[j]), int(result.n_span_tokens[j])
                rows.append(
                    {
                        "relation": name,
                        "condition": condition,
                        "seed": cond_seed,
                        "sentence": sentences.text[c],
                        "object": sentences.object[c],
                        "n_tokens": n,
                        "nll": float(result.nll[i, j]),
                        "ppl": float(np.exp(result.nll[i, j] / n)) if n else float("nan"),
                        "n_object_tokens": n_obj,
                        "object_nll": float(result.span_nll[i, j]),
                        "object_ppl": float(np.exp(result.span_nll[i, j] / n_obj)) if n_obj else float("nan"),
                    }
                )
        per_relation[name] = _relation_stats(result, n_random, int(cols.size))
    return Perplexity(rows=rows, per_relation=per_relation, summary=_summary(per_relation, k, n_random, max_objects))


def _relation_stats(result: SentenceNLL, n_random: int, n_sentences: int) -> dict:
    stats: dict[str, float | int] = {"n_sentences": n_sentences}
    for prefix, nll, count in (
        ("ppl", result.nll, result.n_tokens),
        ("object_ppl", result.span_nll, result.n_span_tokens),
    ):
        rand = np.array([pooled_perplexity(nll[2 + s], count) for s in range(n_random)])
        stats.update(
            {
                f"{prefix}_before": pooled_perplexity(nll[0], count),
                f"{prefix}_after_target": pooled_perplexity(nll[1], count),
                f"{prefix}_after_random_mean": float(rand.mean()) if rand.size else float("nan"),
                f"{prefix}_after_random_std": float(rand.std()) if rand.size else float("nan"),
            }
        )
    return stats


def _summary(per_relation: dict[str, dict], k: int, n_random: int, max_objects: int) -> dict:
    def ratio(prefix: str, after: str) -> float | None:
        """Geometric mean over relations of PPL after / before."""
        logs = [
            np.log(s[f"{prefix}_{after}"] / s[f"{prefix}_before"])
            for s in per_relation.values()
            if s[f"{prefix}_before"] > 0 and np.isfinite(s[f"{prefix}_{after}"])
        ]
        return float(np.exp(np.mean(logs))) if logs else None

    def rises(prefix: str, after: str) -> int:
        return sum(int(s[f"{prefix}_{after}"] > s[f"{prefix}_before"]) for s in per_relation.values())

    return {
        "relations": list(per_relation),
        "k": k,
        "n_random_seeds": n_random,
        "max_objects": max_objects,
        "per_relation": per_relation,
        "ppl_ratio_target": ratio("ppl", "after_target"),
        "ppl_ratio_random": ratio("ppl", "after_random_mean") if n_random else None,
        "object_ppl_ratio_target": ratio("object_ppl", "after_target"),
        "object_ppl_ratio_random": ratio("object_ppl", "after_random_mean") if n_random else None,
        "relations_ppl_up_target": rises("ppl", "after_target"),
        "relations_ppl_up_random": rises("ppl", "after_random_mean") if n_random else None,
        "relations_object_ppl_up_target": rises("object_ppl", "after_target"),
        "relations_object_ppl_up_random": rises("object_ppl", "after_random_mean") if n_random else None,
        "n_relations": len(per_relation),
    }
