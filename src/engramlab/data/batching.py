"""Minibatches over in-memory tensors, shared by the HLOP task streams and the CoTTA source-model training."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engramlab.errors import EngramError


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches `(x[idx], y[idx])` over one task, the last one possibly smaller; a seeded `generator` fixes
    the shuffled order (the official scripts cut batches from in-memory tensors the same way)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EngramError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if len(x) != len(y):
        raise EngramError(f"x and y must have the same length, got {len(x)} and {len(y)}.")
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
