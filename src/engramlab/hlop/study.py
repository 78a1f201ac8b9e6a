"""`engramlab continual hlop` end to end: a task stream, one network per method, the accuracy matrices, ACC/BWT,
step times, subspace leak, tables, summary and report (HLOP, Xiao et al., ICLR 2024, arXiv 2402.11984).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import nn

from engramlab.errors import EngramError
from engramlab.hlop.hebbian import row_schedule
from engramlab.hlop.methods import HLOP_PRESETS, METHODS, HLOPSettings, make_method
from engramlab.hlop.metrics import average_accuracy, backward_transfer
from engramlab.hlop.runner import MethodResult, TrainSettings, train_method
from engramlab.hlop.snn import SpikingCNN, SpikingMLP
from engramlab.hlop.streams import TaskStream, load_stream
from engramlab.hlop.subspace import layer_input_dim
from engramlab.report import Section, key_values, table, write_report
from engramlab.results import RunMarker, check_out_dir, prepare_out_dir, write_json, write_parquet

NEURON_MODES = {("lif", "bptt"): "lif", ("lif", "dsr"): "dsr", ("ann", "bptt"): "ann"}


@dataclass
class HLOPStudyOptions:
    """Options of `engramlab continual hlop` (defaults: the official PMNIST BPTT script, spec §2–3)."""

    stream: str = "pmnist"
    data_dir: Path | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    neuron: str = "lif"  # lif | ann
    train: str = "bptt"  # bptt | dsr (online-friendly DSR; lif only)
    n_tasks: int | None = None  # first n tasks of the stream (None: all)
    train_settings: TrainSettings = field(default_factory=TrainSettings)
    hlop: HLOPSettings | None = None  # None: the preset for the network (mlp / cnn)
    gpm_threshold: float = 0.97
    ewc_lambda: float = 100.0
    out: Path = Path("runs/hlop")
    overwrite: bool = False
    resume: bool = False


def neuron_mode(neuron: str, train: str) -> str:
    """The spiking-layer mode of engramlab.hlop.snn for a (--neuron, --train) pair."""
    if (neuron, train) not in NEURON_MODES:
        raise EngramError(
            f"--neuron {neuron} --train {train} is not a valid pair; choose --neuron lif with --train "
            "bptt or dsr, or --neuron ann (trained by plain backprop: --train bptt)."
        )
    return NEURON_MODES[(neuron, train)]


def network_factory(stream: TaskStream, mode: str) -> tuple[Callable[[], nn.Module], str]:
    """The spec's network for a stream (§2 "Architectures"): the MLP for MNIST streams (shared head), the CNN for
    image streams (one head per task); returns the factory and the HLOP preset name."""
    if stream.input_shape == (784,):
        n_classes = max(t.n_classes for t in stream.tasks)
        return (lambda: SpikingMLP((784, 800, 800, n_classes), neuron=mode)), "mlp"
    if stream.input_shape == (3, 32, 32):
        n_classes = max(t.n_classes for t in stream.tasks)
        return (lambda: SpikingCNN(len(stream.tasks), n_classes, neuron=mode)), "cnn"
    raise EngramError(
        f"stream {stream.name} has inputs of shape {stream.input_shape}; engramlab has networks for "
        "784-pixel MNIST rows and 3x32x32 images."
    )


def _check_settings(opts: HLOPStudyOptions) -> None:
    """Optimiser and method settings a library caller may pass too (the CLI checks them as it parses)."""
    t = opts.train_settings
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise EngramError(f"--lr must be a finite number > 0, got {t.lr}.")
    if not (math.isfinite(t.momentum) and 0 <= t.momentum < 1):
        raise EngramError(f"--momentum must be in [0, 1), got {t.momentum}.")
    if not (math.isfinite(opts.ewc_lambda) and opts.ewc_lambda >= 0):
        raise EngramError(f"--ewc-lambda must be a finite number >= 0, got {opts.ewc_lambda}.")
    if not (math.isfinite(opts.gpm_threshold) and 0 < opts.gpm_threshold <= 1):
        raise EngramError(f"--gpm-threshold must be in (0, 1], got {opts.gpm_threshold}.")
    if t.epochs < 1 or t.batch_size < 1 or t.seed < 0:
        raise EngramError(
            f"--epochs and --batch-size must be >= 1 and --seed >= 0, got {t.epochs}, {t.batch_size}, {t.seed}."
        )


def check_capacity(settings: HLOPSettings, net: nn.Module, n_tasks: int) -> None:
    """HLOP's lateral neurons span a subspace of each protected layer's input (spec §1.2): after the last task a
    layer can hold at most as many rows as its input has dimensions."""
    layers = net.protected_layers()
    total = [0] * len(settings.initial)
    for task in range(n_tasks):
        total = [a + b for a, b in zip(total, row_schedule(settings.initial, settings.increments, task), strict=False)]
    if len(total) != len(layers):
        raise EngramError(
            f"--lateral-neurons has {len(settings.initial)} entries but the network has {len(layers)} protected layers."
        )
    for i, (rows, layer) in enumerate(zip(total, layers, strict=True)):
        width = layer_input_dim(layer)
        if rows > width:
            raise EngramError(
                f"--lateral-neurons / --lateral-increment: protected layer {i} would hold {rows:,} lateral neurons "
                f"after {n_tasks} tasks, but its input has only {width} dimensions."
            )


def _marker_options(opts: HLOPStudyOptions) -> dict:
    """What `--resume` must match: every option but the folder and the overwrite / resume switches."""
    return {k: v for k, v in asdict(opts).items() if k not in ("out", "overwrite", "resume")}


def run_hlop_study(opts: HLOPStudyOptions) -> dict:
    """Train every method on the stream and write accuracy.parquet, leak.parquet, summary.json and report.html."""
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise EngramError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}.")
    mode = neuron_mode(opts.neuron, opts.train)
    _check_settings(opts)
    run = RunMarker("continual hlop", _marker_options(opts), opts.resume)
    check_out_dir(opts.out, opts.overwrite, run)
    stream = load_stream(opts.stream, opts.data_dir)
    if opts.n_tasks is not None:
        if not 1 <= opts.n_tasks <= len(stream.tasks):
            raise EngramError(
                f"--tasks must be in 1..{len(stream.tasks)} for stream {stream.name}, got {opts.n_tasks}."
            )
        stream.tasks = stream.tasks[: opts.n_tasks]
    build_net, preset = network_factory(stream, mode)
    hlop_settings = opts.hlop or HLOP_PRESETS[preset]
    if "hlop" in opts.methods:
        check_capacity(hlop_settings, build_net(), len(stream.tasks))
    out = prepare_out_dir(opts.out, opts.overwrite, run)
    results = {}
    for name in opts.methods:
        method = make_method(
            name,
            hlop=hlop_settings,
            gpm_threshold=opts.gpm_threshold,
            ewc_lambda=opts.ewc_lambda,
            seed=opts.train_settings.seed,
        )
        results[name] = train_method(method, stream, build_net, opts.train_settings, out / "checkpoints")
    summary = _summary(opts, stream, mode, hlop_settings, results)
    write_parquet(out / "accuracy.parquet", _accuracy_rows(results))
    write_parquet(
        out / "leak.parquet",
        [row | {"method": r.method} for r in results.values() for row in r.leak]
        or {"method": [], "after_task": [], "layer": [], "task": [], "leak": [], "basis_rows": []},
    )
    write_json(out / "summary.json", summary)
    write_report(out / "report.html", f"HLOP continual learning on {stream.name}", _sections(results, summary), summary)
    return summary


def _accuracy_rows(results: dict[str, MethodResult]) -> list[dict]:
    return [
        {"method": name, "after_task": i, "task": j, "acc": float(r.acc[i, j])}
        for name, r in results.items()
        for i in range(r.acc.shape[0])
        for j in range(r.acc.shape[1])
        if r.acc[i, j] == r.acc[i, j]
    ]


def _summary(
    opts: HLOPStudyOptions, stream: TaskStream, mode: str, hlop: HLOPSettings, results: dict[str, MethodResult]
) -> dict:
    acc, bwt = {}, {}
    for name, r in results.items():
        acc[name] = average_accuracy(r.acc)
        bwt[name] = None if r.acc.shape[0] == 1 or name == "multitask" else backward_transfer(r.acc)
    return {
        "stream": stream.name,
        "n_tasks": len(stream.tasks),
        "neuron": opts.neuron,
        "train": opts.train,
        "snn_mode": mode,
        "methods": list(results),
        "acc": acc,
        "bwt": bwt,
        "ms_per_step": {name: r.ms_per_step for name, r in results.items()},
        "ms_per_step_by_task": {name: r.ms_per_step_by_task for name, r in results.items()},
        "final_leak_mean": {name: _mean_final_leak(r) for name, r in results.items() if r.leak},
        "settings": {
            "train": asdict(opts.train_settings),
            "hlop": asdict(hlop),
            "gpm_threshold": opts.gpm_threshold,
            "ewc_lambda": opts.ewc_lambda,
        },
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def _mean_final_leak(result: MethodResult) -> float:
    """Mean over layers and earlier tasks of the activity energy the final projection lets through."""
    last = max(row["after_task"] for row in result.leak)
    rows = [row["leak"] for row in result.leak if row["after_task"] == last]
    return sum(rows) / len(rows)


def _sections(results: dict[str, MethodResult], summary: dict) -> list[Section]:
    rows = [
        {
            "method": m,
            "ACC (%)": 100 * summary["acc"][m],
            "BWT (points)": "n/a" if summary["bwt"][m] is None else 100 * summary["bwt"][m],
            "ms per step": summary["ms_per_step"][m],
        }
        for m in results
    ]
    head = Section(
        "Accuracy and forgetting",
        "<p>ACC = mean accuracy over all tasks after the last one; BWT = mean change of each earlier "
        "task's accuracy from just after learning it to the end (spec §3). Multitask trains on every task "
        "at once (upper bound), so it has no BWT.</p>",
        tables=[
            table(rows),
            key_values(
                {
                    "stream": summary["stream"],
                    "tasks": summary["n_tasks"],
                    "neuron": summary["neuron"],
                    "training": summary["train"],
                }
            ),
        ],
        figures=[acc_bwt_bars(summary), task_curves(results)],
    )
    sections = [head, Section("Accuracy matrices", figures=[accuracy_heatmaps(results)])]
    leaky = {m: r for m, r in results.items() if r.leak}
    if leaky:
        sections.append(
            Section(
                "Subspace leak",
                "<p>Share of each earlier task's presynaptic activity energy that the projection lets through after "
                "the last task (‖x − xOᵀO‖²/‖x‖², per layer; 1 − leak = captured energy). Issue 9 measured 20–38% for "
                "the literal Hebbian rule and 0.5–4.5% for SVD bases.</p>",
                figures=[leak_plot(leaky)],
            )
        )
    return sections


def acc_bwt_bars(summary: dict) -> go.Figure:
    """ACC and BWT (points) per method, side by side."""
    methods = summary["methods"]
    fig = go.Figure(
        [
            go.Bar(name="ACC", x=methods, y=[100 * summary["acc"][m] for m in methods]),
            go.Bar(
                name="BWT",
                x=methods,
                y=[None if summary["bwt"][m] is None else 100 * summary["bwt"][m] for m in methods],
            ),
        ]
    )
    fig.update_layout(
        barmode="group",
        title=f"{summary['stream']}, {summary['n_tasks']} tasks: ACC and BWT",
        yaxis_title="points",
        height=360,
    )
    return fig


def task_curves(results: dict[str, MethodResult]) -> go.Figure:
    """One panel per method: accuracy on each task (a line per task) after each training stage."""
    fig = make_subplots(rows=1, cols=len(results), subplot_titles=list(results), shared_yaxes=True)
    for col, r in enumerate(results.values(), start=1):
        n = r.acc.shape[0]
        for j in range(n):
            stages = [i for i in range(j, n) if r.acc[i, j] == r.acc[i, j]]
            fig.add_trace(
                go.Scatter(
                    x=stages,
                    y=[r.acc[i, j] for i in stages],
                    mode="lines+markers",
                    name=f"task {j}",
                    legendgroup=f"task {j}",
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
    fig.update_yaxes(range=[0, 1], title_text="accuracy", row=1, col=1)
    fig.update_xaxes(title_text="after task")
    fig.update_layout(title="Per-task accuracy during the stream", height=380)
    return fig


def accuracy_heatmaps(results: dict[str, MethodResult]) -> go.Figure:
    fig = make_subplots(rows=1, cols=len(results), subplot_titles=list(results))
    for col, r in enumerate(results.values(), start=1):
        fig.add_trace(
            go.Heatmap(z=r.acc, zmin=0, zmax=1, colorscale="Viridis", showscale=col == len(results)), row=1, col=col
        )
        fig.update_yaxes(autorange="reversed", title_text="after task" if col == 1 else None, row=1, col=col)
    fig.update_xaxes(title_text="task evaluated")
    fig.update_layout(title="acc[i][j]: after task i, on task j", height=340)
    return fig


def leak_plot(results: dict[str, MethodResult]) -> go.Figure:
    fig = go.Figure()
    for name, r in results.items():
        last = max(row["after_task"] for row in r.leak)
        for layer in sorted({row["layer"] for row in r.leak}):
            rows = sorted(
                (row["task"], row["leak"]) for row in r.leak if row["after_task"] == last and row["layer"] == layer
            )
            fig.add_trace(
                go.Scatter(
                    x=[t for t, _ in rows], y=[v for _, v in rows], mode="lines+markers", name=f"{name} layer {layer}"
                )
            )
    fig.update_layout(
        title="Leak after the last task, per earlier task",
        xaxis_title="task",
        yaxis_title="energy let through",
        height=360,
    )
    return fig
