"""Reading files engramlab did not just write, with one-line errors that name the file and what is wrong.

Every file a command reads goes through these helpers: a user's relation file or source-model card, a vendored data
file, and the project's own result folders reused with `--neurons`, `--atlas`, `--source` or `--resume`
(find.json, identification_prompts.parquet, ap.safetensors, checkpoints). A missing, truncated, garbled or
incomplete file raises `EngramError` as `path: problem; what to do`, never a JSONDecodeError, ArrowInvalid,
SafetensorError or KeyError from deep inside a parser.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from engramlab.errors import EngramError, first_line


def _fail(path: Path, problem: str, hint: str) -> EngramError:
    return EngramError(f"{path}: {problem}" + (f"; {hint}" if hint else "") + ".")


def read_text(path: str | os.PathLike, hint: str = "") -> str:
    """A UTF-8 text file; `hint` (what to do) ends every error."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file", hint)
    if not path.is_file():
        raise _fail(path, "is a folder, not a file", hint)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _fail(path, f"not UTF-8 text ({err.reason} at byte {err.start})", hint) from err
    except OSError as err:
        raise _fail(path, f"cannot be read ({err.strerror or err})", hint) from err


def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """A JSON file; malformed JSON names the line and column."""
    text = read_text(path, hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EngramError(
            f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})" + (f"; {hint}" if hint else "") + "."
        ) from err
    except RecursionError as err:  # deeply nested brackets
        raise _fail(Path(path), "JSON nested too deeply", hint) from err


def read_json_object(
    path: str | os.PathLike, fields: Mapping[str, type | tuple[type, ...]], hint: str = ""
) -> dict[str, Any]:
    """A JSON object that must hold each of `fields` with a value of the given type(s)."""
    obj = read_json(path, hint)
    if not isinstance(obj, dict):
        raise _fail(Path(path), f"expected a JSON object, found {type(obj).__name__}", hint)
    check_fields(obj, fields, Path(path), hint)
    return obj


def check_fields(obj: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]], path: Path, hint: str) -> None:
    """Each of `fields` is present in `obj` with the right type (bool never counts as int)."""
    for name, kind in fields.items():
        if name not in obj:
            raise _fail(path, f"has no field {name!r}", hint)
        value = obj[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in kinds)
            raise _fail(path, f"field {name!r} must be {wanted}, found {type(value).__name__}", hint)


def read_parquet(path: str | os.PathLike, columns: Iterable[str] = (), hint: str = ""):
    """A parquet table (pyarrow) that must hold `columns`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "is a folder, not a file", hint)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise _fail(path, f"not a readable parquet file ({first_line(err)})", hint) from err
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise _fail(path, f"has no column {missing[0]!r}", hint)
    return table


def read_safetensors(
    path: str | os.PathLike, keys: Iterable[str] = (), framework: str = "pt", hint: str = ""
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor (`framework` "pt" or "numpy") and the metadata of a safetensors file that must hold `keys`.
    A truncated file, a header that is not safetensors, or a missing key is one line."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file" if not path.exists() else "is a folder, not a file", hint)
    try:
        with safe_open(str(path), framework=framework, device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as err:
        raise _fail(path, f"not a readable safetensors file ({first_line(err)})", hint) from err
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise _fail(path, f"holds no tensor {missing[0]!r}", hint)
    return tensors, meta


def load_failure(err: BaseException) -> str:
    """What went wrong in a torch / transformers load, in one line. torch's refusal of a pickle that holds more than
    tensors ends with advice to retry with `weights_only=False`, which would run the file's code: that advice is
    replaced by what engramlab does instead."""
    if "Weights only load failed" in str(err):
        return (
            "it holds pickled Python objects besides tensors, and engramlab never unpickles those (they can run code)"
        )
    return first_line(err)
