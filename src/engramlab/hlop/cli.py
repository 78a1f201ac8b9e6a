"""`engramlab continual hlop`: a thin typer command over `engramlab.hlop.study` (registered by
`engramlab.continual.cli`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from engramlab.cli_options import (
    Out,
    Overwrite,
    Resume,
    Seed,
    comma_list,
    fraction_below_one,
    int_list,
    non_negative,
    positive,
    share,
)

console = Console()

QUICK_HLOP = {"n_tasks": 10, "epochs": 1}  # the full 10-task PMNIST stream, one epoch: a few minutes on 2 cores


def hlop(
    stream: str = typer.Option("pmnist", "--stream", help="pmnist, split-mnist, cifar100 or 5datasets."),
    data_dir: Path = typer.Option(
        None,
        "--data-dir",
        help="Folder with the stream's files (cifar100, 5datasets, or mnist/ with the full idx files).",
    ),
    methods: str = typer.Option("hlop,baseline,ewc,gpm,multitask", "--methods", help="Comma-separated methods."),
    neuron: str = typer.Option("lif", "--neuron", help="lif (spiking) or ann (ReLU, same network)."),
    train: str = typer.Option("bptt", "--train", help="bptt (surrogate gradient through time) or dsr (online)."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Epochs per task (paper: 1 on PMNIST)."),
    lr: float = typer.Option(0.1, "--lr", callback=positive, help="SGD learning rate (paper PMNIST: 0.1)."),
    momentum: float = typer.Option(
        0.0, "--momentum", callback=fraction_below_one, help="SGD momentum in [0, 1) (paper PMNIST: 0; CIFAR-100: 0.9)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    tasks: int = typer.Option(None, "--tasks", min=1, help="Use only the first N tasks of the stream."),
    hebbian_iterations: int = typer.Option(5, "--hebbian-iterations", min=1, help="Subspace-rule passes per batch."),
    literal: bool = typer.Option(False, "--literal-hlop", help="The official rule: no re-orthonormalisation of H."),
    hebbian_rows: int = typer.Option(
        None,
        "--hebbian-rows",
        min=0,
        help="Learn H from a random subset of this many activity rows per batch; 0: all "
        "rows (default: the preset's, 64 for the MLP streams, all for the CNN).",
    ),
    consolidation_epochs: int = typer.Option(
        0, "--consolidation-epochs", min=0, help="Extra Hebbian-only passes over each task before freezing."
    ),
    lateral: str = typer.Option(
        None,
        "--lateral-neurons",
        help="HLOP lateral neurons per protected layer at task 0, e.g. 80,200,100 (default: "
        "the spec's preset for the network).",
    ),
    lateral_increment: str = typer.Option(
        None,
        "--lateral-increment",
        help="New lateral neurons per layer at every later task, e.g. 50,50,50 (default: the spec's schedule).",
    ),
    gpm_threshold: float = typer.Option(0.97, "--gpm-threshold", callback=share, help="GPM energy threshold, (0, 1]."),
    ewc_lambda: float = typer.Option(
        100.0, "--ewc-lambda", callback=non_negative, help="EWC penalty strength (stable while λ·max F·lr < 2)."
    ),
    quick: bool = typer.Option(False, "--quick", help="The quick preset: 10 PMNIST tasks, 1 epoch."),
    seed: Seed = 2022,
    out: Out = Path("runs/hlop"),
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Continual learning of a task stream with HLOP and its baselines; ACC, BWT, accuracy matrices, leak, timing."""
    from dataclasses import replace

    from engramlab.hlop.methods import HLOP_PRESETS
    from engramlab.hlop.runner import TrainSettings
    from engramlab.hlop.study import HLOPStudyOptions, run_hlop_study

    if quick:
        tasks, epochs = QUICK_HLOP["n_tasks"], QUICK_HLOP["epochs"]
    preset = HLOP_PRESETS["mlp" if stream in ("pmnist", "split-mnist") else "cnn"]
    if hebbian_rows is None:
        hebbian_rows = preset.hebbian_rows
    hlop_settings = replace(
        preset,
        iterations=hebbian_iterations,
        orthonormalise=not literal,
        hebbian_rows=hebbian_rows,
        consolidation_epochs=consolidation_epochs,
    )
    if lateral is not None:
        hlop_settings = replace(hlop_settings, initial=int_list(lateral, "--lateral-neurons", minimum=0))
    if lateral_increment is not None:
        hlop_settings = replace(
            hlop_settings, increments=[int_list(lateral_increment, "--lateral-increment", minimum=0)]
        )
    opts = HLOPStudyOptions(
        stream=stream,
        data_dir=data_dir,
        methods=comma_list(methods, "--methods"),
        neuron=neuron,
        train=train,
        n_tasks=tasks,
        train_settings=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, seed=seed),
        hlop=hlop_settings,
        gpm_threshold=gpm_threshold,
        ewc_lambda=ewc_lambda,
        out=out,
        overwrite=overwrite,
        resume=resume,
    )
    summary = run_hlop_study(opts)
    grid = Table(title=f"{summary['stream']}: {summary['n_tasks']} tasks, {summary['snn_mode']}")
    for column in ("method", "ACC %", "BWT", "ms/step"):
        grid.add_column(column)
    for m in summary["methods"]:
        bwt = summary["bwt"][m]
        grid.add_row(
            m,
            f"{100 * summary['acc'][m]:.1f}",
            "n/a" if bwt is None else f"{100 * bwt:+.1f}",
            f"{summary['ms_per_step'][m]:.1f}",
        )
    console.print(grid)
    console.print(f"wrote {out}/summary.json, accuracy.parquet, leak.parquet, report.html")
