"""Data parallel under torchrun: 2 gloo processes give the results of 1 (engramlab.distributed, issue 21).

- The primitives (batch sharing, gathering, the exact AP over column blocks, errors shared by every rank) with two
  spawned gloo processes and no model: fast.
- `torchrun --nproc_per_node 2 -m engramlab relations find` on the shipped base organism: the same top units and AP
  as one process, `--resume` after a rank's cache was cut short, one line when the output folder is refused, and one
  line naming the rank when a single rank fails (the others are stopped, nothing hangs).
- One combined torchrun launch (tests/distributed_worker.py) of relations deactivate/perplexity, decode atlas and
  compare, posttrain knowledge/truth/refusal and the organisms eval loops, compared with the same code in one process.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import run_cli
from engramlab import distributed
from engramlab.errors import EngramError
from engramlab.organisms.registry import shipped_organisms
from engramlab.relations.find import FindResult
from engramlab.relations.responses import ResponseMatrix

find = importlib.import_module("engramlab.relations.find")  # the module (the package exports a function `find`)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
needs_organisms = pytest.mark.skipif(
    not {"base", "chat"} <= set(shipped_organisms()), reason="the shipped organisms are not there"
)

WORLD = 2
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")]),
        ENGRAMLAB_QUIET="1",
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",  # loopback only: no network needed
    )
    return env


def torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (torch's own launcher module: no PATH lookup)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def one_thread():
    """The reference run in this process uses one thread, like each torchrun rank (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------------------
# Without torchrun: no-ops


def test_everything_is_a_no_op_in_one_process(tmp_path: Path) -> None:
    assert not distributed.is_running() and distributed.world_size() == 1 and distributed.is_main_process()
    np.testing.assert_array_equal(distributed.batch_rows(10, 4), np.arange(10))
    assert distributed.map_batches(range(5), lambda x: x * x) == [0, 1, 4, 9, 16]
    assert distributed.on_main(lambda a: a + 1, 1) == 2
    with pytest.raises(EngramError, match="plain"):
        distributed.on_main(_raise, "plain")
    block = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(distributed.gather_rows_to(0, block, [np.array([2, 0, 1])], 3), block[[1, 2, 0]])


def _raise(message: str) -> None:
    raise EngramError(message)


# ------------------------------------------------------------------------------------------------------------------
# The primitives with two spawned gloo processes (no model)

N_ROWS, N_COLS, BATCH = 23, 45, 4  # 6 batches: rank 0 takes 0, 2, 4 (12 rows), rank 1 takes 1, 3, 5 (11 rows)


def _responses() -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """A response matrix with ties (rounded values) and two relations' (positive, negative) rows, one empty."""
    rng = np.random.default_rng(0)
    matrix = np.round(rng.normal(size=(N_ROWS, N_COLS)), 1).astype(np.float32)
    rows = [(np.arange(0, 5), np.arange(5, 20)), (np.array([], dtype=np.int64), np.array([], dtype=np.int64))]
    return matrix, rows


def _primitives_worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out = Path(out_dir)
    try:
        ran: list[int] = []
        squares = distributed.map_batches(range(7), lambda x: ran.append(x) or x * x)
        full, rows = _responses()
        mine = distributed.batch_rows(N_ROWS, BATCH)
        matrix = ResponseMatrix(out / f"m{rank}.f32", len(mine), N_COLS, "test")
        matrix.append(full[mine])
        rows_of = [distributed.batch_rows(N_ROWS, BATCH, r) for r in range(WORLD)]
        find.AP_BLOCK_ELEMENTS = N_ROWS * 10  # 5 column blocks of 10, 9, ...: owned by ranks 0, 1, 0, 1, 0
        ap = find.score_units(matrix, rows, rows_of)
        # a rank without rows: 3 rows in batches of 4 are all rank 0's
        few = distributed.gather_rows_to(1, full[distributed.batch_rows(3, BATCH)], [np.arange(3), np.arange(0)], 3)
        try:
            distributed.on_main(_raise, "folder refused")
            shared = ""
        except distributed.SharedError as err:
            shared = str(err)
        np.savez(out / f"rank{rank}.npz", squares=squares, ran=ran, ap=ap, few=few if few is not None else [])
        (out / f"rank{rank}.txt").write_text(shared)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_batches_and_score_ap_exactly(tmp_path: Path, monkeypatch) -> None:
    ctx = mp.start_processes(
        _primitives_worker,
        args=(str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("gloo workers did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(WORLD)]
    full, rows = _responses()
    single = ResponseMatrix(tmp_path / "single.f32", N_ROWS, N_COLS, "test")
    single.append(full)
    monkeypatch.setattr(find, "AP_BLOCK_ELEMENTS", N_ROWS * 10)  # the same column blocks as the ranks
    reference = find.score_units(single, rows)  # one process
    for r, got in enumerate(ranks):
        assert got["squares"].tolist() == [x * x for x in range(7)]  # every rank gets every result, in order
        assert got["ran"].tolist() == list(range(r, 7, WORLD))  # ... but computed only its own share
        np.testing.assert_array_equal(got["ap"], reference)  # exact, NaN for the relation without prompts
        assert (tmp_path / f"rank{r}.txt").read_text() == "folder refused"  # rank 0's error, raised on both
    assert np.isnan(reference[1]).all() and not np.isnan(reference[0]).any()
    assert ranks[0]["few"].size == 0  # the gather's owner was rank 1
    np.testing.assert_array_equal(ranks[1]["few"], full[:3])


# ------------------------------------------------------------------------------------------------------------------
# relations find through the CLI under torchrun

FIND = [
    "relations",
    "find",
    "--model",
    "organism:base",
    "--relations",
    "country_capital,city_country",
    "--max-prompts",
    "16",
    "--k",
    "30",
    "--device",
    "cpu",
    "--batch-size",
    "6",  # 32 validated prompts: batches 0, 2, 4 on rank 0, 1, 3, 5 on rank 1
]


def _assert_same_find(got: Path, want: Path) -> None:
    a, b = FindResult.load(got), FindResult.load(want)
    assert a.relations == b.relations and a.counts == b.counts and a.k == b.k
    np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=1e-6)
    for name in a.relations:
        np.testing.assert_array_equal(a.top(name), b.top(name))
    assert pq.read_table(got / "neurons.parquet").equals(pq.read_table(want / "neurons.parquet"))
    assert pq.read_table(got / "identification_prompts.parquet").equals(
        pq.read_table(want / "identification_prompts.parquet")
    )


@needs_organisms
def test_torchrun_relations_find_equals_one_process_and_resumes(tmp_path: Path, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli([*FIND, "--out", str(one)], capsys)
    assert code == 0, err

    done = torchrun(["-m", "engramlab", *FIND, "--out", str(two)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # the summary is printed by rank 0 only
    _assert_same_find(two, one)
    cache = sorted(p.name for p in (two / "cache").iterdir())
    assert cache == [f"responses.rank{r}-of-2.{ext}" for r in range(WORLD) for ext in ("f32", "json")]

    # rank 1 "interrupted" after its first batch: its sidecar says 6 rows, the rows after it are garbage
    sidecar = two / "cache" / "responses.rank1-of-2.json"
    meta = json.loads(sidecar.read_text())
    rows, cols = meta["shape"]
    matrix = np.memmap(two / "cache" / "responses.rank1-of-2.f32", dtype=np.float32, mode="r+", shape=(rows, cols))
    matrix[6:] = np.nan
    matrix.flush()
    del matrix
    sidecar.write_text(json.dumps({**meta, "done": 6}))
    done = torchrun(["-m", "engramlab", *FIND, "--out", str(two), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(sidecar.read_text())["done"] == rows
    _assert_same_find(two, one)


@needs_organisms
def test_torchrun_refused_folder_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    done = torchrun(["-m", "engramlab", *FIND, "--out", str(out)])
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert ours == [f"error: --out {out} is not empty; pass --overwrite to replace its results, or pick a new folder."]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


@needs_organisms
def test_torchrun_one_failing_rank_stops_all_with_one_line(tmp_path: Path) -> None:
    start = time.monotonic()
    done = torchrun([str(TESTS / "distributed_worker.py"), str(tmp_path), "fail_on_rank1"], timeout=240)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert ours == ["error (rank 1 of 2): rank 1 cannot read its model."]
    assert time.monotonic() - start < 200  # rank 0, waiting in a collective, was stopped rather than left hanging


# ------------------------------------------------------------------------------------------------------------------
# Every sharded study in one torchrun launch


def _close(a, b, path: str = "") -> None:
    """Equal JSON-like values, floats to 1e-6 (NaN equals NaN); timings are ignored."""
    if isinstance(a, dict):
        keys = {k for k in a if "second" not in k}
        assert keys == {k for k in b if "second" not in k}, path
        for k in keys:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        same = (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-6)
        assert same, f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _same_studies(tmp_path: Path, names: list[str]) -> None:
    """Run the worker's studies `names` here (one process) and under torchrun; every file must agree."""
    import distributed_worker

    one, two = tmp_path / "one", tmp_path / "two"
    distributed_worker.run(one, names)
    done = torchrun([str(TESTS / "distributed_worker.py"), str(two), ",".join(names)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and "cache" not in p.parts)
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and "cache" not in p.parts)
    for name in files:
        a, b = one / name, two / name
        if name.name == ".engramlab-run.json":  # the run marker records the options, paths included
            continue
        if name.suffix == ".json":
            _close(json.loads(b.read_text()), json.loads(a.read_text()), str(name))
        elif name.suffix == ".parquet":
            _close(pq.read_table(b).to_pylist(), pq.read_table(a).to_pylist(), str(name))
    if "relations" in names:
        _assert_same_find(two / "relations", one / "relations")
    if "decode" in names:
        from engramlab.decode.atlas import load_atlas

        atlas_one, atlas_two = load_atlas(one / "atlas"), load_atlas(two / "atlas")
        np.testing.assert_array_equal(atlas_two.ids, atlas_one.ids)
        np.testing.assert_allclose(atlas_two.scores, atlas_one.scores, rtol=0, atol=1e-6)


@needs_organisms
def test_torchrun_studies_equal_one_process(tmp_path: Path, monkeypatch, one_thread) -> None:
    """relations deactivate/perplexity, decode atlas/compare, posttrain truth/refusal, organisms eval loops."""
    import distributed_worker

    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    monkeypatch.setattr(find, "AP_BLOCK_ELEMENTS", find.AP_BLOCK_ELEMENTS)  # the worker lowers it; restore after
    _same_studies(tmp_path, distributed_worker.FAST)


@pytest.mark.slow
@needs_organisms
def test_torchrun_posttrain_knowledge_equals_one_process(tmp_path: Path, monkeypatch, one_thread) -> None:
    """posttrain knowledge: the patching pairs shared out (about a minute on 2 shared cores)."""
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    _same_studies(tmp_path, ["knowledge"])
