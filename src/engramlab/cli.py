"""The `engramlab` command: a thin typer layer over the library. Every `EngramError` ends the command with one
line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from engramlab.cli_options import DEFAULT_MODEL, Device, Download, Dtype, Out, Overwrite, Seed, TrustRemoteCode
from engramlab.continual.cli import app as continual_app
from engramlab.decode.cli import app as decode_app
from engramlab.errors import EngramError
from engramlab.organisms.cli import app as organisms_app
from engramlab.posttrain.cli import app as posttrain_app
from engramlab.relations.cli import app as relations_app

app = typer.Typer(
    name="engramlab",
    help="Find, read, edit and protect the knowledge stored inside neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Load models and inspect their architecture.", no_args_is_help=True)
for name, sub in [
    ("models", models_app),
    ("organisms", organisms_app),
    ("relations", relations_app),
    ("decode", decode_app),
    ("posttrain", posttrain_app),
    ("continual", continual_app),
]:
    app.add_typer(sub, name=name)

console = Console()


@models_app.command("info")
def models_info(
    ref: str = typer.Argument(..., help="Local HF model directory, organism:NAME, or a Hub id."),
    device: Device = "cpu",
    dtype: Dtype = "auto",
    trust_remote_code: TrustRemoteCode = False,
    download: Download = False,
    as_json: bool = typer.Option(False, "--json", help="Print the info as JSON."),
) -> None:
    """Architecture, layer count, neurons per site, dtype and parameter count of a model."""
    from engramlab.models.info import model_info
    from engramlab.models.loading import load_model

    loaded = load_model(
        ref,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_download=download,
        with_tokenizer=False,
    )
    info = model_info(loaded)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    grid = Table(title=f"{info['ref']}  ({info['class']})", show_header=False)
    keys = ("family", "n_layers", "hidden_size", "vocab_size", "mlp_kind", "gated_mlp", "dtype", "device")
    for key in (*keys, "tied_embeddings"):
        grid.add_row(key, str(info[key]))
    if info["experts"]:
        moe = info["experts"]
        grid.add_row(
            "experts",
            f"{moe['experts']} x {moe['neurons_per_expert']:,} neurons (+{moe['shared_neurons']:,} shared) "
            f"in {len(moe['moe_layers'])} MoE layers",
        )
    grid.add_row("parameters", f"{info['parameters']:,}")
    for part, n in info["parameters_by_part"].items():
        grid.add_row(f"  {part}", f"{n:,}")
    for site, width in info["units_per_layer"].items():
        per_layer = f"{width:,}" if isinstance(width, int) else f"{min(width):,}..{max(width):,}"
        grid.add_row(f"units {site}", f"{per_layer} per layer, {info['units_total'][site]:,} in all")
    console.print(grid)


@models_app.command("census")
def models_census(
    families: str = typer.Option(
        "all", "--families", help="Comma-separated model types, or 'all' (every causal-LM family installed)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the rows and the summary as JSON."),
    out: Path | None = typer.Option(None, "--out", help="Also write the rows and summary to this JSON file."),
    show: str = typer.Option("all", "--show", help="Rows to print: all, decoder, or problems (not pass)."),
) -> None:
    """Build a tiny random model of every causal-LM family of the installed transformers, map its layout and run
    the engine's exactness checks on it; print pass / unsupported (with the reason) per family."""
    from engramlab.cli_options import comma_list
    from engramlab.models.census import causal_lm_families, run_census, summary
    from engramlab.results import write_json

    known = causal_lm_families()
    chosen = known if families == "all" else comma_list(families, "--families")
    unknown = [f for f in chosen if f not in known]
    if unknown:
        raise EngramError(f"--families: {', '.join(unknown)} is not a causal-LM model type of this transformers.")
    if show not in ("all", "decoder", "problems"):
        raise EngramError(f"--show {show!r} is not one of: all, decoder, problems.")
    progress = None if as_json else (lambda name: console.print(f"[dim]{name}[/dim]", end=" "))
    rows = run_census(chosen, progress=progress)
    totals = summary(rows)
    payload = {"transformers": _transformers_version(), "summary": totals, "rows": [r.as_dict() for r in rows]}
    if out is not None:
        write_json(out, payload)
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    console.print()
    table = Table(title=f"Model families of transformers {payload['transformers']}")
    for column in ("family", "scope", "MLP kind", "layers x neurons", "result", "reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if (show == "decoder" and row.scope != "decoder") or (show == "problems" and row.result == "pass"):
            continue
        size = f"{row.layers} x {row.neurons}" if row.layers else ""
        table.add_row(row.family, row.scope, row.kind, size, row.result, row.reason)
    console.print(table)
    rate = totals["decoder_pass_rate"]
    console.print(
        f"decoder-only families: {totals['decoder_pass']} of {totals['decoder_built']} that build as tiny models "
        f"pass ({rate:.0%}); silently wrong: {totals['silently_wrong']}."
        if rate is not None
        else "no decoder-only family was built."
    )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@app.command()
def tour(
    out: Out = "runs/tour",
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Model for the LLM studies."),
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    overwrite: Overwrite = False,
    only: str = typer.Option("", "--only", help="Comma-separated tour steps to run (default: all)."),
) -> None:
    """Run a quick version of every study on the shipped defaults; write OUT/index.html and OUT/summary.json."""
    from engramlab.tour import run_tour

    steps = [s.strip() for s in only.split(",") if s.strip()] or None
    summary = run_tour(out, model=model, device=device, dtype=dtype, seed=seed, overwrite=overwrite, only=steps)
    failed = [name for name, step in summary["steps"].items() if "error" in step]
    for name, step in summary["steps"].items():
        status = f"[red]failed: {step['error']}[/]" if "error" in step else f"done in {step['seconds']} s"
        console.print(f"{name}: {status}", markup=True, highlight=False)
    console.print(f"wrote {out}/index.html and {out}/summary.json")
    if failed:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `engramlab` script and of `python -m engramlab`."""
    try:
        app(args=argv, prog_name="engramlab")
    except EngramError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
