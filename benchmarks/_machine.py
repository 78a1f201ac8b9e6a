"""What machine a benchmark ran on, for the line it prints (shared by the benchmark scripts)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def interleaved_medians(
    variants: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], object] | None = None
) -> dict[str, float]:
    """Median seconds of each variant, run side by side: one warm-up each, then `repeats` rounds with the order
    rotated every round, so drift on a noisy machine lands on every variant alike. `sync` (e.g.
    torch.cuda.synchronize) is called around every timed call."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    names = list(variants)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            if sync:
                sync()
            start = time.perf_counter()
            variants[name]()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def recording_variants(engine, model, batch: dict, wide_name: str) -> dict[str, Callable[[], object]]:
    """A plain forward, one recording every layer's neuron values (`mlp.act`, mean over non-pad tokens) and one
    recording gate, up and down outputs (paper 1's units) under `wide_name`: what the hook benchmarks compare."""

    def plain():
        model(**batch)

    def act():
        with engine.record("mlp.act", None, positions="nonpad", reduce="mean"):
            model(**batch)

    def wide():
        with engine.record(["mlp.gate", "mlp.up", "mlp.down"], None, positions="nonpad", reduce="mean"):
            model(**batch)

    return {"plain": plain, "act": act, wide_name: wide}


def print_ratios(medians: dict[str, float], width: int = 10) -> None:
    """One line per variant: its median in ms and its ratio to the `plain` variant."""
    for name, median in medians.items():
        print(f"{name:{width}s} {median * 1000:9.1f} ms   ratio to plain {median / medians['plain']:.3f}")
