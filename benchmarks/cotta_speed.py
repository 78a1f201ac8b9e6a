"""CoTTA throughput: engramlab's batched teacher augmentation vs the official loop, at equal error.

    python benchmarks/cotta_speed.py [--images 200 --batch 100 --seeds 3 --threads 1]

Same source model (the shipped MNIST SmallResNet), same corruption stream (the 15 corruptions at severity 5,
`--images` clean digits each, CIFAR-10-C constants), same hyper-parameters (the digits stream's settings of
`engramlab continual tta`: policy cotta-no-flip, threshold from the source data). Variants, each run through the
whole stream from the same start, once per seed (the two CoTTAs draw their augmentations in a different order, so
their errors can only agree in distribution: compare the means over seeds):
  official   a faithful sequential re-implementation of qinenergy/cotta's CIFAR `forward_and_adapt`: N = 32 separate
             (augment one view -> teacher forward) calls on every batch, run even when the anchor is confident
  engramlab  engramlab.tta.methods.CoTTA: the N views generated in one vectorised pass, teacher passes in a
             per-view-BN forward under no_grad, skipped when the anchor is confident (their result is unused then)
  tent, bn   for context
Prints images/second and error (mean ± std over seeds) of each, and the speed-up engramlab/official (target >= 2x
at equal error, within 0.5 points; issue 8).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from engramlab.tta.augment import augment_one
from engramlab.tta.methods import CoTTA, CoTTASettings, make_tta_method, source_confidence_threshold
from engramlab.tta.source_model import load_source, mnist_rgb32_split
from engramlab.tta.streams import build_stream


class OfficialLoopCoTTA(CoTTA):
    """CoTTA with the teacher target computed as the official CIFAR code does (spec §1.2 steps 2–5)."""

    name = "official"

    @torch.no_grad()
    def teacher_target(self, x: torch.Tensor) -> torch.Tensor:
        confidence = self.anchor(x).softmax(1).max(1).values.mean()
        standard = self.teacher(x)
        views = [
            self.teacher(augment_one(x, self.policy, self.generator)) for _ in range(self.settings.n_augmentations)
        ]
        averaged = torch.stack(views).mean(0)
        self.last_gate = bool(confidence < self.settings.threshold)
        return averaged if self.last_gate else standard


def run(method, stream_args: dict) -> tuple[float, float]:
    """(images per second, error %) of one method over the whole stream."""
    wrong = total = 0
    seconds = 0.0
    for batch in build_stream(**stream_args):
        start = time.perf_counter()
        logits = method.adapt_and_predict(batch.x)
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
    settings = CoTTASettings(policy="cotta-no-flip", threshold=source_confidence_threshold(source, x_train, args.batch))
    builders = {
        "official": lambda seed: OfficialLoopCoTTA(copy.deepcopy(source), settings, seed=seed),
        "engramlab": lambda seed: make_tta_method("cotta", source, settings, seed=seed),
        "tent": lambda seed: make_tta_method("tent", source),
        "bn": lambda seed: make_tta_method("bn", source),
    }
    print(
        f"CoTTA speed, shipped MNIST SmallResNet, {args.images} digits x 15 corruptions, batch {args.batch}, "
        f"{args.seeds} seed(s), {args.threads} thread(s), {cpu_name()}"
    )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in builders}
    for seed in range(args.seeds):
        for name in ("official", "engramlab") if seed else builders:  # tent and bn are deterministic: one run
            torch.manual_seed(seed)
            results[name].append(run(builders[name](seed), stream_args))
    for name, runs in results.items():
        speed, err = statistics.mean(r[0] for r in runs), [r[1] for r in runs]
        spread = f" ± {statistics.stdev(err):.2f}" if len(err) > 1 else ""
        print(f"{name:>10}: {speed:8.1f} images/s   error {statistics.mean(err):6.2f}{spread} %")
    fast, slow = (statistics.mean(r[0] for r in results[k]) for k in ("engramlab", "official"))
    gap = statistics.mean(r[1] for r in results["engramlab"]) - statistics.mean(r[1] for r in results["official"])
    print(f"speed-up engramlab/official: {fast / slow:.2f}x   error difference (means): {gap:+.2f} points")


if __name__ == "__main__":
    main()
