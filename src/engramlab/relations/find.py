"""`relations find`: rank every FFN unit by how well it picks out one relation's prompts (paper 1 §2.2).

Pipeline, per the paper, with engramlab's documented choices (spec §6):
1. Candidate P_det = select subjects x selection templates (at most `max_prompts` per relation, seeded).
2. Validation: keep the prompts the model answers correctly (greedy two-token prefix match, `accuracy.py`).
3. Responses of every unit on every validated prompt (`responses.py`; mean over tokens or last token).
4. Per relation r: positives = r's validated prompts, negatives = 4x as many validated prompts of the other
   relations, sampled with `seed` (spec §6.3: validated prompts of other relations). AP of each unit (`ap.py`).
5. Top-k by AP (descending; ties broken by the lower unit id). Top only, as the paper (spec §6.5).

Default k (`default_k`): the paper's 3,000 of Llama-2-7B's 835,584 FFN neurons is 0.36%; on small models that
leaves a few dozen units and no measurable effect, so engramlab uses min(3000, 2.5% of the units): 3,000 for any
model above 120,000 units (every real LLM), 2.5% below. On the shipped base organism (19,968 units), 5% (k = 999)
also cost random units 0.07-0.08 accuracy, 2.5% (k = 500) 0.04 (README, "Relation-specific neurons").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.numpy import load_file, save_file

from engramlab import distributed
from engramlab.data.facts import Relation
from engramlab.distributed import is_main_process
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel
from engramlab.relations.accuracy import recall
from engramlab.relations.ap import average_precision
from engramlab.relations.prompts import PromptSet, frames_in, identification_prompts
from engramlab.relations.responses import ResponseMatrix, collect_responses, fingerprint
from engramlab.relations.units import UnitSpace, channel_scores
from engramlab.results import atomic_path, write_json, write_parquet

NEGATIVE_FACTOR = 4  # paper 1 §2.2: negatives = 4 x |P_det|
AP_BLOCK_ELEMENTS = 1 << 21  # matrix entries per column block: the AP sort keeps ~100 bytes per entry (~200 MB)


def default_k(n_units: int) -> int:
    """min(3000, 2.5% of the units): the paper's k on real LLMs, a measurable share on small ones."""
    return int(min(3000, math.ceil(0.025 * n_units)))


@dataclass
class FindResult:
    """AP of every unit for every relation, and what it was computed from."""

    relations: list[str]
    ap: np.ndarray  # [R, N] float32 (NaN for a relation without validated prompts)
    units: str  # "neurons" | "channels"
    response: str
    n_units: int
    k: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per relation: candidates, validated, negatives
    seconds: float = 0.0
    seed: int = 0  # the negatives' sampling seed (the template control redraws the same negatives)
    selection_templates: list[str] | None = None  # template frames used for selection (None: not recorded)
    heldout_templates: list[str] | None = None  # template frames held out of selection
    # (candidates, validated) P_det when computed in this process (not saved; `load_identification` reads it back)
    identification: tuple[PromptSet, PromptSet] | None = field(default=None, repr=False, compare=False)

    def top(self, relation: str, k: int | None = None) -> np.ndarray:
        """Unit ids of the top-k units of a relation by AP (descending; ties by lower id)."""
        row = self.ap[self.relations.index(relation)]
        order = np.lexsort((np.arange(row.size), -np.nan_to_num(row, nan=-1.0)))
        return order[: k or self.k]

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
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> FindResult:
        import json

        folder = Path(folder)
        meta_path = folder / "find.json"
        if not meta_path.is_file() or not (folder / "ap.safetensors").is_file():
            raise EngramError(f"{folder} holds no `relations find` result (find.json and ap.safetensors).")
        meta = json.loads(meta_path.read_text())
        ap = load_file(str(folder / "ap.safetensors"))["ap"]
        return cls(
            relations=meta["relations"],
            ap=ap,
            units=meta["units"],
            response=meta["response"],
            n_units=meta["n_units"],
            k=meta["k"],
            counts=meta["counts"],
            seconds=meta["seconds"],
            seed=meta.get("seed", 0),
            selection_templates=meta.get("selection_templates"),
            heldout_templates=meta.get("heldout_templates"),
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
) -> FindResult:
    """Validate identification prompts, stream unit responses to `out/cache`, score every unit by AP.

    Under torchrun each rank validates and records its share of the batches (`engramlab.distributed`); the AP is
    exact all the same: each column block of the response matrix is gathered, whole, on one rank and scored there.
    """
    start = time.perf_counter()
    neuron_space = UnitSpace(loaded.layout, "neurons")
    candidates = identification_prompts(relations, max_prompts, seed)
    validated, checked = validate(loaded, candidates, batch_size)
    write_parquet(
        out / "identification_prompts.parquet",
        {**candidates.rows(), "correct": checked.correct[0].tolist(), "prediction": checked.predictions[0].tolist()},
    )

    rows_of = [distributed.batch_rows(len(validated), batch_size, r) for r in range(distributed.world_size())]
    mine = rows_of[distributed.rank()]  # this rank's validated prompts: whole batches, in order
    texts = [validated.text[i] for i in mine]
    matrix = ResponseMatrix(
        out / "cache" / _cache_name(),
        len(texts),
        neuron_space.size,
        fingerprint(loaded.ref, texts, response, neuron_space.size),
    )
    collect_responses(loaded, texts, neuron_space, matrix, response, batch_size)

    names = list(relations)
    rows_per_relation, counts = sample_rows(validated, names, candidates, seed)
    ap = score_units(matrix, rows_per_relation, rows_of if distributed.is_running() else None)  # [R, N]
    space_size = neuron_space.size
    if units == "channels":
        ap = channel_scores(neuron_space, UnitSpace(loaded.layout, "channels"), ap)
        space_size = ap.shape[1]
    elif units != "neurons":
        UnitSpace(loaded.layout, units)  # raises the clear error
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
    """Keep the candidate prompts the model answers correctly."""
    checked = recall(loaded, candidates.text, candidates.gold, batch_size=batch_size, description="validate P_det")
    keep = np.flatnonzero(checked.correct[0])
    if keep.size == 0:
        raise EngramError(
            f"{loaded.ref} answers none of the {len(candidates)} identification prompts correctly; "
            "relation neurons need facts the model knows."
        )
    return candidates.subset(keep), checked


def load_identification(folder: str | Path) -> tuple[PromptSet, PromptSet]:
    """(candidates, validated) P_det of a `relations find` folder, read back from identification_prompts.parquet."""
    path = Path(folder) / "identification_prompts.parquet"
    if not path.is_file():
        raise EngramError(f"{folder} holds no identification_prompts.parquet; run `relations find` there first.")
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pydict()
    candidates = PromptSet.from_rows(rows, str(path))
    if "correct" not in rows:
        raise EngramError(f"{path} has no column 'correct'; run `relations find` again.")
    return candidates, candidates.subset(np.flatnonzero(np.asarray(rows["correct"], dtype=bool)))


def sample_rows(validated: PromptSet, names: list[str], candidates: PromptSet, seed: int):
    """Per relation: (positive rows, negative rows) of the validated set, and counts for the summary."""
    rng = np.random.default_rng(seed)
    rows, counts = [], {}
    for name in names:
        pos = validated.where(relation=name)
        others = np.flatnonzero(validated.relation != name)
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
        parts.append(
            pa.table(
                {
                    "relation": [name] * ids.size,
                    "rank": np.arange(1, ids.size + 1),
                    "unit": ids,
                    "layer": layer,
                    "site": site.astype(str),
                    "index": index,
                    "ap": result.ap[r, ids],
                }
            )
        )
    return pa.concat_tables(parts)
