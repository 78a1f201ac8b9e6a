"""Readers for the vendored data files that fail with one line naming the file and the line.

Every data file engramlab reads goes through `read_json` or `read_csv` (both on top of `engramlab.readers`). A
missing file, malformed JSON, a CSV row with the wrong number of fields, or a record without a required field
raises `EngramError` with `path:line: what is wrong`, so a user who edits or replaces a data file knows exactly
where to look.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from engramlab import readers
from engramlab.errors import EngramError

VENDOR_DIR = Path(__file__).parent / "vendor"
VENDOR_HINT = "reinstall engramlab or pass an existing file"


def _read_text(path: str | os.PathLike, hint: str = VENDOR_HINT) -> tuple[Path, str]:
    return Path(path), readers.read_text(path, hint)


def read_json(path: str | os.PathLike, hint: str = VENDOR_HINT) -> Any:
    """Parse a JSON file; malformed JSON raises `EngramError` naming the file and line."""
    return readers.read_json(path, hint)


def read_json_records(
    path: str | os.PathLike, key: str, required: tuple[str, ...], hint: str = VENDOR_HINT
) -> list[dict[str, Any]]:
    """Read the list `obj[key]` of a JSON file, checking each record has the `required` string fields.

    Returns the records with an extra `_line` (1-based line where the record starts, None if the text could not be
    walked) for later error messages.
    """
    path, text = _read_text(path, hint)
    obj = read_json(path, hint)
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise EngramError(f"{path}:1: expected a JSON object with a list under {key!r}.")
    lines = _record_lines(text, key, len(obj[key]))
    records = []
    for i, (rec, line) in enumerate(zip(obj[key], lines, strict=True)):
        where = f"{path}:{line}" if line is not None else f"{path}: {key}[{i}]"
        if not isinstance(rec, dict):
            raise EngramError(f"{where}: record is not a JSON object.")
        for field in required:
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                raise EngramError(f"{where}: record lacks a non-empty string field {field!r}.")
        records.append({**rec, "_line": line})
    return records


def _record_lines(text: str, key: str, n: int) -> list[int | None]:
    """The 1-based line where each of the `n` records under the top-level `key` starts. The raw text is walked with
    the JSON decoder itself (keys decoded, escapes and all), so a key written as "sampl\\u0065s" is found too;
    text that cannot be walked gives no line numbers rather than wrong ones."""
    decoder = json.JSONDecoder()

    def skip(pos: int, chars: str = " \t\r\n") -> int:
        while pos < len(text) and text[pos] in chars:
            pos += 1
        return pos

    try:
        pos = skip(0)
        if text[pos] != "{":
            return [None] * n
        pos += 1
        while True:  # top-level members until `key`
            pos = skip(pos, " \t\r\n,")
            name, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)  # past ':'
            if name == key:
                break
            _, pos = decoder.raw_decode(text, pos)
        pos += 1  # past '['
        lines, line, counted = [], 1, 0
        for _ in range(n):
            pos = skip(pos, " \t\r\n,")
            line += text.count("\n", counted, pos)  # incremental, so the walk stays linear
            counted = pos
            lines.append(line)
            _, pos = decoder.raw_decode(text, pos)
        return lines
    except (ValueError, IndexError):
        return [None] * n


def read_csv(path: str | os.PathLike, required: tuple[str, ...], label_column: str | None = None) -> list[dict]:
    """Read a CSV file with a header; each row must have every column and non-empty `required` values.

    `label_column`, if given, must hold 0 or 1 and is converted to int. Rows get `_line` (1-based file line).
    """
    path, text = _read_text(path)
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise EngramError(f"{path}:1: empty CSV file; expected a header with {', '.join(required)}.") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise EngramError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)}.")
    rows = []
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise EngramError(f"{path}:{line}: malformed CSV row ({err}).") from err
        if not fields:
            continue
        if len(fields) != len(header):
            raise EngramError(f"{path}:{line}: CSV row has {len(fields)} fields, the header has {len(header)}.")
        row = dict(zip(header, fields, strict=True))
        for c in required:
            if not row[c].strip():
                raise EngramError(f"{path}:{line}: empty value in column {c!r}.")
        if label_column is not None:
            if row[label_column].strip() not in ("0", "1"):
                raise EngramError(f"{path}:{line}: column {label_column!r} must be 0 or 1, got {row[label_column]!r}.")
            row[label_column] = int(row[label_column])
        row["_line"] = line
        rows.append(row)
    return rows
