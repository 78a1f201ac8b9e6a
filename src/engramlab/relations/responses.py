"""Per-prompt neuron responses (paper 1 §2.2 "Neuron Output Values"), streamed to disk, resumable.

The response of a unit to a prompt is its output averaged over the prompt's tokens (`response="mean"`, the
paper's choice, BOS included, padding masked) or read at the last token (`response="last"`, engramlab's default:
on small models the mean is dominated by template words, see README "Relation-specific neurons").
Responses are recorded by the hook engine, reduced on the fly, and appended row by row to a float32 matrix on
disk: the process holds one batch of rows at a time, so memory does not grow with the number of prompts (the
reference code pickles every activation, ~25 GB per relation at 7B). AP is then computed over column chunks.

The matrix file carries a small JSON sidecar with the number of finished rows and a fingerprint of the job;
an interrupted pass resumes at the first unfinished batch and ends with the same bytes. Under torchrun each rank
fills its own matrix with the rows of its batches (`find.find`), and resumes it on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel
from engramlab.progress import track
from engramlab.relations.tokens import encode
from engramlab.relations.units import UnitSpace
from engramlab.results import atomic_path

RESPONSE_MODES = ("mean", "last")


class ResponseMatrix:
    """A `[rows, cols]` float32 matrix on disk, filled by row batches, read by column chunks."""

    def __init__(self, path: str | os.PathLike, rows: int, cols: int, fingerprint: str):
        self.path = Path(path)
        self.meta_path = self.path.with_suffix(".json")
        self.rows, self.cols, self.fingerprint = rows, cols, fingerprint
        self.done = self._resumable_rows()
        if self.done == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.truncate(rows * cols * 4)
            self._save_meta()

    def _resumable_rows(self) -> int:
        """Rows an earlier pass of the same job finished; 0 (start over) when the cache is absent, from another
        job, damaged or truncated: it is a cache, so a bad one is rebuilt, not reported."""
        if not (self.meta_path.is_file() and self.path.is_file()):
            return 0
        try:
            meta = json.loads(self.meta_path.read_text())
            done = int(meta["done"])
        except (OSError, ValueError, TypeError, KeyError):
            return 0
        same_job = meta.get("fingerprint") == self.fingerprint and meta.get("shape") == [self.rows, self.cols]
        intact = self.path.stat().st_size == self.rows * self.cols * 4 and 0 <= done <= self.rows
        return done if same_job and intact else 0

    @property
    def complete(self) -> bool:
        return self.done >= self.rows

    def append(self, block: np.ndarray) -> None:
        """Write the next `[n, cols]` rows and record them as done. The rows reach the OS before the sidecar says
        so, which survives a killed process (not a power cut: no fsync per batch, it would dominate the pass)."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        with open(self.path, "r+b") as f:
            f.seek(self.done * self.cols * 4)
            f.write(block.tobytes())
            f.flush()
        self.done += block.shape[0]
        self._save_meta()

    def columns(self, start: int, stop: int, rows: np.ndarray | None = None) -> np.ndarray:
        """A copy of columns [start, stop) (of chosen rows) as `[rows, stop-start]`; the mapping is closed after."""
        if self.rows == 0:  # a torchrun rank without a batch: numpy cannot map an empty file
            return np.zeros((0, stop - start), dtype=np.float32)
        mapped = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.cols))
        try:
            block = mapped[:, start:stop] if rows is None else mapped[rows, start:stop]
            return np.array(block)
        finally:
            del mapped

    def _save_meta(self) -> None:
        # Not `results.write_json`, which writes on rank 0 only: under torchrun every rank keeps its own matrix.
        meta = {"fingerprint": self.fingerprint, "shape": [self.rows, self.cols], "done": self.done}
        with atomic_path(self.meta_path) as tmp:
            tmp.write_text(json.dumps(meta))


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


@torch.inference_mode()
def collect_responses(
    loaded: LoadedModel,
    texts: Sequence[str],
    space: UnitSpace,
    matrix: ResponseMatrix,
    response: str = "mean",
    batch_size: int = 32,
) -> ResponseMatrix:
    """Fill `matrix` with one row of unit responses per text, resuming where it stopped."""
    if response not in RESPONSE_MODES:
        raise EngramError(f"--response {response!r} is not supported; choose one of: {', '.join(RESPONSE_MODES)}.")
    if matrix.rows != len(texts) or matrix.cols != space.size:
        raise ValueError(f"matrix {matrix.rows}x{matrix.cols} does not fit {len(texts)} texts x {space.size} units")
    tokenizer = loaded.require_tokenizer()
    positions = "nonpad" if response == "mean" else "last"
    keys = space.keys()  # (site, layer) pairs: a hybrid model's layers without an MLP have none
    starts = list(range(matrix.done, len(texts), batch_size))
    for start in track(starts, "responses", total=len(starts)):
        batch = encode(tokenizer, texts[start : start + batch_size], loaded.device)
        with loaded.hooks.record(keys, positions=positions, reduce="mean", stop=True) as rec:
            loaded.model(**batch)
        matrix.append(space.flatten(rec).cpu().numpy())  # [B, N]
    return matrix
