"""`engramlab continual ...`: HLOP on spiking networks and CoTTA test-time adaptation (thin layer over the library)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from engramlab.cli_options import Out, Overwrite, Seed
from engramlab.errors import EngramError

app = typer.Typer(help="Continual learning: HLOP spiking networks and CoTTA test-time adaptation.",
                  no_args_is_help=True)
console = Console()

QUICK_HLOP = {"n_tasks": 10, "epochs": 1}  # the full 10-task PMNIST stream, one epoch: a few minutes on 2 cores


def _csv(value: str, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise EngramError(f"{option} needs at least one name.")
    return items


@app.command()
def hlop(
    stream: str = typer.Option("pmnist", "--stream", help="pmnist, split-mnist, cifar100 or 5datasets."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Folder with the stream's files (cifar100, 5datasets, "
                                                           "or mnist/ with the full idx files)."),
    methods: str = typer.Option("hlop,baseline,ewc,gpm,multitask", "--methods", help="Comma-separated methods."),
    neuron: str = typer.Option("lif", "--neuron", help="lif (spiking) or ann (ReLU, same network)."),
    train: str = typer.Option("bptt", "--train", help="bptt (surrogate gradient through time) or dsr (online)."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Epochs per task (paper: 1 on PMNIST)."),
    lr: float = typer.Option(0.1, "--lr", help="SGD learning rate (paper PMNIST: 0.1)."),
    momentum: float = typer.Option(0.0, "--momentum", help="SGD momentum (paper PMNIST: 0; CIFAR-100: 0.9)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    tasks: int = typer.Option(None, "--tasks", min=1, help="Use only the first N tasks of the stream."),
    hebbian_iterations: int = typer.Option(5, "--hebbian-iterations", min=1, help="Subspace-rule passes per batch."),
    literal: bool = typer.Option(False, "--literal-hlop", help="The official rule: no re-orthonormalisation of H."),
    hebbian_rows: int = typer.Option(None, "--hebbian-rows", min=1,
                                     help="Learn H from a random subset of this many activity rows per batch."),
    consolidation_epochs: int = typer.Option(0, "--consolidation-epochs", min=0,
                                             help="Extra Hebbian-only passes over each task before freezing."),
    gpm_threshold: float = typer.Option(0.97, "--gpm-threshold", help="GPM energy threshold."),
    ewc_lambda: float = typer.Option(100.0, "--ewc-lambda", help="EWC penalty strength (stable while λ·max F·lr < 2)."),
    quick: bool = typer.Option(False, "--quick", help="The quick preset: 10 PMNIST tasks, 1 epoch."),
    seed: Seed = 2022,
    out: Out = Path("runs/hlop"),
    overwrite: Overwrite = False,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out from its checkpoints."),
) -> None:
    """Continual learning of a task stream with HLOP and its baselines; ACC, BWT, accuracy matrices, leak, timing."""
    from dataclasses import replace

    from engramlab.continual.hlop_study import HLOPStudyOptions, run_hlop_study
    from engramlab.continual.methods import HLOP_PRESETS
    from engramlab.continual.runner import TrainSettings

    if quick:
        tasks, epochs = QUICK_HLOP["n_tasks"], QUICK_HLOP["epochs"]
    preset = HLOP_PRESETS["mlp" if stream in ("pmnist", "split-mnist") else "cnn"]
    hlop_settings = replace(preset, iterations=hebbian_iterations, orthonormalise=not literal,
                            hebbian_rows=hebbian_rows, consolidation_epochs=consolidation_epochs)
    opts = HLOPStudyOptions(stream=stream, data_dir=data_dir, methods=_csv(methods, "--methods"), neuron=neuron,
                            train=train, n_tasks=tasks,
                            train_settings=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size,
                                                         momentum=momentum, seed=seed),
                            hlop=hlop_settings, gpm_threshold=gpm_threshold, ewc_lambda=ewc_lambda, out=out,
                            overwrite=overwrite, resume=resume)
    summary = run_hlop_study(opts)
    grid = Table(title=f"{summary['stream']}: {summary['n_tasks']} tasks, {summary['snn_mode']}")
    for column in ("method", "ACC %", "BWT", "ms/step"):
        grid.add_column(column)
    for m in summary["methods"]:
        bwt = summary["bwt"][m]
        grid.add_row(m, f"{100 * summary['acc'][m]:.1f}", "n/a" if bwt is None else f"{100 * bwt:+.1f}",
                     f"{summary['ms_per_step'][m]:.1f}")
    console.print(grid)
    console.print(f"wrote {out}/summary.json, accuracy.parquet, leak.parquet, report.html")
