"""`engramlab continual tta` and `continual train-source`: thin typer commands over `engramlab.tta` (registered by
`engramlab.continual.cli`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from engramlab.cli_options import Out, Overwrite, Seed, comma_list, positive, probability
from engramlab.errors import EngramError

console = Console()


def tta(
    method: str = typer.Option(
        "all",
        "--method",
        help="all (source,bn,tent,cotta), or a comma list of: source, bn, tent, cotta, cotta-no-aug, cotta-no-restore.",
    ),
    stream: str = typer.Option("continual", "--stream", help="continual, gradual or mixed."),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Repetitions of the whole corruption sequence."),
    severity: int = typer.Option(5, "--severity", min=1, max=5),
    batch_size: int = typer.Option(200, "--batch-size", min=1, help="Test batch (paper CIFAR: 200)."),
    constants: str = typer.Option("cifar", "--constants", help="Corruption strength: cifar (CIFAR-10-C) or imagenet."),
    policy: str = typer.Option(
        "auto",
        "--policy",
        help="CoTTA augmentation preset: cotta (paper), cotta-no-flip, soft; auto = "
        "cotta-no-flip on the digits stream (a mirrored digit is another digit), cotta "
        "with --data-dir.",
    ),
    n_augmentations: int = typer.Option(32, "--augmentations", min=1),
    threshold: str = typer.Option(
        "auto",
        "--threshold",
        help="Anchor-confidence gate: a number (paper CIFAR10-C: 0.92), 'source' (the 5% "
        "quantile of the anchor's batch confidence on the clean source data), or auto "
        "= source on the digits stream, 0.92 with --data-dir.",
    ),
    ema_alpha: float = typer.Option(0.999, "--ema-alpha", callback=probability),
    restore_p: float = typer.Option(0.01, "--restore-p", callback=probability),
    lr: float = typer.Option(1e-3, "--lr", callback=positive, help="Adam learning rate (paper: 1e-3)."),
    data_dir: Path = typer.Option(
        None,
        "--data-dir",
        help="CIFAR-10-C / CIFAR-100-C folder (<corruption>.npy, labels.npy) instead of the generated MNIST stream.",
    ),
    n_examples: int = typer.Option(None, "--n-examples", min=1, help="Images per corruption from --data-dir."),
    corruptions: str = typer.Option(
        "all",
        "--corruptions",
        help="all (the 15 in the standard order), or a comma list of them, run in the given order; with --data-dir "
        "only the named <corruption>.npy files must exist.",
    ),
    source: Path = typer.Option(None, "--source", help="Source weights (.safetensors with its .json card)."),
    seed: Seed = 1,
    out: Out = Path("runs/tta"),
    overwrite: Overwrite = False,
) -> None:
    """Continual test-time adaptation on a corruption stream: per-corruption errors, rounds, speed, report."""
    from engramlab.data.corruptions import CORRUPTIONS
    from engramlab.tta.methods import CoTTASettings
    from engramlab.tta.study import TTAStudyOptions, run_tta_study

    methods = ["source", "bn", "tent", "cotta"] if method == "all" else comma_list(method, "--method")
    if policy == "auto":
        policy = "cotta" if data_dir is not None else "cotta-no-flip"
    if threshold == "auto":
        threshold = "0.92" if data_dir is not None else "source"
    from_source = threshold == "source"
    try:
        gate = 0.0 if from_source else float(threshold)
    except ValueError:
        gate = float("nan")
    if not 0 <= gate <= 1:  # also refuses nan
        raise EngramError(f"--threshold must be a number in [0, 1] or 'source', got {threshold!r}.")
    settings = CoTTASettings(
        ema_alpha=ema_alpha, restore_p=restore_p, threshold=gate, n_augmentations=n_augmentations, policy=policy
    )
    opts = TTAStudyOptions(
        methods=methods,
        setting=stream,
        rounds=rounds,
        severity=severity,
        batch_size=batch_size,
        constants=constants,
        cotta=settings,
        lr=lr,
        data_dir=data_dir,
        n_examples=n_examples,
        corruptions=list(CORRUPTIONS) if corruptions == "all" else comma_list(corruptions, "--corruptions"),
        source=source,
        seed=seed,
        out=out,
        overwrite=overwrite,
        threshold_from_source=from_source,
    )
    summary = run_tta_study(opts)
    grid = Table(title=f"{stream} stream, {rounds} round(s), severity {severity}")
    for column in ("method", "error %", "by round", "images/s"):
        grid.add_column(column)
    for m in summary["methods"]:
        by_round = " ".join(f"{v:.1f}" for v in summary["error_by_round"][m])
        grid.add_row(m, f"{summary['error_mean'][m]:.2f}", by_round, f"{summary['images_per_second'][m]:.0f}")
    console.print(grid)
    console.print(f"wrote {out}/summary.json, errors.parquet, report.html")


def train_source(
    out: Out = Path("runs/source"),
    epochs: int = typer.Option(10, "--epochs", min=1),
    seed: Seed = 2022,
    overwrite: Overwrite = False,
) -> None:
    """Rebuild the shipped source classifier (SmallResNet on the clean vendored MNIST training digits)."""
    from engramlab.results import check_out_dir, prepare_out_dir
    from engramlab.tta.source_model import SourceRecipe, save_source, train_source

    check_out_dir(out, overwrite)
    model, card = train_source(SourceRecipe(epochs=epochs, seed=seed))
    folder = prepare_out_dir(out, overwrite)
    path = save_source(model, card, folder / "mnist_resnet.safetensors")
    console.print(
        f"clean test accuracy {card['clean_test_accuracy']:.3f}; wrote {path} and its .json card "
        "(use it with `continual tta --source`)."
    )
