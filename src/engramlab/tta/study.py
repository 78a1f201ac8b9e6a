"""`engramlab continual tta` end to end: a corruption stream, each method adapting online from the same source
model, the paper-style error table, error over time and rounds, speed, and CoTTA's diagnostics
(CoTTA, Wang et al., CVPR 2022, arXiv 2203.13591, §4).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import plotly.graph_objects as go
import torch

from engramlab.data.corruptions import CORRUPTIONS
from engramlab.data.image_benchmarks import check_corruption_dir
from engramlab.errors import EngramError
from engramlab.progress import track
from engramlab.report import Section, key_values, table, write_report
from engramlab.results import check_out_dir, prepare_out_dir, write_json, write_parquet
from engramlab.tta.methods import TTA_METHODS, CoTTA, CoTTASettings, make_tta_method, source_confidence_threshold
from engramlab.tta.source_model import load_source, mnist_rgb32_split
from engramlab.tta.streams import StreamBatch, build_stream, stream_from_benchmark

PAPER_CIFAR10C = {"source": 43.5, "bn": 20.4, "tent": 20.7, "cotta": 16.2}  # CoTTA Table 2, error %, severity 5


@dataclass
class TTAStudyOptions:
    """Options of `engramlab continual tta` (defaults: CoTTA's CIFAR10-C settings on the shipped MNIST stream)."""

    methods: list[str] = field(default_factory=lambda: ["source", "bn", "tent", "cotta"])
    setting: str = "continual"  # continual | gradual | mixed
    rounds: int = 1
    severity: int = 5
    batch_size: int = 200  # CIFAR protocol (spec §1.6)
    constants: str = "cifar"  # corruption strength table for generated streams: cifar (CIFAR-10-C) | imagenet
    cotta: CoTTASettings = field(default_factory=CoTTASettings)
    threshold_from_source: bool = False  # replace cotta.threshold by source_confidence_threshold on clean train data
    lr: float = 1e-3
    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))
    n_images: int | None = None  # clean test digits per domain for the generated stream (None: all 1,000)
    data_dir: Path | None = None  # CIFAR-10-C / CIFAR-100-C folder instead of the generated MNIST stream
    n_examples: int | None = None  # images per corruption from --data-dir (None: all)
    source: Path | None = None  # source weights (safetensors + card); None: the shipped MNIST model
    seed: int = 1
    out: Path = Path("runs/tta")
    overwrite: bool = False


def _stream(opts: TTAStudyOptions):
    if opts.data_dir is not None:
        return stream_from_benchmark(
            opts.data_dir,
            opts.setting,
            opts.severity,
            opts.rounds,
            opts.batch_size,
            opts.n_examples,
            opts.seed,
            opts.corruptions,
        )
    _, _, x_test, y_test = mnist_rgb32_split()
    x_test, y_test = x_test[: opts.n_images], y_test[: opts.n_images]
    return build_stream(
        x_test,
        y_test,
        opts.setting,
        opts.severity,
        opts.rounds,
        opts.batch_size,
        opts.seed,
        opts.corruptions,
        opts.constants,
    )


def run_method(name: str, model: torch.nn.Module, opts: TTAStudyOptions) -> list[dict]:
    """Adapt one method through the whole stream; one record per (batch, corruption) with errors and timing."""
    torch.manual_seed(opts.seed)
    method = make_tta_method(name, model, opts.cotta, opts.lr, opts.seed)
    records = []
    for step, batch in enumerate(track(_stream(opts), f"{name}: test batches")):
        start = time.perf_counter()
        logits = method.adapt_and_predict(batch.x)
        seconds = time.perf_counter() - start
        wrong = (logits.argmax(1) != batch.y).float()
        gate = method.last_gate if isinstance(method, CoTTA) else None
        # CoTTA diagnostic (labels are used for reporting only): would the plain teacher have been right?
        wrong_plain = (method.last_plain.argmax(1) != batch.y).float() if isinstance(method, CoTTA) else None
        for corruption, mask in _domains(batch, opts.corruptions):
            records.append(
                {
                    "method": name,
                    "step": step,
                    "round": batch.round,
                    "corruption": corruption,
                    "severity": batch.severity,
                    "n": int(mask.sum()),
                    "wrong": float(wrong[mask].sum()),
                    "augmented": gate,
                    "seconds": seconds * float(mask.sum()) / len(batch.y),
                    "wrong_plain_teacher": None if wrong_plain is None else float(wrong_plain[mask].sum()),
                }
            )
    return records


def _domains(batch: StreamBatch, corruptions: list[str]):
    """(corruption, sample mask) pairs of a batch: one for a single-domain batch, several for a mixed one (whose
    sample_domains index the stream's list of corruptions)."""
    if batch.sample_domains is None:
        yield batch.corruption, torch.ones(len(batch.y), dtype=torch.bool)
        return
    for d in batch.sample_domains.unique().tolist():
        yield corruptions[d], batch.sample_domains == d


def _error_table(records: list[dict]) -> list[dict]:
    """Error (%) per method, round, corruption and severity (image-weighted)."""
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in records:
        key = (r["method"], r["round"], r["corruption"], r["severity"])
        sums[key][0] += r["wrong"]
        sums[key][1] += r["n"]
    return [
        {"method": m, "round": rd, "corruption": c, "severity": s, "error": 100 * w / n, "n": int(n)}
        for (m, rd, c, s), (w, n) in sums.items()
    ]


def _summary(opts: TTAStudyOptions, records: list[dict], n_steps: int) -> dict:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    error_mean, error_by_round, speed = {}, {}, {}
    for m, rows in by_method.items():
        error_mean[m] = 100 * sum(r["wrong"] for r in rows) / sum(r["n"] for r in rows)
        error_by_round[m] = [
            100 * sum(r["wrong"] for r in rows if r["round"] == k) / sum(r["n"] for r in rows if r["round"] == k)
            for k in range(opts.rounds)
        ]
        speed[m] = sum(r["n"] for r in rows) / sum(r["seconds"] for r in rows)
    gates = {
        m: sum(bool(r["augmented"]) for r in rows) / len(rows)
        for m, rows in by_method.items()
        if rows[0]["augmented"] is not None
    }
    # On the batches where CoTTA used the augmented target: its error vs the plain teacher's on the same images.
    augmented_vs_plain = {}
    for m, rows in by_method.items():
        gated = [r for r in rows if r["augmented"]]
        if gated:
            n = sum(r["n"] for r in gated)
            augmented_vs_plain[m] = {
                "error_augmented_target": 100 * sum(r["wrong"] for r in gated) / n,
                "error_plain_teacher": 100 * sum(r["wrong_plain_teacher"] for r in gated) / n,
            }
    n_domains = len({(r["corruption"], r["severity"]) for r in records})
    return {
        "setting": opts.setting,
        "rounds": opts.rounds,
        "severity": opts.severity,
        "batch_size": opts.batch_size,
        "data": str(opts.data_dir) if opts.data_dir else f"vendored MNIST test digits, {opts.constants} constants",
        "methods": list(by_method),
        "error_mean": error_mean,
        "error_by_round": error_by_round,
        "images_per_second": speed,
        "augmentation_rate": gates,
        "augmented_vs_plain_on_gated_batches": augmented_vs_plain,
        "steps": n_steps,
        "steps_per_domain": n_steps / max(1, n_domains * opts.rounds),
        "ema_horizon_steps": 1 / (1 - opts.cotta.ema_alpha) if opts.cotta.ema_alpha < 1 else None,
        "cotta": asdict(opts.cotta),
        "threshold_from_source": opts.threshold_from_source,
        "lr": opts.lr,
        "seed": opts.seed,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def run_tta_study(opts: TTAStudyOptions) -> dict:
    """Run every method on the stream; write errors.parquet, summary.json and report.html into opts.out."""
    unknown = [m for m in opts.methods if m not in TTA_METHODS]
    if unknown:
        raise EngramError(f"--method: unknown method {unknown[0]!r}; choose from all, {', '.join(TTA_METHODS)}.")
    if opts.rounds < 1:
        raise EngramError(f"--rounds must be >= 1, got {opts.rounds}.")
    _check_corruptions(opts.corruptions)
    if opts.data_dir is not None:
        if opts.source is None:
            raise EngramError(
                "--data-dir needs --source: weights of a classifier trained on that benchmark's clean "
                "images (the shipped source model knows MNIST digits only)."
            )
        check_corruption_dir(opts.data_dir, opts.corruptions)
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise EngramError(f"--lr must be a finite number > 0, got {opts.lr}.")
    check_out_dir(opts.out, opts.overwrite)
    model = load_source(opts.source)
    out = prepare_out_dir(opts.out, opts.overwrite)
    if opts.threshold_from_source:
        if opts.data_dir is not None:
            raise EngramError(
                "--threshold source needs the source training data, which engramlab has only for its "
                "own MNIST stream; pass a number with --data-dir."
            )
        x_train = mnist_rgb32_split()[0]
        opts = replace(
            opts, cotta=replace(opts.cotta, threshold=source_confidence_threshold(model, x_train, opts.batch_size))
        )
    records = []
    for name in opts.methods:
        records += run_method(name, model, opts)
    n_steps = 1 + max(r["step"] for r in records)
    errors = _error_table(records)
    summary = _summary(opts, records, n_steps)
    write_parquet(out / "errors.parquet", errors)
    write_parquet(out / "batches.parquet", records)
    write_json(out / "summary.json", summary)
    write_report(
        out / "report.html",
        "Continual test-time adaptation (CoTTA and baselines)",
        _sections(errors, summary, opts),
        summary,
    )
    return summary


def _check_corruptions(corruptions: list[str]) -> None:
    """One line naming every unknown or repeated name of --corruptions."""
    if not corruptions:
        raise EngramError("--corruptions needs at least one name.")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise EngramError(
            f"--corruptions: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(CORRUPTIONS)}."
        )
    repeated = sorted({c for c in corruptions if corruptions.count(c) > 1})
    if repeated:
        raise EngramError(f"--corruptions names {', '.join(map(repr, repeated))} more than once.")


def paper_table(errors: list[dict], round_: int) -> list[dict]:
    """Rows = methods, columns = corruptions (stream order) + mean, error % of one round (CoTTA Table 2 layout)."""
    columns = list(dict.fromkeys(e["corruption"] for e in errors))
    rows = []
    for m in dict.fromkeys(e["method"] for e in errors):
        cells = {e["corruption"]: e for e in errors if e["method"] == m and e["round"] == round_}
        row = {"method": m} | {c: cells[c]["error"] for c in columns if c in cells}
        total = sum(e["error"] * e["n"] for e in cells.values()) / sum(e["n"] for e in cells.values())
        rows.append(row | {"mean": total})
    return rows


def error_over_time(errors: list[dict]) -> go.Figure:
    fig = go.Figure()
    for m in dict.fromkeys(e["method"] for e in errors):
        rows = [e for e in errors if e["method"] == m]
        fig.add_trace(
            go.Scatter(
                x=list(range(len(rows))),
                y=[e["error"] for e in rows],
                mode="lines+markers",
                name=m,
                text=[f"round {e['round'] + 1}, {e['corruption']} s{e['severity']}" for e in rows],
            )
        )
    fig.update_layout(
        title="Error per domain along the stream (all rounds)",
        xaxis_title="domain in stream order",
        yaxis_title="error %",
        height=420,
    )
    return fig


def error_by_round(summary: dict) -> go.Figure:
    fig = go.Figure()
    for m, values in summary["error_by_round"].items():
        fig.add_trace(go.Scatter(x=list(range(1, len(values) + 1)), y=values, mode="lines+markers", name=m))
    fig.update_layout(title="Mean error per round", xaxis_title="round", yaxis_title="error %", height=360)
    return fig


def _sections(errors: list[dict], summary: dict, opts: TTAStudyOptions) -> list[Section]:
    aggregated = errors
    if opts.setting == "gradual":  # several severities per corruption: average them per (method, round, corruption)
        aggregated = _merge_severities(errors)
    rounds = sorted({e["round"] for e in errors})
    tables = [
        f"<h3>Round {r + 1}</h3>" + table(paper_table(aggregated, r), digits=3) for r in sorted({rounds[0], rounds[-1]})
    ]
    headline = {m: round(v, 2) for m, v in summary["error_mean"].items()}
    context = (
        "<p>Error % (lower is better), severity "
        f"{opts.severity}, setting <b>{opts.setting}</b>, batch {opts.batch_size}. Source = no adaptation; "
        "BN = test-batch statistics; TENT = entropy minimisation of BN affine parameters (continual); CoTTA = "
        "EMA teacher, augmentation-averaged pseudo-labels, stochastic restore. Paper, CIFAR10-C (Table 2): "
        + ", ".join(f"{k} {v}" for k, v in PAPER_CIFAR10C.items())
        + ".</p>"
    )
    diag = {
        "EMA horizon 1/(1−α) (steps)": summary["ema_horizon_steps"],
        "steps in the stream": summary["steps"],
        "steps per domain": summary["steps_per_domain"],
    }
    diag |= {f"augmentation rate ({m})": v for m, v in summary["augmentation_rate"].items()}
    for m, v in summary["augmented_vs_plain_on_gated_batches"].items():
        diag |= {
            f"error % on augmented batches, augmented target ({m})": v["error_augmented_target"],
            f"error % on augmented batches, plain teacher ({m})": v["error_plain_teacher"],
        }
    return [
        Section("Error per corruption", context, tables=[*tables, key_values(headline)]),
        Section("Over time and rounds", figures=[error_over_time(errors), error_by_round(summary)]),
        Section(
            "CoTTA diagnostics",
            "<p>How far the teacher can move in this stream (EMA horizon vs its length), how often the "
            "anchor's confidence fell below the threshold, switching on the 32-view average, and whether that "
            "average was a better pseudo-label than the plain teacher prediction on those batches (labels used "
            "for this report only).</p>",
            tables=[
                key_values(diag),
                key_values({f"images/s ({m})": v for m, v in summary["images_per_second"].items()}),
            ],
        ),
    ]


def _merge_severities(errors: list[dict]) -> list[dict]:
    merged: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in errors:
        key = (e["method"], e["round"], e["corruption"])
        merged[key][0] += e["error"] * e["n"]
        merged[key][1] += e["n"]
    return [
        {"method": m, "round": r, "corruption": c, "severity": 0, "error": w / n, "n": int(n)}
        for (m, r, c), (w, n) in merged.items()
    ]
