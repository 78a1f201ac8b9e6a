"""Rich progress bars for long loops (one place, so that every study's bars look alike)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr; silent when ENGRAMLAB_QUIET=1 (tests, logs) and on every torchrun rank
    but rank 0 (whose bar counts its own share of the batches)."""
    if os.environ.get("ENGRAMLAB_QUIET") == "1" or _other_rank():
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        yield from progress.track(items, total=total, description=description)


def _other_rank() -> bool:
    """A torchrun rank other than 0 (the same test as `engramlab.distributed.is_main_process`, which imports this
    module and so cannot be imported here)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
