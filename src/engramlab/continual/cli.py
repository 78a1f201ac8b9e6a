"""`engramlab continual ...`: the command group of papers 4 and 5, whose commands live with their papers
(`engramlab.hlop.cli`, `engramlab.tta.cli`)."""

from __future__ import annotations

import typer

from engramlab.hlop.cli import hlop
from engramlab.tta.cli import train_source, tta

app = typer.Typer(
    help="Continual learning: HLOP spiking networks and CoTTA test-time adaptation.", no_args_is_help=True
)
app.command("hlop")(hlop)
app.command("tta")(tta)
app.command("train-source")(train_source)
