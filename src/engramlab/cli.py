"""The `engramlab` command: a thin typer layer over the library. Every `EngramError` ends the command with one
line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import sys

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
    for key in ("family", "n_layers", "hidden_size", "vocab_size", "gated_mlp", "dtype", "device", "tied_embeddings"):
        grid.add_row(key, str(info[key]))
    grid.add_row("parameters", f"{info['parameters']:,}")
    for part, n in info["parameters_by_part"].items():
        grid.add_row(f"  {part}", f"{n:,}")
    for site, width in info["units_per_layer"].items():
        grid.add_row(f"units {site}", f"{width:,} per layer, {info['units_total'][site]:,} in all")
    console.print(grid)


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
    """Entry point of the `engramlab` script and of `python -m engramlab` (also under torchrun)."""
    parallel = _start_ranks()
    try:
        app(args=argv, prog_name="engramlab")
    except EngramError as err:
        _print_error(err, parallel)
        sys.exit(2)
    except SystemExit as done:
        if parallel and not done.code:
            from engramlab.distributed import shutdown

            shutdown()
        raise


def _start_ranks() -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group and silence stdout on every rank but 0, so that
    summaries are printed once. Without torchrun nothing happens (and torch.distributed is not imported)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    from engramlab.distributed import init_from_env, rank

    if not init_from_env():
        return False
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return True


def _print_error(err: EngramError, parallel: bool) -> None:
    """One line on stderr. Under torchrun: an error every rank raised together (`distributed.on_main`) is printed by
    rank 0 only; any other names the rank that failed (torchrun then stops the remaining ranks)."""
    if not parallel:
        print(f"error: {err}", file=sys.stderr)
        return
    from engramlab.distributed import SharedError, rank, world_size

    if rank() == 0:
        print(f"error: {err}", file=sys.stderr)
    elif not isinstance(err, SharedError):
        print(f"error (rank {rank()} of {world_size()}): {err}", file=sys.stderr)
