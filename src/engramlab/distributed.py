"""torchrun support: every study runs the same under `torchrun --nproc_per_node N -m engramlab ...`.

Each process takes a shard of the prompts; statistics are merged with `engramlab.stats` (all-reduce) so every
rank ends with the statistics of the whole data set. Without torchrun's environment this is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env() -> bool:
    """Start the process group when launched by torchrun (RANK/WORLD_SIZE set); return whether it is running."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Only rank 0 writes result files."""
    return rank() == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's strided share of `items` (rank r takes r, r + N, r + 2N, ...)."""
    return items[rank() :: world_size()]
