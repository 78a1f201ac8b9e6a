"""Tests for engramlab.stats: streaming moments against a one-shot numpy float64 reference, merges in any order,
bit-identical stop/resume through checkpoints, every user-input error, and a 2-process gloo all-reduce."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from engramlab.errors import EngramError
from engramlab.stats import (
    Checkpoint,
    RunningMoments,
    batch_moments,
    load_checkpoint,
    merge_moments,
    save_checkpoint,
)

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def assert_matches_numpy(stats: RunningMoments, rows: np.ndarray) -> None:
    """Compare with numpy's one-shot float64 mean/var at a tolerance scaled to the data's magnitude."""
    scale = max(1.0, float(np.abs(rows).max()))
    assert stats.count.dtype == torch.float64 and stats.count.item() == rows.shape[0]
    np.testing.assert_allclose(stats.mean.numpy(), rows.mean(axis=0), rtol=1e-12, atol=1e-13 * scale)
    np.testing.assert_allclose(stats.variance().numpy(), rows.var(axis=0), rtol=1e-12, atol=1e-12 * scale**2)
    if rows.shape[0] > 1:
        np.testing.assert_allclose(
            stats.variance(unbiased=True).numpy(), rows.var(axis=0, ddof=1), rtol=1e-12, atol=1e-12 * scale**2
        )
        np.testing.assert_allclose(stats.std().numpy(), rows.std(axis=0), rtol=1e-6, atol=1e-6 * scale)


def assert_same_state(a: RunningMoments, b: RunningMoments) -> None:
    """Bit-identical state."""
    for key, ta in a.state_dict().items():
        tb = b.state_dict()[key]
        assert ta.dtype == tb.dtype == torch.float64
        assert torch.equal(ta, tb), f"{key} differs: {ta} vs {tb}"


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def batch_lists(draw: st.DrawFn) -> list[np.ndarray]:
    """1-6 batches of [n, D] float64 rows (n may be 0), each random, constant, or a far-off mean plus small noise."""
    d = draw(st.integers(1, 3))
    out = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(0, 7))
        kind = draw(st.sampled_from(["random", "constant", "offset"]))
        if kind == "constant":
            arr = np.full((n, d), draw(finite))
        else:
            arr = np.array(draw(st.lists(finite, min_size=n * d, max_size=n * d)), dtype=np.float64).reshape(n, d)
            if kind == "offset":
                arr = draw(finite) + arr * 1e-3
        out.append(arr)
    if sum(a.shape[0] for a in out) == 0:  # at least one row overall
        out[0] = np.zeros((1, d))
    return out


# --------------------------------------------------------------------------------------------------------------
# correctness against numpy
# --------------------------------------------------------------------------------------------------------------


def test_baukit_variance_case_two_constant_batches() -> None:
    """Two equal batches of 0s and 10s: variance 25 (baukit's merge gives about 6.28)."""
    stats = RunningMoments(2)
    stats.update(torch.zeros(50, 2))
    stats.update(torch.full((50, 2), 10.0))
    assert torch.equal(stats.mean, torch.full((2,), 5.0, dtype=torch.float64))
    assert torch.equal(stats.variance(), torch.full((2,), 25.0, dtype=torch.float64))
    assert stats.count.item() == 100


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batch_lists(), data=st.data())
def test_any_split_and_merge_order_matches_one_shot(batches: list[np.ndarray], data: st.DataObject) -> None:
    d = batches[0].shape[1]
    rows = np.concatenate(batches)

    one_shot = RunningMoments(d)
    one_shot.update(torch.from_numpy(rows))
    assert_matches_numpy(one_shot, rows)

    sequential = RunningMoments(d)
    for b in batches:
        sequential.update(torch.from_numpy(b))
    assert_matches_numpy(sequential, rows)

    # one shard per batch, merged as a random binary tree over a random permutation
    shards = []
    for b in batches:
        s = RunningMoments(d)
        s.update(torch.from_numpy(b))
        shards.append(s)
    shards = [shards[i] for i in data.draw(st.permutations(range(len(shards))))]
    while len(shards) > 1:
        i = data.draw(st.integers(0, len(shards) - 2))
        shards[i].merge(shards.pop(i + 1))
    assert_matches_numpy(shards[0], rows)


def test_pure_functions_match_the_class() -> None:
    x = torch.randn(9, 4, dtype=torch.float64)
    m = merge_moments(batch_moments(x[:4]), batch_moments(x[4:]))
    stats = RunningMoments(4)
    stats.update(x[:4])
    stats.update(x[4:])
    assert torch.equal(m.count, stats.count) and torch.equal(m.mean, stats.mean) and torch.equal(m.m2, stats.m2)


def test_low_precision_inputs_are_upcast() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2, 3, generator=g) * 3 + 100).to(torch.bfloat16)
    stats = RunningMoments((2, 3))
    for chunk in x.split(10):
        stats.update(chunk)
    ref = x.to(torch.float64).reshape(64, -1).numpy()
    assert stats.mean.dtype == torch.float64 and stats.mean.shape == (2, 3)
    np.testing.assert_allclose(stats.mean.reshape(-1).numpy(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance().reshape(-1).numpy(), ref.var(0), rtol=1e-10)


def test_integer_inputs_and_scalar_rows() -> None:
    stats = RunningMoments(())
    stats.update(torch.arange(10))  # [N] rows of shape ()
    assert stats.mean.item() == 4.5 and stats.variance().item() == pytest.approx(8.25, rel=1e-15)


def test_empty_state_and_empty_batches() -> None:
    stats = RunningMoments(3)
    assert stats.count.item() == 0
    assert torch.equal(stats.mean, torch.zeros(3, dtype=torch.float64))
    assert torch.isnan(stats.variance()).all()
    stats.update(torch.empty(0, 3))
    assert stats.count.item() == 0 and torch.isnan(stats.variance()).all()
    stats.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(stats.variance(), torch.zeros(3, dtype=torch.float64))
    assert torch.isnan(stats.variance(unbiased=True)).all()  # one row: sample variance undefined
    before = stats.state_dict()
    stats.update(torch.empty(0, 3))
    stats.merge(RunningMoments(3))
    assert all(torch.equal(before[k], v) for k, v in stats.state_dict().items())
    stats.reset()
    assert stats.count.item() == 0 and torch.equal(stats.m2, torch.zeros(3, dtype=torch.float64))


def test_merge_into_empty_is_exact_copy() -> None:
    src = RunningMoments(5)
    src.update(torch.randn(13, 5) * 7 + 3)
    dst = RunningMoments(5).merge(src)
    assert_same_state(dst, src)


# --------------------------------------------------------------------------------------------------------------
# masking
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_mask_selects_rows_and_ignores_garbage(mask_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g) + 5
    keep = torch.rand(20, generator=g) > 0.4
    x[~keep] = float("nan")  # padding rows may hold anything
    x[int(torch.nonzero(~keep)[0]), 0] = float("inf")
    masked = RunningMoments(4)
    masked.update(x, mask=keep.to(mask_dtype))
    assert_matches_numpy(masked, x[keep].double().numpy())
    # all rows masked out: the state does not move at all
    before = masked.state_dict()
    masked.update(x, mask=torch.zeros(20, dtype=torch.bool))
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())


def test_mask_on_multi_dim_rows() -> None:
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1])
    stats = RunningMoments((2, 3))
    stats.update(x, keep)
    ref = x[keep.bool()].reshape(4, -1).numpy()
    np.testing.assert_allclose(stats.mean.reshape(-1).numpy(), ref.mean(0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(stats.variance().reshape(-1).numpy(), ref.var(0), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------------------------
# state_dict, save/load, checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_copies() -> None:
    a = RunningMoments((2, 2))
    a.update(torch.randn(7, 2, 2))
    sd = a.state_dict()
    assert set(sd) == {"count", "mean", "m2"}
    sd["mean"].add_(1.0)  # a copy: the object's state does not change
    assert not torch.equal(sd["mean"], a.mean)
    b = RunningMoments((2, 2))
    b.load_state_dict(a.state_dict())
    assert_same_state(a, b)


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    a = RunningMoments(6)
    a.update(torch.randn(11, 6) * 1e3)
    path = a.save(tmp_path / "sub" / "act.safetensors")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    b = RunningMoments.load(path)
    assert b.shape == (6,) and b.device == torch.device("cpu")
    assert_same_state(a, b)


def _stream(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch i of a deterministic stream: residual rows [N, 2, 3], MLP rows [N, 5], and a padding mask [N]."""
    g = torch.Generator().manual_seed(1000 + i)
    n = 5 + i % 4
    resid = torch.randn(n, 2, 3, generator=g) * (1 + i) + 10 * i  # drifting mean: the hard case for merging
    mlp = torch.randn(n, 5, generator=g, dtype=torch.float64) ** 3
    mask = torch.rand(n, generator=g) > 0.25
    return resid, mlp, mask


def _fresh() -> dict[str, RunningMoments]:
    return {"resid": RunningMoments((2, 3)), "mlp": RunningMoments(5)}


def _consume(stats: dict[str, RunningMoments], start: int, stop: int) -> None:
    for i in range(start, stop):
        resid, mlp, mask = _stream(i)
        stats["resid"].update(resid, mask=mask)
        stats["mlp"].update(mlp)


@pytest.mark.parametrize("stop_at", [0, 1, 4, 8])
def test_stop_and_resume_is_bit_identical(tmp_path: Path, stop_at: int) -> None:
    n_batches = 8
    uninterrupted = _fresh()
    _consume(uninterrupted, 0, n_batches)

    first = _fresh()
    _consume(first, 0, stop_at)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", first, cursor=stop_at, extra_meta={"model": "tiny"})
    del first

    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    stats, cursor, meta = ckpt
    assert cursor == stop_at and meta == {"model": "tiny"} and set(stats) == {"resid", "mlp"}
    _consume(stats, cursor, n_batches)
    for name in uninterrupted:
        assert_same_state(stats[name], uninterrupted[name])


def test_checkpoint_overwrite_is_atomic_and_empty_dict_ok(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {}, cursor=0)
    assert load_checkpoint(path) == Checkpoint({}, 0, {})
    stats = _fresh()
    _consume(stats, 0, 2)
    save_checkpoint(path, stats, cursor=2)
    assert load_checkpoint(path).cursor == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


# --------------------------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------------------------


def _moments_meta(**over: str) -> dict[str, str]:
    meta = {"format": "engramlab.stats.RunningMoments", "class": "RunningMoments", "format_version": "1"}
    meta.update(over)
    return meta


def _good_tensors() -> dict[str, torch.Tensor]:
    return {
        "count": torch.tensor(3.0, dtype=torch.float64),
        "mean": torch.zeros(4, dtype=torch.float64),
        "m2": torch.ones(4, dtype=torch.float64),
    }


@pytest.mark.parametrize(
    "case",
    [
        "garbage",
        "missing_file",
        "no_metadata",
        "missing_key",
        "extra_key",
        "wrong_dtype",
        "wrong_shape",
        "wrong_class",
        "newer_version",
        "checkpoint_file",
    ],
)
def test_bad_moments_file_names_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    tensors, meta = _good_tensors(), _moments_meta()
    if case == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif case == "missing_file":
        pass
    elif case == "checkpoint_file":
        save_checkpoint(path, _fresh(), cursor=3)
    else:
        if case == "no_metadata":
            meta = None
        elif case == "missing_key":
            del tensors["m2"]
        elif case == "extra_key":
            tensors["extra"] = torch.zeros(1)
        elif case == "wrong_dtype":
            tensors["mean"] = tensors["mean"].float()
        elif case == "wrong_shape":
            tensors["m2"] = torch.ones(5, dtype=torch.float64)
        elif case == "wrong_class":
            meta = _moments_meta(**{"class": "Covariance"})
        elif case == "newer_version":
            meta = _moments_meta(format_version="99")
        save_file(tensors, str(path), metadata=meta)
    with pytest.raises(EngramError, match=re.escape(str(path))):
        RunningMoments.load(path)


@pytest.mark.parametrize("case", ["garbage", "moments_file", "missing_tensor", "bad_cursor", "no_index"])
def test_bad_checkpoint_file_names_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    if case == "garbage":
        path.write_bytes(b"\x00" * 3)
    elif case == "moments_file":
        RunningMoments(3).save(path)
    else:
        good = tmp_path / "good.safetensors"
        stats = _fresh()
        _consume(stats, 0, 1)
        save_checkpoint(good, stats, cursor=1)
        with safe_open(str(good), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        if case == "missing_tensor":
            del tensors["mlp.m2"]
        elif case == "bad_cursor":
            meta["cursor"] = "three"
        elif case == "no_index":
            del meta["stats"]
        save_file(tensors, str(path), metadata=meta)
    with pytest.raises(EngramError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_load_state_dict_rejects_bad_state() -> None:
    stats = RunningMoments(4)
    bad = _good_tensors()
    del bad["count"]
    with pytest.raises(EngramError, match="state_dict has keys"):
        stats.load_state_dict(bad)
    bad = _good_tensors()
    bad["mean"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(EngramError, match=r"'mean' has shape \(3,\), expected \(4,\)"):
        stats.load_state_dict(bad)
    assert stats.count.item() == 0  # untouched after a failed load


# --------------------------------------------------------------------------------------------------------------
# user-input errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["abc", -1, (2, -3), True, (2.0,)])
def test_bad_shape(shape: object) -> None:
    with pytest.raises(EngramError, match="shape"):
        RunningMoments(shape)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x", "mask", "match"),
    [
        (torch.zeros(4, 3), None, r"x must have shape \[N, \*\(2, 3\)\] = \[N, 2, 3\], got \(4, 3\)"),
        (torch.zeros(4, 3, 2), None, r"got \(4, 3, 2\)"),
        (torch.zeros(2, 3), None, r"got \(2, 3\)"),
        ([[0.0] * 3] * 2, None, "x must be a torch.Tensor"),
        (torch.zeros(4, 2, 3, dtype=torch.complex64), None, "real numbers"),
        (torch.zeros(4, 2, 3, dtype=torch.bool), None, "real numbers"),
        (torch.zeros(4, 2, 3), torch.ones(5, dtype=torch.bool), r"mask must have shape \[N\] = \[4\].*got \(5,\)"),
        (torch.zeros(4, 2, 3), torch.ones(4, 1, dtype=torch.bool), r"got \(4, 1\)"),
        (torch.zeros(4, 2, 3), [1, 1, 1, 1], "mask must be a torch.Tensor"),
        (torch.zeros(4, 2, 3, device="meta"), None, r"x is on meta but these statistics live on cpu.*\.to\("),
        (torch.zeros(4, 2, 3), torch.ones(4, device="meta"), "mask is on meta but x is on cpu"),
    ],
)
def test_update_errors_name_argument_and_shapes(x: object, mask: object, match: str) -> None:
    stats = RunningMoments((2, 3))
    with pytest.raises(EngramError, match=match):
        stats.update(x, mask)  # type: ignore[arg-type]
    assert stats.count.item() == 0


def test_merge_errors() -> None:
    with pytest.raises(EngramError, match=r"other has row shape \(4,\) but these statistics have \(3,\)"):
        RunningMoments(3).merge(RunningMoments(4))
    with pytest.raises(EngramError, match="other must be a RunningMoments, got dict"):
        RunningMoments(3).merge({})  # type: ignore[arg-type]
    with pytest.raises(EngramError, match="other lives on meta"):
        RunningMoments(3).merge(RunningMoments(3, device="meta"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cursor": -1}, "cursor must be a non-negative int"),
        ({"cursor": True}, "cursor must be a non-negative int"),
        ({"cursor": 1.0}, "cursor must be a non-negative int"),
        ({"cursor": 0, "extra_meta": {"step": 3}}, "extra_meta must map str to str"),
        ({"cursor": 0, "stats": {"a": np.zeros(3)}}, r"stats\['a'\] must be a RunningMoments"),
        ({"cursor": 0, "stats": {"": RunningMoments(2)}}, "non-empty strings"),
        ({"cursor": 0, "stats": [RunningMoments(2)]}, "stats must be a dict"),
    ],
)
def test_save_checkpoint_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    kwargs = {"stats": {"a": RunningMoments(2)}, **kwargs}
    with pytest.raises(EngramError, match=match):
        save_checkpoint(tmp_path / "c.safetensors", **kwargs)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_to_moves_state_and_repr() -> None:
    stats = RunningMoments(3)
    stats.update(torch.ones(2, 3))
    assert stats.to("meta") is stats
    assert stats.device == torch.device("meta") and {t.device.type for t in stats.state_dict().values()} == {"meta"}
    with pytest.raises(EngramError, match="x is on cpu but these statistics live on meta"):
        stats.update(torch.ones(2, 3))
    assert repr(stats) == "RunningMoments(shape=(3,), device='meta')"


# --------------------------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------------------------


def test_all_reduce_is_a_no_op_without_a_process_group() -> None:
    assert not dist.is_initialized()
    stats = RunningMoments(3)
    stats.update(torch.randn(5, 3))
    before = stats.state_dict()
    assert stats.all_reduce_() is stats
    assert all(torch.equal(before[k], v) for k, v in stats.state_dict().items())


WORLD = 2
N_DIST_BATCHES = 7


def _single_process_reference() -> dict[str, RunningMoments]:
    stats = {**_fresh(), "rank0_only": RunningMoments(5)}
    _consume(stats, 0, N_DIST_BATCHES)
    for i in range(0, N_DIST_BATCHES, WORLD):  # the batches rank 0 sees
        stats["rank0_only"].update(_stream(i)[1])
    return stats


def _gloo_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One torchrun-like rank: round-robin shard of the stream (as DistributedSampler), then all_reduce_."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no network needed
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        stats = {**_fresh(), "rank0_only": RunningMoments(5)}
        for i in range(rank, N_DIST_BATCHES, WORLD):
            resid, mlp, mask = _stream(i)
            stats["resid"].update(resid, mask=mask)
            stats["mlp"].update(mlp)
            if rank == 0:
                stats["rank0_only"].update(mlp)  # rank 1 contributes an empty state
        for s in stats.values():
            s.all_reduce_()
        save_checkpoint(Path(out_dir) / f"rank{rank}.safetensors", stats, cursor=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo")
def test_two_process_gloo_all_reduce_matches_single_process(tmp_path: Path) -> None:
    ctx = mp.start_processes(
        _gloo_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("gloo workers did not finish within 90 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)

    ranks = [load_checkpoint(tmp_path / f"rank{r}.safetensors").stats for r in range(WORLD)]
    reference = _single_process_reference()
    for name, ref in reference.items():
        assert_same_state(ranks[0][name], ranks[1][name])  # every rank ends bit-identical
        got = ranks[0][name]
        assert got.count.item() == ref.count.item()
        scale = max(1.0, float(ref.mean.abs().max()))
        torch.testing.assert_close(got.mean, ref.mean, rtol=1e-12, atol=1e-12 * scale)
        torch.testing.assert_close(got.m2, ref.m2, rtol=1e-12, atol=1e-12 * scale**2)
        torch.testing.assert_close(got.variance(), ref.variance(), rtol=1e-12, atol=1e-12 * scale**2)
    # merging with an empty rank is exact, so this one matches the single process bit for bit
    assert_same_state(ranks[0]["rank0_only"], reference["rank0_only"])
