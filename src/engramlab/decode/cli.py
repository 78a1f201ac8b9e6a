"""`engramlab decode ...`: the neuron atlas, search, base-vs-chat comparison and clamp steering (Davies 2025).

A thin typer layer: every command loads, calls one library function, writes and prints. Heavy imports stay
inside the commands so `engramlab --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engramlab.cli_options import (
    DEFAULT_MODEL,
    Device,
    Download,
    Dtype,
    Layers,
    MaxMemory,
    Model,
    OffloadFolder,
    Out,
    Overwrite,
    Seed,
    TrustRemoteCode,
    layer_ranges,
)

app = typer.Typer(help="Decoding MLP neurons through the LM head (Davies 2025).", no_args_is_help=True)

Site = Annotated[
    str,
    typer.Option(
        "--site",
        help="up (rows of up_proj, the paper's), gate, or down (columns of down_proj: what the neuron writes).",
    ),
]
TopK = Annotated[int, typer.Option("--top-k", min=1, help="Tokens kept per neuron.")]
FoldNorm = Annotated[
    bool,
    typer.Option(
        "--fold-norm", help="Decode lm_head(final_norm(w)) instead of W_U·w; also reports how many top-1 tokens change."
    ),
]
ChunkSize = Annotated[
    int | None, typer.Option("--chunk-size", min=1, help="Neurons per GEMM (default: from free memory).")
]


def _console():
    from rich.console import Console

    return Console(soft_wrap=True)  # long paths stay on one line


def _load(
    ref: str,
    device: str,
    dtype: str,
    trust_remote_code: bool = False,
    download: bool = False,
    with_tokenizer: bool = True,
    option: str = "--model",
    max_memory: str | None = None,
    offload_folder: Path | None = None,
):
    from engramlab.models.loading import load_model, parse_max_memory

    return load_model(
        ref,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_download=download,
        with_tokenizer=with_tokenizer,
        option=option,
        max_memory=parse_max_memory(max_memory),
        offload_folder=offload_folder,
    )


def _check_site(site: str) -> None:
    from engramlab.decode.atlas import DECODE_SITES
    from engramlab.errors import EngramError

    if site not in DECODE_SITES:
        raise EngramError(f"--site {site!r} is not a decode site; choose one of: {', '.join(DECODE_SITES)}.")


@app.command("atlas")
def atlas_cmd(
    out: Out,
    model: Model = DEFAULT_MODEL,
    site: Site = "up",
    top_k: TopK = 10,
    fold_norm: FoldNorm = False,
    softmax: bool = typer.Option(False, "--softmax", help="Add each token's probability over the whole vocabulary."),
    chunk_size: ChunkSize = None,
    layers: Layers = None,
    html: bool = typer.Option(True, "--html/--no-html", help="Also write the atlas.html explorer."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    trust_remote_code: TrustRemoteCode = False,
    download: Download = False,
    overwrite: Overwrite = False,
) -> None:
    """Decode every MLP neuron through the LM head; write atlas.parquet, summary.json and atlas.html."""
    from engramlab.decode.atlas import decode_atlas, write_atlas
    from engramlab.distributed import on_main
    from engramlab.results import check_out_dir

    _check_site(site)
    chosen = layer_ranges(layers)
    on_main(check_out_dir, out, overwrite)  # refuse a bad or non-empty folder before the work, not after
    loaded = _load(
        model, device, dtype, trust_remote_code, download, max_memory=max_memory, offload_folder=offload_folder
    )
    atlas = decode_atlas(
        loaded,
        site=site,
        top_k=top_k,
        fold_norm=fold_norm,
        softmax=softmax,
        chunk_size=chunk_size,
        progress=True,
        layers=chosen,
    )
    summary = write_atlas(atlas, out, overwrite=True, explorer=html)
    console = _console()
    console.print(
        f"decoded {summary['n_neurons']:,} neurons ({summary['n_layers']} layers, site {site}) in "
        f"{summary['seconds']:.2f} s on {summary['device']} ({summary['neurons_per_second']:,.0f} "
        f"neurons/s)",
        highlight=False,
    )
    if fold_norm:
        console.print(
            f"top-1 token changed by --fold-norm: {summary['top1_changed_by_fold_norm']:.1%} of neurons",
            highlight=False,
        )
    console.print(
        f"wrote {out}/atlas.parquet ({summary['rows']:,} rows), {out}/summary.json"
        + (f", {out}/atlas.html" if html else ""),
        highlight=False,
    )


@app.command("search")
def search_cmd(
    atlas: Path = typer.Option(..., "--atlas", help="Folder written by `decode atlas` (or its atlas.parquet)."),
    token: str | None = typer.Option(None, "--token", help="Exact token, e.g. ' dog' (mind the leading space)."),
    word: str | None = typer.Option(None, "--word", help="A word, whatever the case and surrounding spaces."),
    token_id: int | None = typer.Option(None, "--token-id", min=0, help="A token id."),
    max_rank: int | None = typer.Option(None, "--max-rank", min=1, help="Only ranks below this (1 = top token only)."),
    layer: list[int] | None = typer.Option(None, "--layer", help="Only this layer (repeatable)."),
    limit: int = typer.Option(20, "--limit", min=1, help="Rows to print (and to write with --out)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the hits to this parquet file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """The neurons whose top tokens contain a token or word, ranked by score."""
    from rich.table import Table

    from engramlab.decode.search import search_atlas
    from engramlab.results import check_out_file, write_parquet

    if out is not None:
        check_out_file(out, overwrite)
    hits = search_atlas(atlas, token=token, word=word, token_id=token_id, max_rank=max_rank, layers=layer, limit=limit)
    console = _console()
    what = repr(token) if token is not None else (f"word {word!r}" if word is not None else f"id {token_id}")
    if hits.num_rows == 0:
        console.print(f"no neuron has {what} among its top tokens in {atlas}.", highlight=False)
    else:
        grid = Table(title=f"neurons promoting {what}")
        expert = ["expert"] if "expert" in hits.column_names else []  # a MoE model's atlas
        columns = ["layer", "neuron", *expert, "rank", "token", "score"] + (
            ["prob"] if "prob" in hits.column_names else []
        )
        numeric = ("layer", "neuron", "expert", "rank", "score", "prob")
        for c in [*columns, "top_token"]:
            grid.add_column(c, justify="right" if c in numeric else "left")
        for row in hits.to_pylist():
            grid.add_row(
                *[
                    f"{row[c]:.4g}"
                    if c in ("score", "prob")
                    else (repr(row[c]) if c in ("token", "top_token") else str(row[c]))
                    for c in columns
                ],
                repr(row["top_token"]),
            )
        console.print(grid)
    if out is not None:
        write_parquet(out, hits)
        console.print(f"wrote {out}", highlight=False)


@app.command("compare")
def compare_cmd(
    out: Out,
    a: str = typer.Option(..., "--a", help="Model A (e.g. organism:base)."),
    b: str = typer.Option(..., "--b", help="Model B with the same shapes (e.g. organism:chat)."),
    site: Site = "up",
    top_k: TopK = 10,
    shared_head: str | None = typer.Option(
        None, "--shared-head", help="Decode both with A's or B's LM head (a|b); default: each its own."
    ),
    fold_norm: FoldNorm = False,
    chunk_size: ChunkSize = None,
    layers: Layers = None,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = "auto",
    trust_remote_code: TrustRemoteCode = False,
    download: Download = False,
    overwrite: Overwrite = False,
) -> None:
    """Top-1 token agreement of every neuron between two same-shaped models, per layer and overall."""
    from engramlab.decode.compare import compare_models, write_comparison
    from engramlab.distributed import on_main
    from engramlab.errors import EngramError
    from engramlab.results import check_out_dir

    if shared_head not in (None, "a", "b"):
        raise EngramError(f"--shared-head must be a or b, got {shared_head!r}.")
    _check_site(site)
    chosen = layer_ranges(layers)
    on_main(check_out_dir, out, overwrite)
    model_a = _load(a, device, dtype, trust_remote_code, download, option="--a")
    model_b = _load(b, device, dtype, trust_remote_code, download, option="--b")
    result = compare_models(
        model_a,
        model_b,
        site=site,
        top_k=top_k,
        shared_head=shared_head,
        fold_norm=fold_norm,
        chunk_size=chunk_size,
        seed=seed,
        progress=True,
        layers=chosen,
    )
    summary = write_comparison(result, out, overwrite=True)
    console = _console()
    per_layer = "  ".join(
        f"{i}:{x:.3f}" for i, x in zip(summary["layers"], summary["agreement_per_layer"], strict=True)
    )
    console.print(
        f"top-1 agreement {summary['agreement']:.4f} over {summary['n_neurons']:,} neurons "
        f"(chance {summary['chance_agreement']:.4f}; top-{top_k} overlap {summary['overlap_at_k']:.4f})",
        highlight=False,
    )
    console.print(f"per layer: {per_layer}", highlight=False)
    if result.n_excluded:
        typer.echo(
            f"warning: {result.n_excluded:,} neurons have no top token in A or B (zero or non-finite weights) and "
            "are left out of every agreement.",
            err=True,
        )
    console.print(f"wrote {out}/compare.parquet, {out}/report.html, {out}/summary.json", highlight=False)


@app.command("steer")
def steer_cmd(
    neuron: str = typer.Option(..., "--neuron", help="LAYER:INDEX, e.g. 3:1234."),
    prompt: str = typer.Option(..., "--prompt", help="The prompt (a user turn with --chat)."),
    values: str = typer.Option("0,5,10,20", "--values", help="Comma-separated clamp values."),
    model: Model = DEFAULT_MODEL,
    site: str = typer.Option("up", "--site", help="up (up_proj output channel) or act (post-activation)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", min=0, help="Greedy tokens generated per value."),
    token: str | None = typer.Option(
        None, "--token", help="Report this token's probability instead of the neuron's top token."
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write steer.parquet and summary.json here."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    trust_remote_code: TrustRemoteCode = False,
    download: Download = False,
    overwrite: Overwrite = False,
) -> None:
    """Clamp one neuron to each value at every position; P(its top token) next and a greedy continuation."""
    from rich.table import Table

    from engramlab.decode.steer import STEER_SITES, parse_neuron, parse_values, steer_neuron
    from engramlab.errors import EngramError
    from engramlab.results import check_out_dir, prepare_out_dir, write_json, write_parquet

    layer, index = parse_neuron(neuron)
    value_list = parse_values(values)
    if site not in STEER_SITES:
        raise EngramError(f"--site {site!r} cannot be clamped; choose one of: {', '.join(STEER_SITES)}.")
    if out is not None:
        check_out_dir(out, overwrite)
    loaded = _load(model, device, dtype, trust_remote_code, download)
    result = steer_neuron(
        loaded, layer, index, value_list, prompt, site=site, chat=chat, max_new_tokens=max_new_tokens, token=token
    )
    word = result.token.strip()
    grid = Table(title=f"neuron {result.layer}:{result.neuron} clamped at {site}; probabilities of the next token")
    for c, j in (
        ("clamp", "right"),
        (f"P({result.token!r})", "right"),
        (f"P(any {word!r})", "right"),
        ("x baseline", "right"),
        ("next", "left"),
        ("greedy continuation", "left"),
    ):
        grid.add_column(c, justify=j)
    for row in result.rows():
        grid.add_row(
            "none" if row["value"] is None else f"{row['value']:g}",
            f"{row['prob']:.4g}",
            f"{row['prob_word']:.4g}",
            f"{row['prob_word_ratio']:.3g}",
            repr(row["top_next"]),
            repr(row["continuation"]),
        )
    console = _console()
    console.print(grid)
    console.print(
        f"natural value at the last prompt token: {result.natural_last:.4g} (prompt range "
        f"{result.natural_min:.4g} .. {result.natural_max:.4g})",
        highlight=False,
    )
    if out is not None:
        prepare_out_dir(out, overwrite)
        write_parquet(Path(out) / "steer.parquet", [{**r, "value": r["value"]} for r in result.rows()])
        write_json(Path(out) / "summary.json", {"model": model, "chat": chat, **result.summary()})
        console.print(f"wrote {out}/steer.parquet and {out}/summary.json", highlight=False)
