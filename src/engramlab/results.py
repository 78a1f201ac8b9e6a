"""Result files: output folders that never lose what a user had, and atomic writes.

Every study writes into one `--out` folder: tidy parquet tables, `summary.json` and `report.html`. Each file is
written to a temporary name in the same folder and renamed into place, so a crash never leaves half a file, and
a non-empty folder is refused unless the caller passes `overwrite=True`.

Under torchrun every rank ends a study with the same merged results; `write_text`, `write_json` and
`write_parquet` write on rank 0 only and do nothing on the other ranks (`engramlab.distributed`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engramlab.errors import EngramError


def prepare_out_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create `out` (and parents); refuse a non-empty folder unless `overwrite`."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise EngramError(f"--out {path} is a file, not a folder; choose another path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise EngramError(f"--out {path} is not empty; pass --overwrite to replace its results, or pick a new folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EngramError(f"cannot create --out {path}: {err.strerror}.") from err
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on failure delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _writes() -> bool:
    """False on torchrun ranks other than 0: one copy of each result file, written by rank 0."""
    from engramlab.distributed import is_main_process

    return is_main_process()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` atomically (UTF-8); on rank 0 only under torchrun."""
    if not _writes():
        return Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_safe(value: Any) -> Any:
    """Make numpy/torch scalars and non-finite floats JSON-friendly (NaN becomes null)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically; on rank 0 only under torchrun."""
    return write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table | Mapping[str, Sequence] | Sequence[Mapping]) -> Path:
    """Write a tidy table (pyarrow Table, dict of columns or list of row dicts) to parquet atomically; on rank 0
    only under torchrun."""
    if not _writes():
        return Path(path)
    if isinstance(table, Mapping):
        table = pa.table({k: list(v) if not hasattr(v, "__array__") else v for k, v in table.items()})
    elif not isinstance(table, pa.Table):
        table = pa.Table.from_pylist(list(table))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)
