"""Search an atlas for the neurons that promote a token: Davies 2025 §A.2.5 ("rediscover the 'dog' and
'California' neurons by searching the decoded table").

A filter + sort over `atlas.parquet` with pyarrow's dataset/compute engine, never a Python scan of the rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from engramlab.decode.atlas import ATLAS_FILE
from engramlab.errors import EngramError, first_line


def atlas_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / ATLAS_FILE if path.is_dir() else path
    if not file.is_file():
        raise EngramError(f"--atlas {path}: no {ATLAS_FILE} there; write one with `engramlab decode atlas --out DIR`.")
    return file


def search_atlas(
    atlas: str | os.PathLike,
    token: str | None = None,
    word: str | None = None,
    token_id: int | None = None,
    max_rank: int | None = None,
    layers: list[int] | None = None,
    limit: int | None = None,
) -> pa.Table:
    """Rows of the atlas whose token matches, ranked by score (desc), with each neuron's top-1 token alongside.

    token: exact token string (`" dog"` with its leading space); word: the same word whatever the case and
    surrounding whitespace (`dog` finds " dog", "Dog", "DOG "); token_id: the id. max_rank: keep only ranks
    0..max_rank-1 (1 = neurons whose top token it is). Exactly one of token / word / token_id.
    """
    given = [name for name, v in (("--token", token), ("--word", word), ("--token-id", token_id)) if v is not None]
    if len(given) != 1:
        raise EngramError(
            "give exactly one of --token, --word or --token-id" + (f" (got {', '.join(given)})." if given else ".")
        )
    if max_rank is not None and max_rank < 1:
        raise EngramError(f"--max-rank must be at least 1, got {max_rank}.")
    if limit is not None and limit < 1:
        raise EngramError(f"--limit must be at least 1, got {limit}.")
    file = atlas_file(atlas)
    try:
        dataset = ds.dataset(file, format="parquet")
    except (OSError, pa.ArrowInvalid) as err:
        raise EngramError(f"cannot read {file}: {first_line(err)}") from err
    names = set(dataset.schema.names)
    if not {"layer", "neuron", "rank", "token_id", "token", "score"} <= names:
        raise EngramError(f"{file} is not an atlas (columns: {', '.join(sorted(names))}).")

    token_field = pc.field("token").cast(pa.string())
    if token is not None:
        where = token_field == token
    elif word is not None:
        if not word.strip():
            raise EngramError("--word is empty; give a word such as --word dog.")
        where = pc.utf8_lower(pc.utf8_trim_whitespace(token_field)) == word.strip().lower()
    else:
        where = pc.field("token_id") == int(token_id)
    if max_rank is not None:
        where = where & (pc.field("rank") < max_rank)
    if layers:
        where = where & pc.field("layer").isin(list(layers))
    hits = dataset.to_table(filter=where)
    hits = hits.set_column(hits.schema.get_field_index("token"), "token", hits["token"].cast(pa.string()))
    hits = hits.sort_by([("score", "descending"), ("layer", "ascending"), ("neuron", "ascending")])
    if limit is not None:
        hits = hits.slice(0, limit)
    if hits.num_rows == 0:
        return hits.append_column("top_token", pa.array([], pa.string()))
    # each hit's neuron's top-1 token, for context (a join on the rank-0 rows of the hit neurons only)
    pairs = pc.add(pc.multiply(hits["layer"].cast(pa.int64()), 1 << 32), hits["neuron"].cast(pa.int64()))
    top = dataset.to_table(
        columns=["layer", "neuron", "token"],
        filter=(pc.field("rank") == 0) & pc.field("layer").isin(pc.unique(hits["layer"])),
    )
    top_key = pc.add(pc.multiply(top["layer"].cast(pa.int64()), 1 << 32), top["neuron"].cast(pa.int64()))
    index = pc.index_in(pairs, value_set=top_key)
    top_tokens = pc.take(top["token"].cast(pa.string()), index)
    return hits.append_column("top_token", top_tokens)
