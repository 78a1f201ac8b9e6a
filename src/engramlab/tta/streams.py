"""Test streams for continual test-time adaptation: continual, gradual and mixed corruption sequences.

CoTTA (Wang et al., CVPR 2022, arXiv 2203.13591), protocol of §2 / §2.4 in `shared/papers/cotta.md`:

- "continual": the corruption types in order (default the 15 standard ones), each at one severity, no reset between
  them (`cifar/cifar10c.py`).
- "gradual": the first type runs severities 5, 4, 3, 2, 1; every later type 1, 2, 3, 4, 5, 4, 3, 2, 1, so the type
  changes at severity 1 (`cifar/cifar10c_gradual.py`). Every segment shows the whole image set again.
- "mixed": all (type, image) pairs at one severity shuffled together ("mixed_domains" of
  `mariodoebler/test-time-adaptation`).

Each sequence repeats `rounds` times. `build_stream` corrupts clean images on the fly with
`engramlab.data.corruptions`, the same clean images under every corruption (as CIFAR-C is made); `stream_from_benchmark`
reads the published CIFAR-10-C / CIFAR-100-C arrays instead. Both yield `StreamBatch`es. Images keep their given
order inside a domain (RobustBench does not shuffle CIFAR-C); shuffle the clean set once beforehand if wanted.

Reproducibility without holding a corrupted copy of the data set: the images of one domain are corrupted in blocks of
`BLOCK` images, each with its own generator seeded from (seed, round, corruption, severity, block), so a stream is
the same on every run and for every batch size (a mixed batch is seeded per batch instead, since its images come
from all domains).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from engramlab.data.corruptions import CONSTANT_SETS, CORRUPTIONS, corrupt
from engramlab.errors import EngramError

SETTINGS = ("continual", "gradual", "mixed")
BLOCK = 256  # images corrupted per generator seed
MIXED = "mixed"


@dataclass(frozen=True)
class StreamBatch:
    """One test batch of a stream.

    round: 0-based repetition of the whole sequence; domain_index: position of `corruption` in the stream's list of
    corruptions (-1 for a mixed batch, whose per-image domains are in `sample_domains`); corruption: the type's name,
    or "mixed"; severity 1-5; x: images [B, 3, H, W] in [0, 1]; y: labels [B] int64.
    """

    round: int
    domain_index: int
    corruption: str
    severity: int
    x: torch.Tensor
    y: torch.Tensor
    sample_domains: torch.Tensor | None = None  # mixed only: [B] int64 indices into the list of corruptions


def domain_sequence(
    setting: str, corruptions: Sequence[str] = CORRUPTIONS, severity: int = 5
) -> list[tuple[int, str, int]]:
    """The (domain_index, corruption, severity) segments of one round, in stream order (paper §2, §2.4).

    For "gradual", `severity` is the top level: the first type runs severity..1, later ones 1..severity..1.
    For "mixed", the listed segments are the domains that are mixed together.
    """
    corruptions = _check_common(setting, corruptions, severity)
    if setting == "gradual":
        down = list(range(severity, 0, -1))
        up_down = list(range(1, severity + 1)) + list(range(severity - 1, 0, -1))
        return [(i, name, s) for i, name in enumerate(corruptions) for s in (down if i == 0 else up_down)]
    return [(i, name, severity) for i, name in enumerate(corruptions)]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and the parts that name a block (stable across processes, unlike hash())."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def build_stream(
    x: torch.Tensor,
    y: torch.Tensor,
    setting: str = "continual",
    severity: int = 5,
    rounds: int = 1,
    batch_size: int = 200,
    seed: int = 1,
    corruptions: Sequence[str] = CORRUPTIONS,
    constants: str = "cifar",
) -> Iterator[StreamBatch]:
    """Yield the test batches of a corruption stream made from clean images x [N, 3, H, W] in [0, 1], labels y [N].

    `constants` picks the corruption strength table ("cifar" = CIFAR-10-C, "imagenet" = ImageNet-C); batch_size 200
    is the CIFAR protocol (64 for ImageNet-C). The last batch of a domain may be smaller.
    """
    corruptions = _check_common(setting, corruptions, severity)
    _check_run(rounds, batch_size, seed)
    if constants not in CONSTANT_SETS:
        raise EngramError(f"constants must be one of {', '.join(CONSTANT_SETS)}, got {constants!r}.")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise EngramError(f"x must be a float tensor [N, 3, H, W], got {_describe(x)}.")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
        raise EngramError(f"y must be a tensor [N] with N = {len(x)} (the images in x), got {_describe(y)}.")
    if len(x) == 0:
        raise EngramError("x holds no images; pass at least one clean image.")
    if x.min() < 0 or x.max() > 1:
        raise EngramError(f"x must hold images in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}].")
    return _stream(x, y, setting, severity, rounds, batch_size, seed, corruptions, constants)


def _stream(x, y, setting, severity, rounds, batch_size, seed, corruptions, constants) -> Iterator[StreamBatch]:
    segments = domain_sequence(setting, corruptions, severity)
    for r in range(rounds):
        if setting == MIXED:
            yield from _mixed_round(x, y, r, severity, batch_size, seed, corruptions, constants)
            continue
        for index, name, level in segments:
            blocks = (
                corrupt(
                    x[start : start + BLOCK],
                    name,
                    level,
                    torch.Generator().manual_seed(derive_seed(seed, r, name, level, b)),
                    constants,
                )
                for b, start in enumerate(range(0, len(x), BLOCK))
            )
            start = 0
            for xb in _rebatch(blocks, batch_size):
                yield StreamBatch(r, index, name, level, xb, y[start : start + len(xb)])
                start += len(xb)


def _rebatch(blocks: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Cut a sequence of tensors into batches of batch_size along dim 0 (the last one may be smaller)."""
    pending: list[torch.Tensor] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        while held >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            pending, held = [joined[batch_size:]], held - batch_size
    if held:
        yield torch.cat(pending)


def _mixed_round(x, y, r, severity, batch_size, seed, corruptions, constants) -> Iterator[StreamBatch]:
    """All (domain, image) pairs of one round in a seeded random order, corrupted batch by batch."""
    n = len(x)
    order = torch.randperm(len(corruptions) * n, generator=torch.Generator().manual_seed(derive_seed(seed, r, MIXED)))
    for b, start in enumerate(range(0, len(order), batch_size)):
        pairs = order[start : start + batch_size]
        domains, images = pairs // n, pairs % n  # pair p = domain p // N, image p % N
        xb = torch.empty((len(pairs), *x.shape[1:]), dtype=x.dtype, device=x.device)
        for d in domains.unique().tolist():
            rows = (domains == d).nonzero().squeeze(1)
            g = torch.Generator().manual_seed(derive_seed(seed, r, MIXED, corruptions[d], severity, b))
            xb[rows] = corrupt(x[images[rows]], corruptions[d], severity, g, constants)
        yield StreamBatch(r, -1, MIXED, severity, xb, y[images], sample_domains=domains)


def stream_from_benchmark(
    data_dir: str | os.PathLike,
    setting: str = "continual",
    severity: int = 5,
    rounds: int = 1,
    batch_size: int = 200,
    n_examples: int | None = None,
    seed: int = 1,
    corruptions: Sequence[str] = CORRUPTIONS,
) -> Iterator[StreamBatch]:
    """The same stream read from a CIFAR-10-C / CIFAR-100-C folder (`<data_dir>/<corruption>.npy`, `labels.npy`).

    Each domain is the first `n_examples` images of that corruption and severity in file order (RobustBench, no
    shuffling), read when the stream reaches it. "mixed" loads every domain of a round at once and shuffles the
    pairs with `seed`.
    """
    from engramlab.data.image_benchmarks import check_corruption_dir  # a sibling module; keep import light

    corruptions = _check_common(setting, corruptions, severity)
    _check_run(rounds, batch_size, seed)
    check_corruption_dir(data_dir, corruptions)  # fail now, not after half a run
    return _benchmark_stream(data_dir, setting, severity, rounds, batch_size, n_examples, seed, corruptions)


def _benchmark_stream(
    data_dir, setting, severity, rounds, batch_size, n_examples, seed, corruptions
) -> Iterator[StreamBatch]:
    from engramlab.data.image_benchmarks import load_corruption_benchmark  # a sibling module; keep import light

    segments = domain_sequence(setting, corruptions, severity)
    for r in range(rounds):
        if setting != MIXED:
            for index, name, level in segments:
                x, y = load_corruption_benchmark(data_dir, name, level, n_examples)
                for start in range(0, len(x), batch_size):
                    yield StreamBatch(
                        r, index, name, level, x[start : start + batch_size], y[start : start + batch_size]
                    )
            continue
        loaded = [load_corruption_benchmark(data_dir, name, level, n_examples) for _, name, level in segments]
        xs = torch.cat([x for x, _ in loaded])
        ys = torch.cat([y for _, y in loaded])
        domains = torch.cat([torch.full((len(y),), i, dtype=torch.int64) for i, (_, y) in enumerate(loaded)])
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(derive_seed(seed, r, MIXED)))
        for start in range(0, len(order), batch_size):
            pick = order[start : start + batch_size]
            yield StreamBatch(r, -1, MIXED, severity, xs[pick], ys[pick], sample_domains=domains[pick])


def _check_common(setting: str, corruptions: Sequence[str], severity: int) -> tuple[str, ...]:
    if setting not in SETTINGS:
        raise EngramError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}.")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise EngramError(f"severity must be an integer from 1 to 5, got {severity!r}.")
    if isinstance(corruptions, str):
        raise EngramError(
            f"corruptions must be a sequence of names, got the string {corruptions!r}; wrap it in a list."
        )
    corruptions = tuple(corruptions)
    if not corruptions:
        raise EngramError("corruptions is empty; pass at least one corruption name.")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise EngramError(f"unknown corruption {unknown[0]!r} in corruptions; choose from {', '.join(CORRUPTIONS)}.")
    return corruptions


def _check_run(rounds: int, batch_size: int, seed: int) -> None:
    for name, value, low in (("rounds", rounds, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise EngramError(f"{name} must be an integer >= {low}, got {value!r}.")


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
