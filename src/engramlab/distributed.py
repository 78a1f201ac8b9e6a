"""torchrun support: the data-heavy studies run data-parallel under `torchrun --nproc_per_node N -m engramlab ...`.

Every rank runs the same study code on the same inputs; only the expensive loops are split. The unit of work is
the batch a single process would run: batch b goes to rank b mod N (`map_batches`, `batch_rows`), so every
forward pass sees exactly the rows, padding and shapes of the one-process run, and the gathered results equal it
(bit for bit where the kernels are deterministic). Results are gathered back in batch order on every rank, so
what follows a loop (AP, summaries, plots) is computed identically everywhere; only rank 0 writes files
(`engramlab.results`) and draws progress bars (`engramlab.progress`).

Without torchrun's environment (WORLD_SIZE unset or 1) every function here is a no-op: one rank, all batches.
gloo is used on CPU, NCCL on GPUs (each rank on `cuda:LOCAL_RANK`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from engramlab.errors import EngramError
from engramlab.progress import track

T = TypeVar("T")
R = TypeVar("R")


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


def shutdown() -> None:
    """End the process group (at the end of a torchrun command), so that no rank leaves it dangling."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_running() -> bool:
    """Whether more than one rank is working on this command."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Only rank 0 writes result files and draws progress bars."""
    return rank() == 0


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's strided share of `items` (rank r takes r, r + N, r + 2N, ...)."""
    return items[rank() :: world_size()]


def local_device() -> torch.device | None:
    """`cuda:LOCAL_RANK` for a data-parallel rank on a GPU machine, else None (the caller's own choice stands)."""
    if is_running() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


def _comm_device() -> torch.device:
    """Where tensors for a collective must live: the rank's GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------------
# Splitting batches and gathering their results


def batch_rows(n_rows: int, batch_size: int, of_rank: int | None = None) -> np.ndarray:
    """The row indices rank `of_rank` (default: this rank) processes when `n_rows` rows run in batches of
    `batch_size`: whole batches, batch b on rank b mod N, in order. With one rank: every row."""
    r = rank() if of_rank is None else of_rank
    starts = range(0, n_rows, batch_size)[r :: world_size()]
    mine = [np.arange(s, min(s + batch_size, n_rows)) for s in starts]
    return np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj` (picklable, small: per-batch results, not weight matrices), in rank order."""
    if not is_running():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def map_batches(items: Sequence[T], fn: Callable[[T], R], description: str | None = None) -> list[R]:
    """`[fn(x) for x in items]`, with item i computed on rank i mod N and every result gathered back to every rank
    in the order of `items`. `items` are the batches (or jobs) one process would run one after another; `fn` must
    return something picklable (numpy arrays, lists, floats) and must not itself call a collective. A progress bar
    named `description` counts this rank's share (drawn on rank 0 only)."""
    n, world = len(items), world_size()
    mine = [items[i] for i in range(rank(), n, world)]
    seq = track(mine, description, total=len(mine)) if description else mine
    local = [fn(x) for x in seq]
    if world == 1:
        return local
    out: list = [None] * n
    for r, part in enumerate(gather_objects(local)):
        out[r::world] = part
    return out


def on_main(fn: Callable[..., R], *args, **kwargs) -> R | None:
    """Run `fn` on rank 0 only (e.g. preparing the output folder) while the other ranks wait. If it raises an
    `EngramError`, every rank raises it, so that every rank stops at once with the same sentence (printed once, by
    rank 0: see `engramlab.cli.main`). Returns fn's result on rank 0 and None elsewhere."""
    if not is_running():
        return fn(*args, **kwargs)
    result, message = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except EngramError as err:
            message = str(err)
    shared = [message]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise SharedError(shared[0])
    return result


class SharedError(EngramError):
    """An `EngramError` every rank raises together (see `on_main`); the CLI prints it on rank 0 only."""


# ------------------------------------------------------------------------------------------------------------------
# Redistributing rows: each rank holds the rows of its batches, a column block needs every row


def gather_rows_to(owner: int, block: np.ndarray, rows_of: Sequence[np.ndarray], n_rows: int) -> np.ndarray | None:
    """Collect the row blocks of every rank on rank `owner`. Rank r passes its `block` [n_r, C], the rows
    `rows_of[r]` of a `n_rows`-row matrix (`rows_of` lists every rank's row indices, e.g. from `batch_rows`);
    `owner` gets the whole `[n_rows, C]` matrix in row order, the other ranks None. A collective: every rank calls
    it with the same `owner` and column count. The blocks travel as float32 tensors (gloo on CPU, NCCL on GPU)."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    if not is_running():
        full = np.empty((n_rows, block.shape[1]), dtype=np.float32)
        full[rows_of[0]] = block
        return full
    device = _comm_device()
    width = max(len(r) for r in rows_of)
    padded = torch.zeros(width, block.shape[1], dtype=torch.float32, device=device)  # [max n_r, C]
    padded[: block.shape[0]] = torch.from_numpy(block).to(device)
    parts = [torch.empty_like(padded) for _ in rows_of] if rank() == owner else None
    dist.gather(padded, parts, dst=owner)
    if rank() != owner:
        return None
    full = np.empty((n_rows, block.shape[1]), dtype=np.float32)
    for part, idx in zip(parts, rows_of, strict=True):
        full[idx] = part[: len(idx)].cpu().numpy()
    return full


def sum_over_ranks(array: np.ndarray) -> np.ndarray:
    """Element-wise float64 sum of `array` over the ranks; every rank gets the total (NaN stays NaN)."""
    if not is_running():
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(_comm_device())
    dist.all_reduce(t)
    return t.cpu().numpy()
