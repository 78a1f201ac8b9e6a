"""What switching relation neurons off does (paper 1 §4-5): deactivation with random controls, the
inter-relation matrix, the k-sweep with the cumulativity test, overlaps, and cross-lingual transfer.

Every analysis is a set of (unit set, prompt) rows sent through `accuracy.recall`, which batches rows with
different unit sets into one `generate` call (per-row masks). Accuracy is always on P_eva, the eval subjects
that neuron selection never saw, split by template: "seen" (selection templates) and "heldout" (templates
never used for selection: the template control engramlab adds to the paper; `--heldout-templates` chooses them,
and with `none` there is no held-out group and the summary says so instead of reporting a number).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from engramlab.data.facts import Relation
from engramlab.models.loading import LoadedModel
from engramlab.relations.accuracy import Recall, recall
from engramlab.relations.find import FindResult
from engramlab.relations.gate import KnowledgeGate
from engramlab.relations.prompts import PromptSet, evaluation_prompts
from engramlab.relations.units import UnitSpace, random_like

TEMPLATE_GROUPS = {"seen": "selection", "heldout": "heldout"}
PAPER_K_VALUES = (10, 50, 200, 500, 1000, 3000, 10000, 20000, 50000)  # paper 1 §5.1


def _acc(rec: Recall, set_index: int, cols: np.ndarray) -> float:
    return float(rec.correct[set_index, cols].mean()) if cols.size else float("nan")


def template_groups(prompts: PromptSet) -> dict[str, str]:
    """The template groups present: "seen", and "heldout" unless no template is held out."""
    return {g: s for g, s in TEMPLATE_GROUPS.items() if g == "seen" or (prompts.split == s).any()}


def _split_cols(prompts: PromptSet, relation: str, groups: dict[str, str]) -> dict[str, np.ndarray]:
    out = {"all": prompts.where(relation=relation)}
    for group, split in groups.items():
        out[group] = prompts.where(relation=relation, split=split)
    return out


def _frames(prompts: PromptSet, split: str) -> list[str]:
    return list(dict.fromkeys(prompts.frame[prompts.split == split].tolist()))


@dataclass
class Deactivation:
    """Accuracy rows (tidy) and the headline numbers of `relations deactivate`."""

    rows: list[dict]
    per_relation: dict[str, dict[str, float]]
    matrix: np.ndarray  # [R target sets, R eval relations] accuracy drop, relative as in paper Fig. 4
    summary: dict


def deactivate(
    loaded: LoadedModel,
    found: FindResult,
    relations: dict[str, Relation],
    space: UnitSpace,
    k: int | None = None,
    n_random: int = 10,
    seed: int = 0,
    eval_subjects: int | None = None,
    batch_size: int = 32,
) -> Deactivation:
    """Paper 1 §4.2: accuracy before / after zeroing each relation's top-k, random-k controls (`n_random`
    seeds, same per-site counts) on the relation itself, and the target set on every other relation."""
    k = k or found.k
    names = found.relations
    prompts = evaluation_prompts(relations, tuple(TEMPLATE_GROUPS.values()), eval_subjects)
    groups = template_groups(prompts)
    targets = {name: found.top(name, k) for name in names}
    baseline = recall(loaded, prompts.text, prompts.gold, batch_size=batch_size, description="P_eva before")
    cross = recall(
        loaded,
        prompts.text,
        prompts.gold,
        space,
        [targets[n] for n in names],
        batch_size,
        description="target sets x all relations",
    )
    rows, per_relation = [], {}
    matrix = np.full((len(names), len(names)), np.nan)  # relative drop (paper Fig. 4)
    abs_matrix = np.full((len(names), len(names)), np.nan)  # absolute drop in accuracy
    for i, name in enumerate(names):
        own = prompts.where(relation=name)
        controls = [random_like(space, targets[name], seed + s) for s in range(n_random)]
        randoms = recall(
            loaded,
            [prompts.text[c] for c in own],
            [prompts.gold[c] for c in own],
            space,
            controls,
            batch_size,
            description=f"random controls: {name}",
        )
        local = prompts.subset(own)
        stats: dict[str, float] = {}
        local_groups = _split_cols(local, name, groups)
        for group, cols in _split_cols(prompts, name, groups).items():
            local_cols = local_groups[group]
            before, after = _acc(baseline, 0, cols), _acc(cross, i, cols)
            rand = np.array([_acc(randoms, s, local_cols) for s in range(n_random)])
            suffix = "" if group == "all" else f"_{group}"
            stats.update(
                {
                    f"acc_before{suffix}": before,
                    f"acc_after_target{suffix}": after,
                    f"acc_after_random_mean{suffix}": float(rand.mean()) if rand.size else float("nan"),
                    f"acc_after_random_std{suffix}": float(rand.std()) if rand.size else float("nan"),
                    f"n_prompts{suffix}": int(cols.size),
                }
            )
            rows.append(
                {
                    "target": name,
                    "condition": "none",
                    "seed": -1,
                    "eval_relation": name,
                    "templates": group,
                    "accuracy": before,
                    "n": int(cols.size),
                }
            )
            rows.append(
                {
                    "target": name,
                    "condition": "target",
                    "seed": -1,
                    "eval_relation": name,
                    "templates": group,
                    "accuracy": after,
                    "n": int(cols.size),
                }
            )
            rows.extend(
                {
                    "target": name,
                    "condition": "random",
                    "seed": seed + s,
                    "eval_relation": name,
                    "templates": group,
                    "accuracy": float(rand[s]),
                    "n": int(cols.size),
                }
                for s in range(n_random)
            )
        per_relation[name] = stats
        for j, other in enumerate(names):
            cols = prompts.where(relation=other)
            before, after = _acc(baseline, 0, cols), _acc(cross, i, cols)
            matrix[i, j] = (before - after) / before if before > 0 else np.nan
            abs_matrix[i, j] = before - after
            if other != name:
                rows.append(
                    {
                        "target": name,
                        "condition": "target",
                        "seed": -1,
                        "eval_relation": other,
                        "templates": "all",
                        "accuracy": after,
                        "n": int(cols.size),
                    }
                )
    summary = _deactivation_summary(per_relation, matrix, abs_matrix, names, k, n_random)
    summary["selection_templates"] = _frames(prompts, "selection")
    summary["heldout_templates"] = _frames(prompts, "heldout")
    if "heldout" not in groups:
        summary["heldout_note"] = (
            "no template is held out (--heldout-templates none): every template was used "
            "for selection, so there is no held-out drop to report."
        )
    return Deactivation(rows=rows, per_relation=per_relation, matrix=matrix, summary=summary)


def _deactivation_summary(per_relation, matrix, abs_matrix, names, k, n_random) -> dict:
    def mean_drop(after_key: str, suffix: str = "") -> float | None:
        drops = [
            s[f"acc_before{suffix}"] - s[f"{after_key}{suffix}"]
            for s in per_relation.values()
            if f"acc_before{suffix}" in s
        ]
        if not drops:
            return None  # the group does not exist (no held-out template)
        return float(np.nanmean(drops)) if np.isfinite(drops).any() else float("nan")

    off_diag = ~np.eye(len(names), dtype=bool)
    return {
        "relations": names,
        "k": k,
        "n_random_seeds": n_random,
        "per_relation": per_relation,
        "mean_drop_target": mean_drop("acc_after_target"),
        "mean_drop_random": mean_drop("acc_after_random_mean"),
        "mean_drop_target_seen_templates": mean_drop("acc_after_target", "_seen"),
        "mean_drop_target_heldout_templates": mean_drop("acc_after_target", "_heldout"),
        "mean_drop_random_heldout_templates": mean_drop("acc_after_random_mean", "_heldout"),
        "mean_drop_offtarget": float(np.nanmean(abs_matrix[off_diag])) if off_diag.any() else float("nan"),
        "mean_relative_drop_offtarget": float(np.nanmean(matrix[off_diag])) if off_diag.any() else float("nan"),
        "mean_relative_drop_target": float(np.nanmean(np.diag(matrix))),
    }


def k_values(n_units: int) -> list[int]:
    """The paper's k values below the model's size, then half and all of it."""
    values = [k for k in PAPER_K_VALUES if k < n_units]
    return sorted({*values, n_units // 2})


@dataclass
class Sweep:
    rows: list[dict]
    cumulativity: list[dict]
    summary: dict


def sweep(
    loaded: LoadedModel,
    found: FindResult,
    relations: dict[str, Relation],
    space: UnitSpace,
    ks: list[int] | None = None,
    seed: int = 0,
    eval_subjects: int | None = None,
    others_per_relation: int = 20,
    batch_size: int = 32,
) -> Sweep:
    """Paper 1 §5.1: accuracy of r and of the other relations vs k, target vs random; and the cumulative-
    effect test: for consecutive (a, b), #total = prompts right with top-a off but wrong with top-b off; zero
    only ranks a..b; #affected = those among #total that turn wrong; cumulativity = 1 - #affected/#total."""
    ks = sorted(ks or k_values(found.n_units))
    names = found.relations
    prompts = evaluation_prompts(relations, tuple(TEMPLATE_GROUPS.values()), eval_subjects)
    rng = np.random.default_rng(seed)
    rows, cumulativity = [], []
    for name in names:
        ranked = found.top(name, max(ks))
        own = prompts.where(relation=name)
        others = (
            np.concatenate(
                [rng.permutation(prompts.where(relation=o))[:others_per_relation] for o in names if o != name]
            )
            if len(names) > 1
            else np.array([], int)
        )
        target_sets = [ranked[:k] for k in ks]
        random_sets = [random_like(space, ranked[:k], seed + i) for i, k in enumerate(ks)]
        diff_sets = [ranked[a:b] for a, b in itertools.pairwise(ks)]
        cols = np.concatenate([own, others])
        sets = [np.array([], dtype=np.int64), *target_sets, *random_sets, *diff_sets]
        rec = recall(
            loaded,
            [prompts.text[c] for c in cols],
            [prompts.gold[c] for c in cols],
            space,
            sets,
            batch_size,
            description=f"k-sweep: {name}",
        )
        own_local, other_local = np.arange(own.size), np.arange(own.size, cols.size)
        n = len(ks)
        for i, k in enumerate(ks):
            for condition, s in (("target", 1 + i), ("random", 1 + n + i)):
                rows.append(
                    {
                        "relation": name,
                        "k": k,
                        "condition": condition,
                        "accuracy": _acc(rec, s, own_local),
                        "accuracy_others": _acc(rec, s, other_local),
                    }
                )
        base = rec.correct[0, own_local]
        rows.append(
            {
                "relation": name,
                "k": 0,
                "condition": "none",
                "accuracy": float(base.mean()),
                "accuracy_others": _acc(rec, 0, other_local),
            }
        )
        for i, (a, b) in enumerate(itertools.pairwise(ks)):
            right_a, right_b = rec.correct[1 + i, own_local], rec.correct[2 + i, own_local]
            total = right_a & ~right_b
            affected = total & ~rec.correct[1 + 2 * n + i, own_local]
            cumulativity.append(
                {
                    "relation": name,
                    "a": a,
                    "b": b,
                    "total": int(total.sum()),
                    "affected": int(affected.sum()),
                    "cumulativity": 1 - affected.sum() / total.sum() if total.sum() else np.nan,
                }
            )
    tot = sum(c["total"] for c in cumulativity)
    summary = {
        "relations": names,
        "k_values": ks,
        "cumulativity_micro": 1 - sum(c["affected"] for c in cumulativity) / tot if tot else None,
        "cumulativity_macro": float(np.nanmean([c["cumulativity"] for c in cumulativity])) if cumulativity else None,
    }
    return Sweep(rows=rows, cumulativity=cumulativity, summary=summary)


def overlap(found: FindResult, k: int | None = None) -> dict:
    """Paper 1 Fig. 2 and §5.2: pairwise intersections and IoU of the top-k sets; versatility = how many
    units belong to the top-k of two or more relations."""
    k = k or found.k
    names = found.relations
    sets = {n: set(found.top(n, k).tolist()) for n in names}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            inter = len(sets[a] & sets[b])
            pairs.append({"a": a, "b": b, "intersection": inter, "iou": inter / len(sets[a] | sets[b])})
    membership: dict[int, int] = {}
    for s in sets.values():
        for unit in s:
            membership[unit] = membership.get(unit, 0) + 1
    counts = np.bincount(list(membership.values()), minlength=len(names) + 1)
    return {
        "k": k,
        "pairs": pairs,
        "versatility": {
            "units_in_any": len(membership),
            "units_shared_by_2_or_more": int(counts[2:].sum()),
            "share_shared": float(counts[2:].sum() / max(len(membership), 1)),
            "histogram": {str(i): int(c) for i, c in enumerate(counts) if i > 0},
        },
        "mean_iou": float(np.mean([p["iou"] for p in pairs])) if pairs else float("nan"),
    }


def multilingual(
    loaded: LoadedModel,
    found: FindResult,
    translated: dict[str, dict[str, Relation]],
    space: UnitSpace,
    k: int | None = None,
    n_random: int = 3,
    seed: int = 0,
    eval_subjects: int | None = None,
    batch_size: int = 32,
    gate: KnowledgeGate | None = None,
) -> tuple[list[dict], dict]:
    """Paper 1 §5.2: English-identified top-k units switched off on prompts in other languages.
    `translated[language][relation]` holds the translated relations (only relations found in English).
    The knowledge gate applies per language: a relation whose prompts in a language the model answers too rarely
    before any deactivation (its 0 -> 0 would read as "no drop") is kept in the rows, marked, and left out of that
    language's means."""
    k = k or found.k
    gate = gate or KnowledgeGate()
    rows = []
    for language, rels in translated.items():
        names = [n for n in rels if n in found.relations]
        prompts = evaluation_prompts({n: rels[n] for n in names}, tuple(TEMPLATE_GROUPS.values()), eval_subjects)
        for name in names:
            cols = prompts.where(relation=name)
            target = found.top(name, k)
            sets = [np.array([], dtype=np.int64), target] + [
                random_like(space, target, seed + s) for s in range(n_random)
            ]
            rec = recall(
                loaded,
                [prompts.text[c] for c in cols],
                [prompts.gold[c] for c in cols],
                space,
                sets,
                batch_size,
                description=f"{language}: {name}",
            )
            local = np.arange(cols.size)
            rand = [_acc(rec, 2 + s, local) for s in range(n_random)]
            rows.append(
                {
                    "language": language,
                    "relation": name,
                    "acc_before": _acc(rec, 0, local),
                    "acc_after_target": _acc(rec, 1, local),
                    "acc_after_random_mean": float(np.mean(rand)) if rand else float("nan"),
                    "n": int(cols.size),
                    "excluded": gate.reason(int(rec.correct[0, local].sum()), int(cols.size)) or "",
                }
            )
    by_language, excluded = {}, {}
    for language in translated:
        sel = [r for r in rows if r["language"] == language and not r["excluded"]]
        gone = {r["relation"]: r["excluded"] for r in rows if r["language"] == language and r["excluded"]}
        if gone:
            excluded[language] = gone
        if sel:
            by_language[language] = {
                "mean_acc_before": float(np.mean([r["acc_before"] for r in sel])),
                "mean_drop_target": float(np.mean([r["acc_before"] - r["acc_after_target"] for r in sel])),
                "mean_drop_random": float(np.mean([r["acc_before"] - r["acc_after_random_mean"] for r in sel])),
            }
    return rows, {"k": k, "languages": by_language, "excluded_by_language": excluded}
