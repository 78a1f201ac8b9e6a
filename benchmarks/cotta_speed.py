"""CoTTA throughput: engramlab's CoTTA against the official algorithm's loop, at equal error.

    python benchmarks/cotta_speed.py [--images 200 --batch 100 --seeds 3 --threads 1]

Same source model (the shipped MNIST SmallResNet), same corruption stream (the 15 corruptions at severity 5,
`--images` clean digits each, CIFAR-10-C constants), same hyper-parameters (the digits stream's settings of
`engramlab continual tta`: no flip, threshold from the source data). Variants, each run through the whole stream from
the same start, once per seed (the two CoTTAs draw their augmentations differently, so their errors can only agree in
distribution: compare the means over seeds):

  official     qinenergy/cotta's CIFAR `forward_and_adapt`, re-implemented in `tests/tta_reference.py` (the reference
               of the parity tests): on every batch, N = 32 sequential calls of `get_tta_transforms` (torchvision's
               tensor ops written out in plain torch, one op after another, on the contiguous batch) each followed by
               a teacher forward, run even when the anchor is confident; the model in the default memory layout;
               the restore masks drawn on the CPU
  official-cl  the same loop with the blur's depthwise convolution in channels_last: torchvision's call on a
               contiguous tensor takes a slow oneDNN path on CPUs (5-7x slower here); speed only, one seed
  engramlab    engramlab.tta.methods.CoTTA: the N views generated in one vectorised pass, teacher passes in
               per-view-BN forwards under no_grad, skipped when the anchor is confident (their result is unused then)
  tent, bn     for context
Prints images/second and error (mean ± std over seeds) of each, and the speed-up engramlab/official (target >= 2x
at equal error, within 0.5 points; issues 8 and 24).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from engramlab.tta.methods import CoTTASettings, make_tta_method, source_confidence_threshold
from engramlab.tta.source_model import load_source, mnist_rgb32_split
from engramlab.tta.streams import build_stream

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tta_reference import OfficialCoTTA, OfficialPolicy, OfficialTransform


def run(adapt, stream_args: dict) -> tuple[float, float]:
    """(images per second, error %) of one method over the whole stream; only the adapt call is timed."""
    wrong = total = 0
    seconds = 0.0
    for batch in build_stream(**stream_args):
        start = time.perf_counter()
        logits = adapt(batch.x)
        seconds += time.perf_counter() - start
        wrong += int((logits.argmax(1) != batch.y).sum())
        total += len(batch.y)
    return total / seconds, 100 * wrong / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="clean digits per corruption")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, _, x, y = mnist_rgb32_split()
    stream_args = {"x": x[: args.images], "y": y[: args.images], "batch_size": args.batch, "seed": 1}
    source = load_source()
    threshold = source_confidence_threshold(source, x_train, args.batch)
    settings = CoTTASettings(policy="cotta-no-flip", threshold=threshold)

    def official(seed: int, blur_memory_format: torch.memory_format = torch.contiguous_format):
        transform = OfficialTransform(
            OfficialPolicy(p_hflip=0.0), torch.Generator().manual_seed(seed), blur_memory_format
        )
        return OfficialCoTTA(
            copy.deepcopy(source), transform, ap=threshold, restore_generator=torch.Generator().manual_seed(seed)
        )

    builders = {
        "official": lambda seed: official(seed),
        "engramlab": lambda seed: make_tta_method("cotta", source, settings, seed=seed).adapt_and_predict,
        "official-cl": lambda seed: official(seed, torch.channels_last),
        "tent": lambda seed: make_tta_method("tent", source).adapt_and_predict,
        "bn": lambda seed: make_tta_method("bn", source).adapt_and_predict,
    }
    print(
        f"CoTTA speed, shipped MNIST SmallResNet, {args.images} digits x 15 corruptions, batch {args.batch}, "
        f"threshold {threshold:.4f}, {args.seeds} seed(s), {args.threads} thread(s), {cpu_name()}",
        flush=True,
    )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in builders}
    for seed in range(args.seeds):
        for name in ("official", "engramlab") if seed else builders:  # the others once: speed or context only
            torch.manual_seed(seed)
            results[name].append(run(builders[name](seed), stream_args))
            print(f"  seed {seed} {name}: {results[name][-1][0]:.1f} images/s, error {results[name][-1][1]:.2f} %")
    for name, runs in results.items():
        speed, err = statistics.mean(r[0] for r in runs), [r[1] for r in runs]
        spread = f" ± {statistics.stdev(err):.2f}" if len(err) > 1 else ""
        print(f"{name:>11}: {speed:8.1f} images/s   error {statistics.mean(err):6.2f}{spread} %  ({len(runs)} run(s))")
    speed = {k: statistics.mean(r[0] for r in results[k]) for k in results}
    gap = statistics.mean(r[1] for r in results["engramlab"]) - statistics.mean(r[1] for r in results["official"])
    print(
        f"speed-up engramlab/official: {speed['engramlab'] / speed['official']:.2f}x "
        f"(engramlab/official-cl: {speed['engramlab'] / speed['official-cl']:.2f}x)   "
        f"error difference (means): {gap:+.2f} points"
    )


if __name__ == "__main__":
    main()
