"""Task streams for continual learning: Permuted MNIST, Split MNIST, 10-split CIFAR-100 and 5-Datasets.

HLOP (Xiao et al., ICLR 2024, arXiv 2402.11984), benchmarks of §4 in `shared/papers/hlop.md`; preprocessing follows
the official loaders (`pkuxmq/HLOP-SNN`, `dataloader/{pmnist,cifar100,five_datasets}.py`), which keep every task's
whole dataset in memory as normalised float tensors. That is done here too, but from files read with numpy only:
no torchvision, no downloads, and never a pickle (the binary CIFAR versions, idx files, SVHN's .mat files and an .npz
for notMNIST). Each loader checks its folder first and names the first missing file with the layout it expects.

- `permuted_mnist`: one shared 10-way head; task i sees a fixed pixel permutation of normalised MNIST.
- `split_mnist`: five 2-class tasks (0/1, 2/3, ...), one head per task.
- `cifar100_split`: task i = fine classes 10i..10i+9, labels mod 10, one head per task.
- `five_datasets`: CIFAR-10, MNIST, SVHN, FashionMNIST, notMNIST in this fixed order, 3×32×32, one head per task.

`load_stream(name, data_dir)` dispatches by name; `batches` cuts one task's tensors into minibatches.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch
from sklearn.utils import shuffle as sk_shuffle

from engramlab.data.mnist import MNIST_IDX_FILES, MNIST_MEAN, MNIST_STD, MnistSplit, mnist_split, read_idx
from engramlab.errors import EngramError

STREAMS = ("pmnist", "split-mnist", "cifar100", "5datasets")

# Normalisation constants of the official loaders (HLOP-SNN, inherited from HAT's `dataloaders/mixture.py`).
# CIFAR-100 is normalised there with these CIFAR-10 training-set statistics too; kept for fidelity.
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)

MNIST_LAYOUT = (
    "<data_dir>/mnist/ holding the official idx files train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz)"
)
CIFAR100_LAYOUT = "<data_dir>/cifar-100-binary/train.bin and test.bin, unpacked from cifar-100-binary.tar.gz"
FIVE_DATASETS_LAYOUT = (
    "<data_dir>/ holding cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin (CIFAR-10 binary "
    "version), mnist/ and fashion_mnist/ with the four official idx files (optionally .gz), "
    "svhn/{train,test}_32x32.mat and notmnist/notmnist.npz (arrays x_train, y_train, x_test, "
    "y_test; see `five_datasets`)"
)


@dataclass
class Task:
    """One task: inputs [N, *input_shape] float32 (normalised), labels int64 in 0..n_classes-1.

    `label_offset` is the task's first class in the global numbering (0 for every task of a shared head), so
    `y + label_offset` is the global class.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    label_offset: int


@dataclass
class TaskStream:
    """Tasks in training order; `multi_head` says whether each task has its own classifier head."""

    name: str
    tasks: list[Task]
    multi_head: bool
    input_shape: tuple[int, ...]


# ---------------------------------------------------------------- MNIST streams (vendored 5k or the full idx files)


def pmnist_permutations(n_tasks: int = 10, seed: int = 2022) -> list[np.ndarray]:
    """The official pixel permutations of Permuted MNIST (HLOP-SNN `dataloader/pmnist.py`).

    The task seeds 0..n_tasks-1 are shuffled with scikit-learn (`random_state=seed`); task i, holding seed r, permutes
    the 784 pixels with `sklearn.utils.shuffle(pixels, random_state=100 * r + i)`, i.e. `x_perm = x[perm]`.
    """
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise EngramError(f"n_tasks must be a positive integer, got {n_tasks!r}.")
    seeds = sk_shuffle(np.arange(n_tasks), random_state=seed)
    return [sk_shuffle(np.arange(28 * 28), random_state=int(100 * r + i)) for i, r in enumerate(seeds)]


def _flat_normalised(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 784] with MNIST mean/std."""
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))  # [N, 28, 28] -> [N, 784]
    return x.div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)


def permuted_mnist(n_tasks: int = 10, seed: int = 2022, split: MnistSplit | None = None) -> TaskStream:
    """Permuted MNIST (HLOP §4): `n_tasks` tasks, each a fixed pixel permutation of the same digits, shared head.

    Pixels are normalised with MNIST's mean/std before permuting (as the official loader). `split` defaults to the
    vendored 5,000 digits (`mnist_split()`: 4,000 train / 1,000 test); pass `mnist_idx_split(folder)` for the full
    60k / 10k of the paper.
    """
    split = mnist_split() if split is None else split
    x_train, x_test = _flat_normalised(split.x_train), _flat_normalised(split.x_test)
    y_train, y_test = torch.from_numpy(np.array(split.y_train)), torch.from_numpy(np.array(split.y_test))
    tasks = []
    for i, perm in enumerate(pmnist_permutations(n_tasks, seed)):
        p = torch.from_numpy(perm)
        tasks.append(Task(f"pmnist-{i}", x_train[:, p], y_train, x_test[:, p], y_test, n_classes=10, label_offset=0))
    return TaskStream("pmnist", tasks, multi_head=False, input_shape=(28 * 28,))


def split_mnist(split: MnistSplit | None = None) -> TaskStream:
    """Split MNIST: five tasks of two digits (0/1, 2/3, ...), labels 0/1 within a task, one head per task.

    Inputs are flattened and normalised like Permuted MNIST; `split` defaults to the vendored 5,000 digits.
    """
    split = mnist_split() if split is None else split
    x_train, x_test = _flat_normalised(split.x_train), _flat_normalised(split.x_test)
    y_train, y_test = torch.from_numpy(np.array(split.y_train)), torch.from_numpy(np.array(split.y_test))
    tasks = []
    for i in range(5):
        tr, te = y_train // 2 == i, y_test // 2 == i
        tasks.append(
            Task(
                f"split-mnist-{2 * i}{2 * i + 1}",
                x_train[tr],
                y_train[tr] - 2 * i,
                x_test[te],
                y_test[te] - 2 * i,
                n_classes=2,
                label_offset=2 * i,
            )
        )
    return TaskStream("split-mnist", tasks, multi_head=True, input_shape=(28 * 28,))


def mnist_idx_split(folder: str | os.PathLike, layout: str = MNIST_LAYOUT) -> MnistSplit:
    """The official train / test split from a folder of the four idx files (MNIST or FashionMNIST)."""
    folder = _require_dir(folder, layout)
    paths = [_find(folder, name, layout, gz_ok=True) for name in MNIST_IDX_FILES]
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    for x, y, y_path in ((x_train, y_train, paths[1]), (x_test, y_test, paths[3])):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise EngramError(
                f"{y_path}: images {x.shape} and labels {y.shape} do not match; expected [N, 28, 28] and [N]."
            )
        if len(y) == 0:
            raise EngramError(f"{y_path}: holds no images; expected the official MNIST files.")
        _check_labels(y_path, y, 10)
    return MnistSplit(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


# ---------------------------------------------------------------- file checks and raw readers


def _require_dir(folder: str | os.PathLike, layout: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise EngramError(f"{folder}: folder not found; expected {layout}.")
    return folder


def _find(folder: Path, name: str, layout: str, gz_ok: bool = False) -> Path:
    """`folder/name` (or `name.gz` when `gz_ok`); a missing file raises naming it and the expected layout."""
    for candidate in (name, f"{name}.gz") if gz_ok else (name,):
        if (folder / candidate).is_file():
            return folder / candidate
    if not folder.is_dir():
        raise EngramError(f"{folder}: folder not found; expected {layout}.")
    raise EngramError(f"{folder / name}{' (or .gz)' if gz_ok else ''}: file not found; expected {layout}.")


def _read_cifar_binary(path: Path, n_label_bytes: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of `n_label_bytes` label bytes then 3,072 pixel bytes (R, G, B planes of 32×32), as in the binary
    CIFAR downloads. Returns images uint8 [N, 3, 32, 32] and the last label byte (CIFAR-100: the fine label)."""
    record = n_label_bytes + 3 * 32 * 32
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise EngramError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records; "
            "expected the binary version of the download."
        )
    rows = raw.reshape(-1, record)  # [N, label bytes + 3072]
    labels = rows[:, n_label_bytes - 1].astype(np.int64)
    _check_labels(path, labels, n_classes)
    return rows[:, n_label_bytes:].reshape(-1, 3, 32, 32), labels  # [N, 3072] -> [N, 3, 32, 32]


def _check_labels(path: Path, labels: np.ndarray, n_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise EngramError(f"{path}: labels must lie in 0..{n_classes - 1}, found {labels.min()}..{labels.max()}.")


def _normalised(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 [N, C, H, W], (x / 255 - mean[c]) / std[c] per channel."""
    x = torch.from_numpy(images.astype(np.float32)).div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # [1, C, 1, 1]
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


# ---------------------------------------------------------------- 10-split CIFAR-100


def cifar100_split(data_dir: str | os.PathLike) -> TaskStream:
    """10-split CIFAR-100 (HLOP §4): task i = fine classes 10i..10i+9 in file order, labels mod 10, one head each.

    Reads `<data_dir>/cifar-100-binary/{train,test}.bin` (records: coarse label byte, fine label byte, 3,072 pixel
    bytes CHW). Normalised per channel with the official loader's constants `CIFAR_MEAN` / `CIFAR_STD`.
    """
    folder = _require_dir(Path(data_dir) / "cifar-100-binary", CIFAR100_LAYOUT)
    paths = [_find(folder, name, CIFAR100_LAYOUT) for name in ("train.bin", "test.bin")]
    parts = []
    for path in paths:
        images, fine = _read_cifar_binary(path, n_label_bytes=2, n_classes=100)
        parts.append((_normalised(images, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(fine)))
    (x_train, y_train), (x_test, y_test) = parts
    tasks = []
    for i in range(10):
        tr, te = y_train // 10 == i, y_test // 10 == i
        tasks.append(
            Task(
                f"cifar100-{i}",
                x_train[tr],
                y_train[tr] % 10,
                x_test[te],
                y_test[te] % 10,
                n_classes=10,
                label_offset=10 * i,
            )
        )
    return TaskStream("cifar100", tasks, multi_head=True, input_shape=(3, 32, 32))


# ---------------------------------------------------------------- 5-Datasets

# Task order and per-dataset normalisation constants of the official loader (HLOP-SNN `five_datasets.py`); the MNIST
# and FashionMNIST statistics include the 2-pixel zero padding.
FIVE_DATASETS = (
    ("cifar10", CIFAR_MEAN, CIFAR_STD),
    ("mnist", (0.1,), (0.2752,)),
    ("svhn", (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)),
    ("fashion-mnist", (0.2190,), (0.3318,)),
    ("notmnist", (0.4254,), (0.4501,)),
)
_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


def _five_datasets_files(root: Path) -> dict[str, list[Path]]:
    """Every file 5-Datasets needs, found before anything is read, so the first missing one is named at once."""

    def find(sub: str, name: str, gz_ok: bool = False) -> Path:
        return _find(root / sub, name, FIVE_DATASETS_LAYOUT, gz_ok)

    return {
        "cifar10": [find("cifar-10-batches-bin", f"data_batch_{k}.bin") for k in range(1, 6)]
        + [find("cifar-10-batches-bin", "test_batch.bin")],
        "mnist": [find("mnist", name, gz_ok=True) for name in MNIST_IDX_FILES],
        "svhn": [find("svhn", "train_32x32.mat"), find("svhn", "test_32x32.mat")],
        "fashion-mnist": [find("fashion_mnist", name, gz_ok=True) for name in MNIST_IDX_FILES],
        "notmnist": [find("notmnist", "notmnist.npz")],
    }


def _read_cifar10(paths: list[Path]) -> _Arrays:
    """Five training batches and the test batch of the binary CIFAR-10 download."""
    train = [_read_cifar_binary(p, n_label_bytes=1, n_classes=10) for p in paths[:5]]
    x_test, y_test = _read_cifar_binary(paths[5], n_label_bytes=1, n_classes=10)
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test


def _read_idx_split(paths: list[Path]) -> _Arrays:
    """The four idx files of MNIST or FashionMNIST (paths in `MNIST_IDX_FILES` order)."""
    s = mnist_idx_split(paths[0].parent, FIVE_DATASETS_LAYOUT)
    return s.x_train, s.y_train, s.x_test, s.y_test


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits (`*_32x32.mat`, MATLAB v5, read by scipy): X [32, 32, 3, N], y [N, 1] with 10 for 0."""
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError, TypeError, NotImplementedError, zlib.error) as err:
        raise EngramError(f"{path}: cannot read the SVHN .mat file ({err}).") from err
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise EngramError(f"{path}: expected arrays X [32, 32, 3, N] and y [N, 1] as in the official SVHN files.")
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
    _check_labels(path, labels, 10)
    return x.transpose(3, 2, 0, 1).astype(np.uint8), labels  # [H, W, C, N] -> [N, C, H, W]


def _read_svhn(paths: list[Path]) -> _Arrays:
    return (*_read_svhn_mat(paths[0]), *_read_svhn_mat(paths[1]))


def _read_notmnist(paths: list[Path]) -> _Arrays:
    """notMNIST .npz: x_train, x_test uint8 [N, 32, 32] (or [N, 1, 32, 32]); y_train, y_test in 0..9 (A..J)."""
    path, keys = paths[0], ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            arrays = [] if missing else [npz[k] for k in keys]
    except (ValueError, OSError, zlib.error) as err:
        raise EngramError(f"{path}: cannot read the notMNIST .npz ({err}).") from err
    if missing:
        raise EngramError(f"{path}: lacks array(s) {', '.join(missing)}; expected {', '.join(keys)}.")
    out = []
    for part, (x, y) in (("train", arrays[:2]), ("test", arrays[2:])):
        x = x.reshape(len(x), *x.shape[2:]) if x.ndim == 4 and x.shape[1] == 1 else x  # [N, 1, H, W] -> [N, H, W]
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32) or y.shape != (len(x),):
            raise EngramError(
                f"{path}: x_{part} must be uint8 [N, 32, 32] and y_{part} [N], got {x.dtype} {x.shape} and {y.shape}."
            )
        y = y.astype(np.int64)
        _check_labels(path, y, 10)
        out += [x, y]
    return tuple(out)


_FIVE_READERS = {
    "cifar10": _read_cifar10,
    "mnist": _read_idx_split,
    "svhn": _read_svhn,
    "fashion-mnist": _read_idx_split,
    "notmnist": _read_notmnist,
}


def _to_rgb32_normalised(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, 3, 32, 32] or grey [N, H, W] -> float32 [N, 3, 32, 32], normalised.

    Grey images are zero-padded to 32×32 (2 pixels for 28×28, as the official `transforms.Pad(2)`), normalised, and
    copied to 3 channels as an `expand` view (no extra memory; indexing a batch makes it contiguous).
    """
    if images.ndim == 4:
        return _normalised(images, mean, std)
    ph, pw = 32 - images.shape[1], 32 - images.shape[2]
    x = np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))[:, None]  # -> [N, 1, 32, 32]
    return _normalised(x, mean, std).expand(-1, 3, -1, -1)  # [N, 1, 32, 32] -> [N, 3, 32, 32]


def five_datasets(data_dir: str | os.PathLike) -> TaskStream:
    """5-Datasets (HLOP §4): CIFAR-10, MNIST, SVHN, FashionMNIST, notMNIST (A–J), in this order; one head each.

    Every image becomes 3×32×32: MNIST and FashionMNIST are zero-padded by 2 and copied to 3 channels, notMNIST
    (already 32×32) is copied to 3 channels. Each dataset is normalised with the official constants (`FIVE_DATASETS`).

    Files under `data_dir` (all checked before anything is read; the first missing one is named):
    - `cifar-10-batches-bin/data_batch_{1..5}.bin`, `test_batch.bin`: the binary CIFAR-10 download.
    - `mnist/`, `fashion_mnist/`: the four official idx files each, optionally gzipped.
    - `svhn/train_32x32.mat`, `svhn/test_32x32.mat`: the official cropped-digit files.
    - `notmnist/notmnist.npz`: arrays x_train, x_test (uint8 [N, 32, 32]) and y_train, y_test (0..9 for A..J).
      The official loader reads `notmnist.zip` from `nkundiushuti/notmnist_convert`, a zip of pickles, which
      engramlab never unpickles. Rebuild the same arrays from the notMNIST_small PNG folders A..J as that repo's
      `notmnist.py` does (PIL resize to 32×32 with LANCZOS, `train_test_split(test_size=0.1, random_state=42)`) and
      save them with `np.savez`; or, if you trust the zip, unpickle it once yourself and `np.savez` its
      `features[:, 0]` and `labels`.
    """
    files = _five_datasets_files(_require_dir(data_dir, FIVE_DATASETS_LAYOUT))
    tasks = []
    for i, (name, mean, std) in enumerate(FIVE_DATASETS):
        x_train, y_train, x_test, y_test = _FIVE_READERS[name](files[name])
        tasks.append(
            Task(
                name,
                _to_rgb32_normalised(x_train, mean, std),
                torch.from_numpy(y_train),
                _to_rgb32_normalised(x_test, mean, std),
                torch.from_numpy(y_test),
                n_classes=10,
                label_offset=10 * i,
            )
        )
    return TaskStream("5datasets", tasks, multi_head=True, input_shape=(3, 32, 32))


# ---------------------------------------------------------------- dispatch and batching


def load_stream(name: str, data_dir: str | os.PathLike | None = None) -> TaskStream:
    """A stream by name (`STREAMS`). `pmnist` / `split-mnist` use the vendored 5,000 MNIST digits unless `data_dir`
    holds `mnist/` with the full idx files; `cifar100` and `5datasets` need `data_dir` (layouts in their loaders)."""
    if name not in STREAMS:
        raise EngramError(f"unknown stream {name!r}; choose one of {', '.join(STREAMS)}.")
    if name in ("pmnist", "split-mnist"):
        split = None if data_dir is None else mnist_idx_split(Path(data_dir) / "mnist")
        return permuted_mnist(split=split) if name == "pmnist" else split_mnist(split=split)
    if data_dir is None:
        layout = CIFAR100_LAYOUT if name == "cifar100" else FIVE_DATASETS_LAYOUT
        raise EngramError(f"stream {name!r} needs data_dir; expected {layout}.")
    return cifar100_split(data_dir) if name == "cifar100" else five_datasets(data_dir)
