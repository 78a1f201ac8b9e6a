"""`relations find`: rank every FFN unit by how well it picks out one relation's prompts (paper 1 §2.2).

Pipeline, per the paper, with engramlab's documented choices (spec §6):
1. Candidate P_det = select subjects x selection templates (at most `max_prompts` per relation, seeded).
2. Validation: keep the prompts the model answers correctly (greedy two-token prefix match, `accuracy.py`).
   The knowledge gate (`gate.py`) then excludes every relation with too few validated prompts.
3. Responses of every unit on every validated prompt of the kept relations (`responses.py`; mean over tokens or
   last token).
4. Per relation r: positives = r's validated prompts, negatives = 4x as many validated prompts of the other kept
   relations, sampled with `seed` (spec §6.3: validated prompts of other relations). AP of each unit (`ap.py`).
5. Top-k by AP (descending; ties broken by the lower unit id; a NaN AP never ranks). Top only, as the paper
   (spec §6.5).

Default k (`default_k`): the paper's 3,000 of Llama-2-7B's 835,584 FFN neurons is 0.36%; on small models that
leaves a few dozen units and no measurable effect, so engramlab uses min(3000, 2.5% of the units): 3,000 for any
model above 120,000 units (every real LLM), 2.5% below. On the shipped base organism (19,968 units), 5% (k = 999)
also cost random units 0.07-0.08 accuracy, 2.5% (k = 500) 0.04 (README, "Relation-specific neurons").
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.numpy import save_file

from engramlab import distributed
from engramlab.data.facts import Relation
from engramlab.distributed import is_main_process
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel
from engramlab.readers import read_json_object, read_parquet, read_safetensors
from engramlab.relations.accuracy import recall
from engramlab.relations.ap import average_precision
from engramlab.relations.gate import KnowledgeGate, require_two
from engramlab.relations.prompts import PROMPT_COLUMNS, PromptSet, frames_in, identification_prompts
from engramlab.relations.responses import RESPONSE_MODES, ResponseMatrix, collect_responses, fingerprint
from engramlab.relations.units import UNIT_KINDS, UnitSpace, channel_scores
from engramlab.results import atomic_path, write_json, write_parquet

FIND_HINT = "run `relations find` again or give --neurons another find folder"

NEGATIVE_FACTOR = 4  # paper 1 §2.2: negatives = 4 x |P_det|
AP_BLOCK_ELEMENTS = 1 << 21  # matrix entries per column block: the AP sort keeps ~100 bytes per entry (~200 MB)


def default_k(n_units: int) -> int:
    """min(3000, 2.5% of the units): the paper's k on real LLMs, a measurable share on small ones."""
    return int(min(3000, math.ceil(0.025 * n_units)))


@dataclass
class FindResult:
    """AP of every unit for every relation, and what it was computed from."""

    relations: list[str]  # the relations that passed the knowledge gate
    ap: np.ndarray  # [R, N] float32 (NaN only where a unit has no defined AP)
    units: str  # "neurons" | "channels"
    response: str
    n_units: int
    k: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per relation: candidates, validated, negatives
    seconds: float = 0.0
    seed: int = 0  # the negatives' sampling seed (the template control redraws the same negatives)
    selection_templates: list[str] | None = None  # template frames used for selection (None: not recorded)
    heldout_templates: list[str] | None = None  # template frames held out of selection
    excluded: dict[str, dict] = field(default_factory=dict)  # knowledge gate: relation -> reason, counts
    layers: list[int] | None = None  # the layers whose units were scored (`--layers`); None: every layer
    # (candidates, validated) P_det when computed in this process (not saved; `load_identification` reads it back)
    identification: tuple[PromptSet, PromptSet] | None = field(default=None, repr=False, compare=False)

    def top(self, relation: str, k: int | None = None) -> np.ndarray:
        """Unit ids of the top-k units of a relation by AP (descending; ties by lower id). A unit whose AP is NaN
        never ranks, so a relation without scores has no top units."""
        row = self.ap[self.relations.index(relation)]
        finite = np.isfinite(row)
        if not finite.any():
            raise EngramError(f"relation {relation!r} has no AP scores (no validated prompts); it selects no units.")
        order = np.lexsort((np.arange(row.size), -np.where(finite, row, -np.inf)))
        return order[: min(k or self.k, int(finite.sum()))]

    def gated(self, gate: KnowledgeGate) -> FindResult:
        """This result without the relations `gate` excludes (by their counts), or whose AP is undefined for every
        unit (a find folder from before the gate); the exclusions are added to `excluded`."""
        _, excluded = gate.split({n: self.counts[n] for n in self.relations if n in self.counts})
        for r, name in enumerate(self.relations):
            if name not in excluded and not np.isfinite(self.ap[r]).any():
                c = self.counts.get(name, {})
                excluded[name] = {
                    "reason": "no unit has an AP score (no validated identification prompts)",
                    "validated": int(c.get("validated", 0)),
                    "candidates": int(c.get("candidates", 0)),
                }
        if not excluded:
            return self
        keep = [r for r, n in enumerate(self.relations) if n not in excluded]
        return dataclasses.replace(
            self,
            relations=[self.relations[r] for r in keep],
            ap=self.ap[keep],
            counts={n: c for n, c in self.counts.items() if n not in excluded},
            excluded={**self.excluded, **excluded},
        )

    def save(self, out: Path) -> None:
        """Write ap.safetensors and find.json (on rank 0 only under torchrun)."""
        if not is_main_process():
            return
        with atomic_path(out / "ap.safetensors") as tmp:
            save_file(
                {"ap": self.ap},
                str(tmp),
                metadata={"relations": "\n".join(self.relations), "units": self.units, "response": self.response},
            )
        write_json(
            out / "find.json",
            {
                "relations": self.relations,
                "units": self.units,
                "response": self.response,
                "n_units": self.n_units,
                "k": self.k,
                "counts": self.counts,
                "seconds": self.seconds,
                "seed": self.seed,
                "selection_templates": self.selection_templates,
                "heldout_templates": self.heldout_templates,
                "excluded_relations": self.excluded,
                "layers": self.layers,
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> FindResult:
        """Read a `relations find` folder (find.json, ap.safetensors); anything missing, truncated or inconsistent
        is one line naming the file."""
        folder = Path(folder)
        if not folder.is_dir():
            raise EngramError(f"--neurons {folder}: no such folder; give the --out folder of a `relations find` run.")
        meta_path = folder / "find.json"
        if not meta_path.is_file():
            raise EngramError(f"{folder} holds no `relations find` result (find.json and ap.safetensors).")
        meta = read_json_object(
            meta_path,
            {"relations": list, "units": str, "response": str, "n_units": int, "k": int, "counts": dict},
            FIND_HINT,
        )
        relations = meta["relations"]
        if not relations or not all(isinstance(n, str) for n in relations) or len(set(relations)) != len(relations):
            raise EngramError(f"{meta_path}: field 'relations' must list distinct relation names; {FIND_HINT}.")
        if meta["units"] not in UNIT_KINDS or meta["response"] not in RESPONSE_MODES:
            raise EngramError(f"{meta_path}: unknown units {meta['units']!r} or response {meta['response']!r}.")
        if meta["k"] < 1 or meta["n_units"] < 1:
            raise EngramError(f"{meta_path}: 'k' and 'n_units' must be >= 1; {FIND_HINT}.")
        counts = meta["counts"]
        bad = [n for n in relations if not _valid_counts(counts.get(n))]
        if bad:
            raise EngramError(f"{meta_path}: field 'counts' has no valid entry for {bad[0]!r}; {FIND_HINT}.")
        ap = read_safetensors(folder / "ap.safetensors", ("ap",), "numpy", FIND_HINT)[0]["ap"]
        if ap.shape != (len(relations), meta["n_units"]):
            raise EngramError(
                f"{folder / 'ap.safetensors'}: AP matrix is {list(ap.shape)}, find.json says "
                f"{len(relations)} relations x {meta['n_units']} units; {FIND_HINT}."
            )
        excluded = meta.get("excluded_relations") or {}
        layers = meta.get("layers")
        if layers is not None and not (
            isinstance(layers, list) and layers and all(isinstance(x, int) and x >= 0 for x in layers)
        ):
            raise EngramError(f"{meta_path}: field 'layers' must be null or a list of layer numbers; {FIND_HINT}.")
        return cls(
            relations=relations,
            ap=ap,
            units=meta["units"],
            response=meta["response"],
            n_units=meta["n_units"],
            k=meta["k"],
            counts=counts,
            seconds=meta.get("seconds", 0.0),
            seed=meta.get("seed", 0),
            selection_templates=meta.get("selection_templates"),
            heldout_templates=meta.get("heldout_templates"),
            excluded=excluded if isinstance(excluded, dict) else {},
            layers=layers,
        )


def _valid_counts(entry) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(key), int) and entry[key] >= 0 for key in ("candidates", "validated", "negatives")
    )


def find(
    loaded: LoadedModel,
    relations: dict[str, Relation],
    out: Path,
    k: int | None = None,
    response: str = "last",
    units: str = "neurons",
    max_prompts: int | None = 1000,
    seed: int = 0,
    batch_size: int = 32,
    gate: KnowledgeGate | None = None,
    layers: Sequence[int] | None = None,
) -> FindResult:
    """Validate identification prompts, gate the relations (`gate.py`), stream unit responses of the kept
    relations' validated prompts to `out/cache`, score every unit by AP.

    Under torchrun each rank validates and records its share of the batches (`engramlab.distributed`); the AP is
    exact all the same: each column block of the response matrix is gathered, whole, on one rank and scored there.
    """
    start = time.perf_counter()
    gate = gate or KnowledgeGate()
    if units not in UNIT_KINDS:
        UnitSpace(loaded.layout, units)  # raises the clear error
    neuron_space = UnitSpace(loaded.layout, "neurons", layers)
    candidates = identification_prompts(relations, max_prompts, seed)
    validated, checked = validate(loaded, candidates, batch_size)
    names, excluded = gate.split(
        {
            n: {"validated": validated.where(relation=n).size, "candidates": candidates.where(relation=n).size}
            for n in relations
        }
    )
    require_two(names, excluded, loaded.ref)
    write_parquet(
        out / "identification_prompts.parquet",
        {**candidates.rows(), "correct": checked.correct[0].tolist(), "prediction": checked.predictions[0].tolist()},
    )
    validated = validated.subset(np.flatnonzero(np.isin(validated.relation, names)))

    rows_of = [distributed.batch_rows(len(validated), batch_size, r) for r in range(distributed.world_size())]
    mine = rows_of[distributed.rank()]  # this rank's validated prompts: whole batches, in order
    texts = [validated.text[i] for i in mine]
    matrix = ResponseMatrix(
        out / "cache" / _cache_name(),
        len(texts),
        neuron_space.size,
        fingerprint(loaded.ref, texts, response, neuron_space.size, neuron_space.layers),
    )
    collect_responses(loaded, texts, neuron_space, matrix, response, batch_size)

    rows_per_relation, counts = sample_rows(validated, names, candidates, seed)
    ap = score_units(matrix, rows_per_relation, rows_of if distributed.is_running() else None)  # [R, N]
    space_size = neuron_space.size
    if units == "channels":
        ap = channel_scores(neuron_space, UnitSpace(loaded.layout, "channels", layers), ap)
        space_size = ap.shape[1]
    result = FindResult(
        relations=names,
        ap=ap.astype(np.float32),
        units=units,
        response=response,
        n_units=space_size,
        k=k or default_k(space_size),
        counts=counts,
        seconds=round(time.perf_counter() - start, 2),
        seed=seed,
        selection_templates=frames_in(relations, "selection"),
        heldout_templates=frames_in(relations, "heldout"),
        excluded=excluded,
        layers=None if neuron_space.layers is None else list(neuron_space.layers),
    )
    if result.k > space_size:
        raise EngramError(f"--k {result.k} exceeds the model's {space_size} units.")
    result.save(out)
    result.identification = (candidates, validated)
    return result


def _cache_name() -> str:
    """One response matrix per rank (rows of its batches); a resumed run must use the same number of ranks."""
    if distributed.world_size() == 1:
        return "responses.f32"
    return f"responses.rank{distributed.rank()}-of-{distributed.world_size()}.f32"


def validate(loaded: LoadedModel, candidates: PromptSet, batch_size: int) -> tuple[PromptSet, object]:
    """Keep the candidate prompts the model answers correctly (the knowledge gate then judges each relation)."""
    checked = recall(loaded, candidates.text, candidates.gold, batch_size=batch_size, description="validate P_det")
    return candidates.subset(np.flatnonzero(checked.correct[0])), checked


def load_identification(folder: str | Path, relations: list[str] | None = None) -> tuple[PromptSet, PromptSet]:
    """(candidates, validated) P_det of a `relations find` folder, read back from identification_prompts.parquet;
    the validated prompts only of `relations` when given (the relations that passed the knowledge gate)."""
    path = Path(folder) / "identification_prompts.parquet"
    if not path.is_file():
        raise EngramError(f"{folder} holds no identification_prompts.parquet; run `relations find` there first.")
    rows = read_parquet(path, (*PROMPT_COLUMNS, "correct"), FIND_HINT).to_pydict()
    candidates = PromptSet.from_rows(rows, str(path))
    correct = rows["correct"]
    if not all(isinstance(c, bool) for c in correct):
        raise EngramError(f"{path}: column 'correct' must hold true/false values; {FIND_HINT}.")
    keep = np.asarray(correct, dtype=bool)
    if relations is not None:
        keep &= np.isin(candidates.relation, relations)
    return candidates, candidates.subset(np.flatnonzero(keep))


def sample_rows(validated: PromptSet, names: list[str], candidates: PromptSet, seed: int):
    """Per relation: (positive rows, negative rows) of the validated set, and counts for the summary. Negatives
    come from the validated prompts of the other relations in `names`."""
    rng = np.random.default_rng(seed)
    in_study = np.isin(validated.relation, names)
    rows, counts = [], {}
    for name in names:
        pos = validated.where(relation=name)
        others = np.flatnonzero(in_study & (validated.relation != name))
        n_neg = min(NEGATIVE_FACTOR * pos.size, others.size)
        neg = np.sort(rng.choice(others, size=n_neg, replace=False)) if pos.size else np.array([], dtype=np.int64)
        rows.append((pos, neg))
        counts[name] = {
            "candidates": int(candidates.where(relation=name).size),
            "validated": int(pos.size),
            "negatives": int(neg.size),
        }
    return rows, counts


def score_units(
    matrix: ResponseMatrix,
    rows_per_relation: list[tuple[np.ndarray, np.ndarray]],
    rows_of: list[np.ndarray] | None = None,
) -> np.ndarray:
    """AP [R, N] of every unit for every relation, reading the response matrix in column blocks.

    `rows_of[r]`: the rows of the whole matrix that rank r's `matrix` holds (None: one process holding every row).
    Under torchrun the blocks go in rounds of N: in each round block b is gathered whole on rank b mod N, then every
    rank scores its block at the same time; the blocks' AP are summed over the ranks at the end (each block is
    non-zero on its owner only), so every rank ends with the same [R, N].
    """
    n_rows = sum(len(r) for r in rows_of) if rows_of is not None else matrix.rows
    width = max(1, AP_BLOCK_ELEMENTS // max(n_rows, 1))
    starts = list(range(0, matrix.cols, width))
    if rows_of is None:
        ap = np.full((len(rows_per_relation), matrix.cols), np.nan, dtype=np.float64)
        for start in starts:
            stop = min(start + width, matrix.cols)
            ap[:, start:stop] = _block_ap(matrix.columns(start, stop), rows_per_relation)
        return ap
    world = len(rows_of)
    ap = np.zeros((len(rows_per_relation), matrix.cols), dtype=np.float64)
    for first in range(0, len(starts), world):
        owned = None
        for owner, start in enumerate(starts[first : first + world]):
            stop = min(start + width, matrix.cols)
            full = distributed.gather_rows_to(owner, matrix.columns(start, stop), rows_of, n_rows)
            if full is not None:
                owned = (start, stop, full)
        if owned is not None:
            start, stop, full = owned
            ap[:, start:stop] = _block_ap(full, rows_per_relation)
    return distributed.sum_over_ranks(ap)


def _block_ap(columns: np.ndarray, rows_per_relation: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """AP [R, C] of a column block [P, C] of the response matrix (NaN for a relation without prompts)."""
    block = torch.from_numpy(columns)  # [P, C]
    ap = np.full((len(rows_per_relation), columns.shape[1]), np.nan, dtype=np.float64)
    for r, (pos, neg) in enumerate(rows_per_relation):
        if pos.size == 0 or neg.size == 0:
            continue
        index = torch.from_numpy(np.concatenate([pos, neg]))
        labels = torch.cat([torch.ones(pos.size), torch.zeros(neg.size)])
        ap[r] = average_precision(block[index], labels).numpy()
    return ap


def top_units_table(result: FindResult, space: UnitSpace, k: int | None = None) -> pa.Table:
    """Tidy table of each relation's top-k: relation, rank, unit, layer, site, index, ap."""
    parts = []
    for r, name in enumerate(result.relations):
        ids = result.top(name, k)
        layer, site, index = space.locate(ids)
        columns = {
            "relation": [name] * ids.size,
            "rank": np.arange(1, ids.size + 1),
            "unit": ids,
            "layer": layer,
            "site": site.astype(str),
            "index": index,
            "ap": result.ap[r, ids],
        }
        if space.has_experts:  # MoE: which routed expert holds the unit (-1: dense, shared expert or block output)
            columns["expert"] = space.experts_of(ids)
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)


def expert_concentration(result: FindResult, space: UnitSpace, k: int | None = None) -> dict[str, dict]:
    """Per relation, how its top-k units spread over routed experts: how many are expert neurons, in how many
    (layer, expert) pairs, and the share of them in the one expert that holds the most. Empty for a dense model."""
    if not space.has_experts:
        return {}
    out = {}
    for name in result.relations:
        ids = result.top(name, k)
        layer, expert = space.locate(ids)[0], space.experts_of(ids)
        routed = expert >= 0
        pairs, counts = np.unique(np.stack([layer[routed], expert[routed]]), axis=1, return_counts=True)
        entry = {"routed_units": int(routed.sum()), "experts_used": int(counts.size)}
        if counts.size:
            best = int(np.argmax(counts))
            entry["top_expert"] = f"{int(pairs[0, best])}:{int(pairs[1, best])}"  # layer:expert
            entry["top_expert_share"] = round(float(counts[best] / routed.sum()), 4)
        out[name] = entry
    return out
