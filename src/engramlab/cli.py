"""The `engramlab` command: a thin typer layer over the library.

`main` is the one error path: an `EngramError` or a bad option value ends the command with one line on stderr and
exit code 2; Ctrl-C with one line and exit code 130; any other exception (a bug) with one line naming it and a
hint to rerun with `--debug`, which shows the full traceback, and exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from engramlab.cli_options import (
    DEFAULT_MODEL,
    Device,
    Download,
    Dtype,
    Model,
    Out,
    Overwrite,
    Seed,
    TrustRemoteCode,
    comma_list,
)
from engramlab.continual.cli import app as continual_app
from engramlab.decode.cli import app as decode_app
from engramlab.errors import EngramError, first_line
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

DEBUG_FLAG = "--debug"
INTERRUPTED = "interrupted (Ctrl-C); every result file written so far is complete."
# click's base error class; typer vendors click in recent versions, so it is taken from typer's own exceptions
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


@app.callback()
def _global_options(
    debug: bool = typer.Option(
        False,
        DEBUG_FLAG,
        help="Show the full traceback of an unexpected error (anywhere on the line; or ENGRAMLAB_DEBUG=1).",
    ),
) -> None:
    # `main` takes --debug out of the arguments wherever it stands; it is declared here for --help.
    pass


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
        option="REF",
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
            f"in {len(moe['moe_layers'])} MoE layers, stored as {moe['stored_as']}",
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    show: str = typer.Option("all", "--show", help="Rows to print: all, decoder, or problems (not pass)."),
) -> None:
    """Build a tiny random model of every causal-LM family of the installed transformers, map its layout and run
    the engine's exactness checks on it; print pass / unsupported (with the reason) per family."""
    from engramlab.cli_options import comma_list
    from engramlab.models.census import causal_lm_families, run_census, summary
    from engramlab.results import check_out_file, write_json

    known = causal_lm_families()
    chosen = known if families == "all" else comma_list(families, "--families")
    unknown = [f for f in chosen if f not in known]
    if unknown:
        raise EngramError(f"--families: {', '.join(unknown)} is not a causal-LM model type of this transformers.")
    if show not in ("all", "decoder", "problems"):
        raise EngramError(f"--show {show!r} is not one of: all, decoder, problems.")
    if out is not None:
        check_out_file(out, overwrite)  # a bad or existing --out is refused before the census, not after
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
    model: Model = DEFAULT_MODEL,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    overwrite: Overwrite = False,
    only: str = typer.Option("", "--only", help="Comma-separated tour steps to run (default: all)."),
) -> None:
    """Run a quick version of every study on the shipped defaults; write OUT/index.html and OUT/summary.json."""
    from engramlab.tour import run_tour

    steps = comma_list(only, "--only") if only else None
    summary = run_tour(out, model=model, device=device, dtype=dtype, seed=seed, overwrite=overwrite, only=steps)
    failed = [name for name, step in summary["steps"].items() if "error" in step]
    for name, step in summary["steps"].items():
        status = f"[red]failed: {step['error']}[/]" if "error" in step else f"done in {step['seconds']} s"
        console.print(f"{name}: {status}", markup=True, highlight=False)
    console.print(f"wrote {out}/index.html and {out}/summary.json")
    if failed:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `engramlab` script and of `python -m engramlab` (also under torchrun): run the command, and
    turn every way it can fail into one line on stderr and an exit code (2: bad input, 130: interrupted, 1:
    unexpected)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get("ENGRAMLAB_DEBUG") == "1"
    args = [a for a in args if a != DEBUG_FLAG]
    parallel = _start_ranks()
    try:
        with _warnings_after(show=not debug) as held:
            code = app(args=args, prog_name="engramlab", standalone_mode=False)
        held.show()
    except EngramError as err:
        _fail(*_rank_message(err, parallel), 2)
    except _CLICK_ERROR as err:  # a bad option value, a missing option, an unknown command
        if type(err).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # typer has printed the help
        _fail(err.format_message(), "error", err.exit_code)
    except typer.Abort:
        _fail("aborted.", "error", 1)
    except KeyboardInterrupt:
        _fail(INTERRUPTED, "error", 130)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing left to say
        sys.exit(1)
    except Exception as err:
        if debug:
            raise
        if parallel and _peer_lost(err):
            sys.exit(1)  # another rank failed and said why in its own line; torchrun stops the rest
        _fail(
            f"unexpected {type(err).__name__}: {first_line(err)} (a bug in engramlab or a case it does not check "
            f"yet); rerun with {DEBUG_FLAG} for the traceback.",
            "error",
            1,
        )
    if code == 130:  # typer turns a Ctrl-C inside the command into exit code 130
        _fail(INTERRUPTED, "error", 130)
    if code:
        sys.exit(code)
    if parallel:
        from engramlab.distributed import shutdown

        shutdown()


class _HeldWarnings(list):
    def show(self) -> None:
        for w in self:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


@contextmanager
def _warnings_after(show: bool) -> Iterator[_HeldWarnings]:
    """Hold back Python warnings raised during the command (a library's note about a pickle protocol, say): a
    command that succeeds shows them when it ends, one that fails shows only its one-line error. With `show` off
    (--debug) warnings go out as they happen."""
    held = _HeldWarnings()
    if not show:
        yield held
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield held
    held.extend(caught)


def _fail(message: str | None, label: str, code: int) -> NoReturn:
    """One line `label: message` on stderr (a message spread over lines is joined; None: nothing), then exit with
    `code`."""
    if message is None:
        sys.exit(code)
    line = " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    print(f"{label}: {line}", file=sys.stderr)
    sys.exit(code)


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


def _peer_lost(err: Exception) -> bool:
    """Whether a collective failed because another torchrun rank went away (its process group connection closed)."""
    from torch.distributed import DistError

    text = str(err)
    return isinstance(err, DistError) or (
        isinstance(err, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset"))
    )


def _rank_message(err: EngramError, parallel: bool) -> tuple[str | None, str]:
    """The error's message and label. Under torchrun: an error every rank raised together (`distributed.on_main`) is
    printed by rank 0 only (None elsewhere); any other names the rank that failed (torchrun then stops the rest)."""
    if not parallel:
        return str(err), "error"
    from engramlab.distributed import SharedError, rank, world_size

    if rank() == 0:
        return str(err), "error"
    return (None if isinstance(err, SharedError) else str(err)), f"error (rank {rank()} of {world_size()})"
