"""Corruption benchmarks for test-time adaptation: CIFAR-10-C, CIFAR-100-C (and ImageNet-C converted to .npy).

CoTTA (Wang et al., CVPR 2022, arXiv 2203.13591), data of §3.1 in `shared/papers/cotta.md`. Loading follows
RobustBench's `load_corruptions_cifar` (`robustbench/data.py`), which the official code calls: for severity s read
images [(s-1)·N : s·N] of `<corruption>.npy` ([5·N, H, W, 3] uint8, N = 10,000 for CIFAR-C), labels from the first
entries of `labels.npy`, HWC -> CHW, divide by 255, **no shuffling**.

Layout: one folder per benchmark as unpacked from Zenodo (CIFAR-10-C record 2535967, CIFAR-100-C record 3555552):
`<data_dir>/<corruption>.npy` for each corruption and `<data_dir>/labels.npy` ([5·N] or [N] integers). ImageNet-C is
published as JPEG folders (`<corruption>/<severity>/<wnid>/*.JPEG`); it must be converted into this layout first.
Files are memory-mapped (`np.load(..., mmap_mode="r", allow_pickle=False)`), so only the requested slice is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engramlab.data.corruptions import CORRUPTIONS  # the 15 in the standard order (Hendrycks & Dietterich 2019)
from engramlab.errors import EngramError

# The four held-out "validation" corruptions that the CIFAR-C downloads also contain.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
LAYOUT = (
    "<data_dir>/<corruption>.npy of shape [5·N, H, W, 3] uint8 (severities 1-5 stacked) and "
    "<data_dir>/labels.npy of N or 5·N integers, as in the CIFAR-10-C / CIFAR-100-C downloads"
)


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map an .npy file (header read only); a missing or unreadable file raises naming it."""
    if not path.is_file():
        raise EngramError(f"{path}: file not found; expected {LAYOUT}.")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise EngramError(f"{path}: not a readable .npy array ({err}).") from err


def _check_corruption(path: Path, images: np.ndarray) -> int:
    """Shape check of one corruption file; returns N, the images per severity."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[0] % 5 or not len(images):
        raise EngramError(
            f"{path}: expected uint8 [5·N, H, W, 3] (five severities stacked), got {images.dtype} {images.shape}."
        )
    return images.shape[0] // 5


def _check_labels(path: Path, labels: np.ndarray, n: int) -> None:
    if labels.ndim != 1 or len(labels) not in (n, 5 * n) or not np.issubdtype(labels.dtype, np.integer):
        raise EngramError(
            f"{path}: expected {n} or {5 * n} integer labels to match the images, got {labels.dtype} {labels.shape}."
        )


def _check_name(corruption: str) -> None:
    if corruption not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise EngramError(
            f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)} (or "
            f"{', '.join(EXTRA_CORRUPTIONS)})."
        )


def check_corruption_dir(data_dir: str | os.PathLike, corruptions: tuple[str, ...] = CORRUPTIONS) -> int:
    """Check a corruption-benchmark folder before a run; returns N, the images per severity.

    Raises `EngramError` naming the folder when it is missing, or the first file that is missing, unreadable, of
    the wrong shape, or whose size differs from the other files'. Reads only the .npy headers and labels.
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise EngramError(f"{folder}: folder not found; expected {LAYOUT}.")
    if not corruptions:
        raise EngramError("corruptions is empty; name at least one corruption to check.")
    for name in corruptions:
        _check_name(name)
    reference: tuple[str, tuple[int, ...]] | None = None
    for name in corruptions:
        path = folder / f"{name}.npy"
        images = _open_npy(path)
        _check_corruption(path, images)
        if reference is None:
            reference = (name, images.shape)
        elif images.shape != reference[1]:
            raise EngramError(f"{path}: shape {images.shape} differs from {reference[0]}.npy's {reference[1]}.")
    n = reference[1][0] // 5
    _check_labels(folder / "labels.npy", _open_npy(folder / "labels.npy"), n)
    return n


def load_corruption_benchmark(
    data_dir: str | os.PathLike, corruption: str, severity: int, n_examples: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of one corruption at one severity, in file order (RobustBench protocol, no shuffling).

    Returns x float32 [n, 3, H, W] in [0, 1] and y int64 [n], where n = `n_examples` (default: all N per severity)
    and the images are entries [(severity-1)·N : (severity-1)·N + n] of `<corruption>.npy`.
    """
    _check_name(corruption)
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise EngramError(f"severity must be one of 1, 2, 3, 4, 5, got {severity!r}.")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise EngramError(f"{folder}: folder not found; expected {LAYOUT}.")
    path = folder / f"{corruption}.npy"
    images = _open_npy(path)
    n_per = _check_corruption(path, images)
    labels_path = folder / "labels.npy"
    labels = _open_npy(labels_path)
    _check_labels(labels_path, labels, n_per)
    n = n_per if n_examples is None else n_examples
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_per:
        raise EngramError(
            f"n_examples must be an integer from 1 to {n_per} (images per severity in {path}), got {n_examples!r}."
        )
    start = (severity - 1) * n_per
    x = np.array(images[start : start + n])  # copies (reads) only this slice: [n, H, W, 3] uint8
    # RobustBench takes labels[:n]; the labels repeat identically for every severity.
    y = torch.from_numpy(np.array(labels[:n], dtype=np.int64))
    x = torch.from_numpy(x).permute(0, 3, 1, 2)  # [n, H, W, 3] -> [n, 3, H, W]
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255), y
