"""Result files: output folders that never lose what a user had, and atomic writes.

Every study writes into one `--out` folder: tidy parquet tables, `summary.json` and `report.html`. Each file is
written to a temporary name in the same folder and renamed into place, so a crash never leaves half a file, and
a non-empty folder is refused unless the caller passes `overwrite=True`. Written files get the mode a plain
`open()` would give them (0666 less the user's umask), not the 0600 of a temporary file.

A command that can `--resume` writes a marker, `.engramlab-run.json`, with its name and options when it starts a
folder; `--resume` continues only a folder whose marker names the same command and options, so it never writes
over files it did not write.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engramlab.errors import EngramError

RUN_MARKER = ".engramlab-run.json"


def check_out_dir(out: str | os.PathLike, overwrite: bool = False, run: RunMarker | None = None) -> Path:
    """Every check of `prepare_out_dir` that needs no write: call it before long work so that a bad --out fails
    first. With `run.resume`, a non-empty folder must hold `run`'s marker (same command and options)."""
    path = Path(out)
    if str(out).strip() == "":
        raise EngramError("--out is empty; give a folder path.")
    if path.exists() and not path.is_dir():
        raise EngramError(f"--out {path} is a file, not a folder; choose another path.")
    if path.is_dir():
        contents = [p for p in path.iterdir() if p.name != RUN_MARKER]
        marker = path / RUN_MARKER
        if run is not None and run.resume and contents:
            run.check_same(path)
        elif contents and not overwrite:
            resumable = run is not None and marker.is_file()
            hint = "pass --resume to continue it, --overwrite" if resumable else "pass --overwrite"
            raise EngramError(f"--out {path} is not empty; {hint} to replace its results, or pick a new folder.")
        if not _writable(path):
            raise EngramError(f"--out {path} is not writable; choose a folder you can write to.")
    else:
        _check_parent(path, "create")
    return path


def prepare_out_dir(out: str | os.PathLike, overwrite: bool = False, run: RunMarker | None = None) -> Path:
    """Create `out` (and parents); refuse a file, an unwritable path and a non-empty folder unless `overwrite`.
    With `run`, write its marker (a new or replaced run) or check it (`run.resume` on a started folder)."""
    path = check_out_dir(out, overwrite, run)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EngramError(f"cannot create --out {path}: {err.strerror}.") from err
    if run is not None and not (run.resume and any(p.name != RUN_MARKER for p in path.iterdir())):
        write_json(path / RUN_MARKER, {"command": run.command, "options": run.options})
    return path


def check_out_file(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """An --out that names one file: not a folder, not an existing file unless `overwrite`, in a folder that can
    be created and written."""
    path = Path(out)
    if str(out).strip() == "":
        raise EngramError("--out is empty; give a file path.")
    if path.is_dir():
        raise EngramError(f"--out {path} is a folder; give a file path (e.g. {path / 'hits.parquet'}).")
    if path.exists() and not overwrite:
        raise EngramError(f"--out {path} exists; pass --overwrite to replace it, or give a new file name.")
    _check_parent(path, "write")
    return path


def _check_parent(path: Path, action: str) -> None:
    """A path that does not exist yet can be made: its nearest existing ancestor is a folder this process can write
    in (`action` names what would be refused: create a folder, write a file)."""
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise EngramError(f"--out {path}: {parent} is a file, not a folder; choose another path.")
    if not _writable(parent):
        raise EngramError(f"cannot {action} --out {path}: {parent} is not writable.")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder`, found by creating (and removing) an empty temporary folder there:
    `os.access` says yes to root on any mode and cannot see every filesystem's refusal."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".engramlab-probe-", dir=folder))
    except OSError:
        return False
    return True


def _existing_parent(path: Path) -> Path:
    """The nearest ancestor of `path` that exists (a folder to create `path` in, or a file in the way)."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


@dataclass(frozen=True)
class RunMarker:
    """What a resumable command writes into its --out folder when it starts: its name and the options that decide
    its results (not --device, --overwrite or --resume)."""

    command: str  # e.g. "relations find"
    options: dict[str, Any]
    resume: bool = False

    def check_same(self, folder: Path) -> None:
        """Refuse to resume `folder` unless it was started by this command with these options."""
        from engramlab.readers import read_json

        path = folder / RUN_MARKER
        if not path.is_file():
            raise EngramError(
                f"--resume: --out {folder} was not started by `engramlab {self.command}` (no {RUN_MARKER}); "
                "resume only continues a run of the same command, so pick a new folder or pass --overwrite."
            )
        saved = read_json(path)
        if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
            raise EngramError(f"{path}: not a run marker (expected 'command' and 'options'); pick a new folder.")
        if saved.get("command") != self.command:
            raise EngramError(
                f"--resume: --out {folder} holds a run of `engramlab {saved.get('command')}`, not "
                f"`engramlab {self.command}`; pick a new folder or pass --overwrite."
            )
        mine = _json_safe(self.options)
        changed = [k for k in sorted(mine.keys() | saved["options"].keys()) if mine.get(k) != saved["options"].get(k)]
        if changed:
            key = changed[0]
            raise EngramError(
                f"--resume: --out {folder} was started with --{key.replace('_', '-')} "
                f"{saved['options'].get(key)!r}, not {mine.get(key)!r}; resume with the same options or pick a new "
                "folder."
            )


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success give it the umask's mode and rename it onto `path`, on
    failure (an interrupt included) delete it. A path that cannot be written raises one line naming it."""
    target = Path(path)
    if target.is_dir():
        raise EngramError(f"{target} is a folder; give a file path to write.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise EngramError(f"cannot write {target}: {err.strerror or err}.") from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask. Read from /proc where Linux offers it; elsewhere by setting and restoring it (the only
    portable way, which is why it is not the first choice: it briefly changes the umask of every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
