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


def _ints(value: str, option: str) -> list[int]:
    try:
        numbers = [int(v) for v in _csv(value, option)]
    except ValueError:
        raise EngramError(f"{option} takes comma-separated integers (one per protected layer), got {value!r}.") \
            from None
    if any(n < 0 for n in numbers):
        raise EngramError(f"{option} counts must be >= 0, got {value!r}.")
    return numbers


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
    hebbian_rows: int = typer.Option(None, "--hebbian-rows", min=0,
                                     help="Learn H from a random subset of this many activity rows per batch; 0: all "
                                          "rows (default: the preset's, 64 for the MLP streams, all for the CNN)."),
    consolidation_epochs: int = typer.Option(0, "--consolidation-epochs", min=0,
                                             help="Extra Hebbian-only passes over each task before freezing."),
    lateral: str = typer.Option(None, "--lateral-neurons",
                                help="HLOP lateral neurons per protected layer at task 0, e.g. 80,200,100 (default: "
                                     "the spec's preset for the network)."),
    lateral_increment: str = typer.Option(None, "--lateral-increment",
                                          help="New lateral neurons per layer at every later task, e.g. 50,50,50 "
                                               "(default: the spec's schedule)."),
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
    if hebbian_rows is None:
        hebbian_rows = preset.hebbian_rows
    hlop_settings = replace(preset, iterations=hebbian_iterations, orthonormalise=not literal,
                            hebbian_rows=hebbian_rows, consolidation_epochs=consolidation_epochs)
    if lateral is not None:
        hlop_settings = replace(hlop_settings, initial=_ints(lateral, "--lateral-neurons"))
    if lateral_increment is not None:
        hlop_settings = replace(hlop_settings, increments=[_ints(lateral_increment, "--lateral-increment")])
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


@app.command()
def tta(
    method: str = typer.Option("all", "--method", help="all (source,bn,tent,cotta), or a comma list of: source, bn, "
                                                       "tent, cotta, cotta-no-aug, cotta-no-restore."),
    stream: str = typer.Option("continual", "--stream", help="continual, gradual or mixed."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Repetitions of the whole corruption sequence."),
    severity: int = typer.Option(5, "--severity", min=1, max=5),
    batch_size: int = typer.Option(200, "--batch-size", min=1, help="Test batch (paper CIFAR: 200)."),
    constants: str = typer.Option("cifar", "--constants", help="Corruption strength: cifar (CIFAR-10-C) or imagenet."),
    policy: str = typer.Option("auto", "--policy",
                               help="CoTTA augmentation preset: cotta (paper), cotta-no-flip, soft; auto = "
                                    "cotta-no-flip on the digits stream (a mirrored digit is another digit), cotta "
                                    "with --data-dir."),
    n_augmentations: int = typer.Option(32, "--augmentations", min=1),
    threshold: str = typer.Option("auto", "--threshold",
                                  help="Anchor-confidence gate: a number (paper CIFAR10-C: 0.92), 'source' (the 5% "
                                       "quantile of the anchor's batch confidence on the clean source data), or auto "
                                       "= source on the digits stream, 0.92 with --data-dir."),
    ema_alpha: float = typer.Option(0.999, "--ema-alpha"),
    restore_p: float = typer.Option(0.01, "--restore-p"),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (paper: 1e-3)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="CIFAR-10-C / CIFAR-100-C folder (<corruption>.npy, "
                                                           "labels.npy) instead of the generated MNIST stream."),
    n_examples: int = typer.Option(None, "--n-examples", min=1, help="Images per corruption from --data-dir."),
    source: Path = typer.Option(None, "--source", help="Source weights (.safetensors with its .json card)."),
    seed: Seed = 1,
    out: Out = Path("runs/tta"),
    overwrite: Overwrite = False,
) -> None:
    """Continual test-time adaptation on a corruption stream: per-corruption errors, rounds, speed, report."""
    from engramlab.continual.tta import CoTTASettings
    from engramlab.continual.tta_study import TTAStudyOptions, run_tta_study

    methods = ["source", "bn", "tent", "cotta"] if method == "all" else _csv(method, "--method")
    if policy == "auto":
        policy = "cotta" if data_dir is not None else "cotta-no-flip"
    if threshold == "auto":
        threshold = "0.92" if data_dir is not None else "source"
    from_source = threshold == "source"
    try:
        gate = 0.0 if from_source else float(threshold)
    except ValueError:
        raise EngramError(f"--threshold must be a number in [0, 1] or 'source', got {threshold!r}.") from None
    settings = CoTTASettings(ema_alpha=ema_alpha, restore_p=restore_p, threshold=gate,
                             n_augmentations=n_augmentations, policy=policy)
    opts = TTAStudyOptions(methods=methods, setting=stream, rounds=rounds, severity=severity, batch_size=batch_size,
                           constants=constants, cotta=settings, lr=lr, data_dir=data_dir, n_examples=n_examples,
                           source=source, seed=seed, out=out, overwrite=overwrite, threshold_from_source=from_source)
    summary = run_tta_study(opts)
    grid = Table(title=f"{stream} stream, {rounds} round(s), severity {severity}")
    for column in ("method", "error %", "by round", "images/s"):
        grid.add_column(column)
    for m in summary["methods"]:
        by_round = " ".join(f"{v:.1f}" for v in summary["error_by_round"][m])
        grid.add_row(m, f"{summary['error_mean'][m]:.2f}", by_round, f"{summary['images_per_second'][m]:.0f}")
    console.print(grid)
    console.print(f"wrote {out}/summary.json, errors.parquet, report.html")


@app.command("train-source")
def train_source_command(
    out: Out = Path("runs/source"),
    epochs: int = typer.Option(10, "--epochs", min=1),
    seed: Seed = 2022,
    overwrite: Overwrite = False,
) -> None:
    """Rebuild the shipped source classifier (SmallResNet on the clean vendored MNIST training digits)."""
    from engramlab.continual.source_model import SourceRecipe, save_source, train_source
    from engramlab.results import prepare_out_dir

    folder = prepare_out_dir(out, overwrite)
    model, card = train_source(SourceRecipe(epochs=epochs, seed=seed))
    path = save_source(model, card, folder / "mnist_resnet.safetensors")
    console.print(f"clean test accuracy {card['clean_test_accuracy']:.3f}; wrote {path} and its .json card "
                  "(use it with `continual tta --source`).")
