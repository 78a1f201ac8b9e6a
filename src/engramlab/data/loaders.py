"""Readers for the vendored data files that fail with one line naming the file and the line.

Every data file engramlab reads goes through `read_json` or `read_csv`. A missing file, malformed JSON, a CSV row
with the wrong number of fields, or a record without a required field raises `EngramError` with
`path:line: what is wrong`, so a user who edits or replaces a data file knows exactly where to look.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from engramlab.errors import EngramError

VENDOR_DIR = Path(__file__).parent / "vendor"


def _read_text(path: str | os.PathLike) -> tuple[Path, str]:
    path = Path(path)
    if not path.is_file():
        raise EngramError(f"{path}: data file not found; reinstall engramlab or pass an existing file.")
    try:
        return path, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EngramError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}).") from err


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; malformed JSON raises `EngramError` naming the file and line."""
    path, text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EngramError(f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno}).") from err


def read_json_records(path: str | os.PathLike, key: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Read the list `obj[key]` of a JSON file, checking each record has the `required` string fields.

    Returns the records with an extra `_line` (1-based line where the record starts) for later error messages.
    """
    path, text = _read_text(path)
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise EngramError(f"{path}:1: expected a JSON object with a list under {key!r}.")
    # Walk the raw text once to find where each record starts, so errors can name a line.
    decoder = json.JSONDecoder()
    start = text.find("[", text.find(f'"{key}"'))
    pos, lines, line, counted = start + 1, [], 1, 0
    for _ in obj[key]:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)  # incremental, so the walk stays linear
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
    records = []
    for rec, line in zip(obj[key], lines, strict=True):
        if not isinstance(rec, dict):
            raise EngramError(f"{path}:{line}: record is not a JSON object.")
        for field in required:
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                raise EngramError(f"{path}:{line}: record lacks a non-empty string field {field!r}.")
        records.append({**rec, "_line": line})
    return records


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
