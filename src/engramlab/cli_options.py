"""Options shared by every study command, declared once (typer `Annotated` aliases), and the checks of numeric
options that every command applies before it loads a model or writes a file.

Typer's `min=`/`max=` bounds let NaN through (every comparison with NaN is false) and say nothing about finiteness,
so float options use the callbacks below instead; a failed check is a click usage error, which `engramlab.cli.main`
prints as one line with exit code 2.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from engramlab.errors import EngramError

DEFAULT_MODEL = "organism:base"


# ------------------------------------------------------------------------------------------------ numeric checks


def _number_check(test: Callable[[float], bool], wanted: str) -> Callable[[float | None], float | None]:
    def check(value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and test(value)):
            raise typer.BadParameter(f"must be {wanted}, got {value}.")
        return value

    return check


positive = _number_check(lambda v: v > 0, "a finite number > 0")
non_negative = _number_check(lambda v: v >= 0, "a finite number >= 0")
finite = _number_check(lambda v: True, "a finite number")
probability = _number_check(lambda v: 0 <= v <= 1, "a number in [0, 1]")
fraction_below_one = _number_check(lambda v: 0 <= v < 1, "a number in [0, 1)")
share = _number_check(lambda v: 0 < v <= 1, "a number in (0, 1]")


# ------------------------------------------------------------------------------------------------ shared options

Model = Annotated[str, typer.Option("--model", help="Local HF model directory, organism:NAME, or a Hub id.")]
Out = Annotated[Path, typer.Option("--out", help="Folder for summary.json, parquet tables and report.html.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the results in a non-empty --out folder.")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted run of this command with the same options in --out.")
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16.")]
Seed = Annotated[int, typer.Option("--seed", min=0, help="Random seed for every sampled choice (>= 0).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per forward pass.")]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run model code shipped with the checkpoint (off by default).")
]
Download = Annotated[bool, typer.Option("--download", help="Allow fetching a Hub id that is not in the local cache.")]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Spread a model larger than one device with accelerate's device_map (with --device auto): memory cap "
        "per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB; what does not fit goes to --offload-folder.",
    ),
]
OffloadFolder = Annotated[
    Path | None,
    typer.Option(
        "--offload-folder", help="Folder for the weights that fit on no device (disk offload, --device auto)."
    ),
]


def comma_list(value: str, option: str) -> list[str]:
    """The non-empty items of a comma-separated option value; one line naming `option` when there are none."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise EngramError(f"{option} needs at least one name.")
    return items


def int_list(value: str, option: str, minimum: int = 1) -> list[int]:
    """Comma-separated whole numbers, each >= `minimum`; one line naming `option` otherwise."""
    try:
        numbers = [int(v) for v in comma_list(value, option)]
    except ValueError:
        raise EngramError(f"{option} takes comma-separated whole numbers, got {value!r}.") from None
    small = [n for n in numbers if n < minimum]
    if small:
        raise EngramError(f"{option} values must be >= {minimum}, got {small[0]}.")
    return numbers


def layer_ranges(value: str | None, option: str = "--layers") -> list[int] | None:
    """`"0-2,5,7-9"` -> [0, 1, 2, 5, 7, 8, 9] (None stays None); one line naming `option` on anything else."""
    if value is None:
        return None
    layers: list[int] = []
    for item in comma_list(value, option):
        start, _, stop = item.partition("-")
        try:
            first, last = int(start), int(stop or start)
        except ValueError:
            raise EngramError(f"{option} takes layer numbers and ranges like 0-2,5, got {item!r}.") from None
        if first < 0 or last < first:
            raise EngramError(f"{option}: {item!r} is not a range of layers (0 <= first <= last).")
        layers.extend(range(first, last + 1))
    return layers


Layers = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Layers to decode, e.g. 3-60 or 0,2,5-9 (default: every layer with an MLP; they must share one width).",
    ),
]


def shared_options_command(
    app: typer.Typer, shared: Callable[..., None], make: Callable[[dict], Any] = dict
) -> Callable[..., Callable[[Callable[..., None]], Callable[..., None]]]:
    """A decorator factory for a command group whose commands share the options declared once as the parameters
    of `shared`. `@command(name, out, without=())` registers `fn(opts, **own_options)` as `NAME`: its options are the
    shared ones (less `without`, with `out` as the default --out) followed by fn's own; `opts` is `make` of the
    shared values."""
    declared = inspect.signature(shared, eval_str=True).parameters

    def command(name: str, out: str, without: tuple[str, ...] = ()) -> Callable[[Callable[..., None]], Callable]:
        def register(fn: Callable[..., None]) -> Callable[..., None]:
            own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]  # after `opts`
            common = [
                p.replace(default=Path(out)) if p.name == "out" else p
                for p in declared.values()
                if p.name not in without
            ]
            params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in common + own]

            def run(**values) -> None:
                fn(make({p.name: values.pop(p.name) for p in common}), **values)

            run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
            run.__annotations__ = {p.name: p.annotation for p in params}
            run.__doc__, run.__name__ = fn.__doc__, fn.__name__
            app.command(name)(run)
            return fn

        return register

    return command
