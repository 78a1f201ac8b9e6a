"""`engramlab posttrain ...`: thin typer commands over `engramlab.posttrain.study`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from engramlab.cli_options import (
    BatchSize,
    Device,
    Dtype,
    Out,
    Overwrite,
    Seed,
    finite,
    positive,
    shared_options_command,
)
from engramlab.posttrain import patching, study

app = typer.Typer(help="How post-training reshapes LLMs (Du et al., COLM 2025).", no_args_is_help=True)
console = Console()

Base = Annotated[str, typer.Option("--base", help="The base model (directory, organism:NAME or Hub id).")]
Post = Annotated[str, typer.Option("--post", help="Its post-trained version (same architecture).")]

HEADLINES = {
    "knowledge": ("variant", "pearson_r"),
    "truth": ("layer", "cosine", "probe_acc", "nie", "nie_last_token"),
    "refusal": (
        "layer",
        "cosine",
        "refusal_rate_harmful",
        "refusal_rate_harmful_ablated",
        "refusal_rate_harmless",
        "refusal_rate_harmless_added",
        "refusal_rate_harmful_ablated_base_direction",
        "refusal_rate_harmless_added_base_direction",
    ),
    "entropy": ("iou", "entropy"),
}


def _shared_options(
    base: Base = "organism:base",
    post: Post = "organism:chat",
    out: Out = Path("runs/posttrain"),
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 16,
    overwrite: Overwrite = False,
) -> None:
    """The options of every `posttrain` command, declared once."""


posttrain_command = shared_options_command(app, _shared_options)


def _run(analyses: list[str], shared: dict, **extra) -> None:
    opts = study.Options(**shared, **extra)
    summary = study.run(opts, analyses)
    shown = {name: {k: _headline(summary[name][k]) for k in HEADLINES[name] if k in summary[name]} for name in analyses}
    console.print_json(json.dumps(shown, default=str))
    console.print(f"wrote {opts.out}/summary.json and {opts.out}/report.html")
    for name, why in summary.get("knowledge", {}).get("excluded_datasets", {}).items():
        typer.echo(f"warning: knowledge dataset {name!r} left out of pearson_r: {why}.", err=True)


def _headline(value):
    """NIE tables {pair: {"nie": x, ...}} shown as {pair: x}; everything else as it is."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) and "nie" in v for v in value.values()):
        return {k: v["nie"] for k, v in value.items()}
    return value


@posttrain_command("knowledge", "runs/posttrain-knowledge")
def knowledge_cmd(
    shared: dict,
    variant: str = typer.Option("truefalse", "--variant", help=f"Patching variant: {', '.join(patching.VARIANTS)}."),
    max_pairs: int = typer.Option(24, "--max-pairs", min=2, help="True/false pairs per dataset."),
    noise_scale: float = typer.Option(
        0.05, "--noise-scale", callback=positive, help="noise variant: std as a fraction of |embedding|."
    ),
) -> None:
    """Activation patching maps (clean -> corrupted run) for base and post, their correlation, and cross-model
    patching."""
    _run(["knowledge"], shared, knowledge_variant=variant, max_pairs=max_pairs, noise_scale=noise_scale)


@posttrain_command("truth", "runs/posttrain-truth")
def truth_cmd(
    shared: dict,
    layer: int | None = typer.Option(None, "--layer", help="Probe layer (default: where base LOO accuracy peaks)."),
    token: str = typer.Option(
        "period", "--token", help="period (the paper's) or object (geometry-of-truth's noperiod)."
    ),
    per_set: int = typer.Option(150, "--per-set", min=4, help="Statements per dataset."),
) -> None:
    """Truth direction: probe layer, leave-one-dataset-out accuracy, cosine base/post, cross-model probes and
    intervention NIE (at the paper's positions and at the final token)."""
    _run(["truth"], shared, truth_layer=layer, truth_token=token, per_set=per_set)


@posttrain_command("entropy", "runs/posttrain-entropy")
def entropy_cmd(shared: dict) -> None:
    """Entropy neurons (high norm, low LogitVar) of both models, their IoU and their effect on entropy."""
    _run(["entropy"], shared)


@posttrain_command("refusal", "runs/posttrain-refusal")
def refusal_cmd(
    shared: dict,
    layer: int | None = typer.Option(None, "--layer", help="Layer of the direction (default: middle)."),
    coeff: float = typer.Option(1.0, "--coeff", callback=finite, help="Multiple of the mean difference added."),
) -> None:
    """Refusal direction: ablate it on harmful prompts, add it on harmless ones; base vs post direction."""
    _run(["refusal"], shared, refusal_layer=layer, refusal_coeff=coeff)


@posttrain_command("compare", "runs/posttrain")
def compare_cmd(shared: dict) -> None:
    """All four analyses in one report: what moved and what stayed."""
    _run(list(study.ANALYSES), shared)
