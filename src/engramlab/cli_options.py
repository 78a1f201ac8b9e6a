"""Options shared by every study command, declared once (typer `Annotated` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engramlab.errors import EngramError

DEFAULT_MODEL = "organism:base"

Model = Annotated[str, typer.Option("--model", help="Local HF model directory, organism:NAME, or a Hub id.")]
Out = Annotated[Path, typer.Option("--out", help="Folder for summary.json, parquet tables and report.html.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the results in a non-empty --out folder.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed for every sampled choice.")]
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
