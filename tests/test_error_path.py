"""The one error path (issue 22): unexpected exceptions and Ctrl-C end in one line, interrupted runs leave only
complete files and resume safely, result files keep the umask, and the messages name the option the user typed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_model
from engramlab.errors import EngramError
from engramlab.organisms.registry import shipped_organisms
from engramlab.report.tour import TourSection
from engramlab.results import prepare_out_dir, write_json, write_parquet

organism = pytest.mark.skipif("base" not in shipped_organisms(), reason="organism:base is not shipped")
ENV = {
    **os.environ,
    "ENGRAMLAB_QUIET": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def test_unexpected_exception_is_one_line_with_a_debug_hint(saved_llama, capsys, monkeypatch):
    def broken(loaded):
        raise RuntimeError("something internal\nwith a second line")

    monkeypatch.setattr("engramlab.models.info.model_info", broken)
    code, _, err = run_cli(["models", "info", str(saved_llama)], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "unexpected RuntimeError: something internal" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="something internal"):  # --debug: the exception and its traceback
        run_cli(["models", "info", str(saved_llama), "--debug"], capsys)


def test_ctrl_c_inside_a_command_is_one_line(saved_llama, capsys, monkeypatch):
    def interrupted(loaded):
        raise KeyboardInterrupt

    monkeypatch.setattr("engramlab.models.info.model_info", interrupted)
    code, _, err = run_cli(["models", "info", str(saved_llama)], capsys)
    assert code == 130 and err.strip().splitlines() == [
        "error: interrupted (Ctrl-C); every result file written so far is complete."
    ]


@pytest.mark.parametrize("delay", [0.5, 1.5])
def test_ctrl_c_during_start_up_prints_no_traceback(delay, tmp_path):
    """SIGINT while Python imports torch and transformers (or just after): never a KeyboardInterrupt traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "engramlab", "models", "info", "organism:base", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    if proc.returncode == 130:
        assert len(err.strip().splitlines()) == 1 and "interrupted" in err
    else:  # too early for Python's handler (killed by the signal) or already finished
        assert proc.returncode in (-signal.SIGINT, 0, 2), (proc.returncode, err)


FIND = ["relations", "find", "--model", "organism:base", "--relations", "country_capital,city_country"]
FIND += ["--max-prompts", "60", "--k", "50", "--device", "cpu"]


def _check_interrupted(out: Path, err: str, code: int) -> None:
    """Exit 130 with one line, no temporary or half-written file, and a cache that says how far it got."""
    import pyarrow.parquet as pq

    assert code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err, err
    assert not list(out.rglob("*.tmp")) and not (out / "summary.json").exists()
    assert pq.read_table(out / "identification_prompts.parquet").num_rows == 120  # complete, not half a file
    assert json.loads((out / "cache" / "responses.json").read_text())["done"] > 0


@organism
def test_interrupted_find_leaves_complete_files_and_resumes(tmp_path, capsys, monkeypatch):
    """A real SIGINT (sent by the process to itself) in the middle of the response pass; a rerun without --resume
    is refused with one line that suggests it, a rerun with --resume completes."""
    from engramlab.relations.responses import ResponseMatrix

    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    append = ResponseMatrix.append

    def append_then_interrupt(self, block):
        append(self, block)
        if self.done >= 4:
            os.kill(os.getpid(), signal.SIGINT)  # delivered as KeyboardInterrupt at the next bytecode

    out = tmp_path / "rsn"
    with monkeypatch.context() as patch:
        patch.setattr(ResponseMatrix, "append", append_then_interrupt)
        code, _, err = run_cli([*FIND, "--out", str(out), "--batch-size", "2"], capsys)
    _check_interrupted(out, err, code)
    code, _, err = run_cli([*FIND, "--out", str(out), "--batch-size", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err
    code, _, err = run_cli([*FIND, "--out", str(out), "--batch-size", "4", "--resume"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["relations"] == ["country_capital", "city_country"] and summary["excluded_relations"] == {}


@organism
@pytest.mark.slow
def test_sigint_from_outside_leaves_complete_files(tmp_path):
    """The same with the signal sent from another process, as a terminal's Ctrl-C does."""
    out = tmp_path / "rsn"
    argv = [sys.executable, "-m", "engramlab", *FIND, "--out", str(out), "--batch-size", "2"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    meta = out / "cache" / "responses.json"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if meta.is_file() and json.loads(meta.read_text() or '{"done": 0}').get("done", 0) > 0:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    _check_interrupted(out, err, proc.returncode)
    resumed = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_result_files_keep_the_users_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        folder = prepare_out_dir(tmp_path / "out")
        written = [write_json(folder / "a.json", {"x": 1}), write_parquet(folder / "b.parquet", {"x": [1, 2]})]
    finally:
        os.umask(old)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)


def test_resume_only_continues_this_commands_folder(tmp_path):
    from engramlab.results import RUN_MARKER, RunMarker

    run = RunMarker("relations find", {"k": 5, "relations": "all"})
    out = prepare_out_dir(tmp_path / "out", run=run)
    (out / "summary.json").write_text("{}")
    prepare_out_dir(out, run=RunMarker("relations find", {"k": 5, "relations": "all"}, resume=True))  # continues
    with pytest.raises(EngramError, match="--k 5, not 6"):
        prepare_out_dir(out, run=RunMarker("relations find", {"k": 6, "relations": "all"}, resume=True))
    with pytest.raises(EngramError, match="not `engramlab relations sweep`"):
        prepare_out_dir(out, run=RunMarker("relations sweep", {"k": 5, "relations": "all"}, resume=True))
    (out / RUN_MARKER).unlink()  # a folder this command did not start: a user's own results
    with pytest.raises(EngramError, match="was not started by"):
        prepare_out_dir(out, run=RunMarker("relations find", {"k": 5, "relations": "all"}, resume=True))
    assert (out / "summary.json").read_text() == "{}"


def test_only_shipped_organism_names_resolve(capsys):
    for ref in ("organism:../../x", "organism:base/../chat", "organism:"):
        code, _, err = run_cli(["models", "info", ref], capsys)
        assert code == 2 and "is not shipped" in err, err


def test_messages_name_the_option_the_user_gave(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    cases = [
        (["models", "info", ""], "REF is empty"),
        (["decode", "compare", "--a", missing, "--b", "organism:base", "--out", str(tmp_path / "c")], "--a "),
        (["posttrain", "entropy", "--post", missing, "--out", str(tmp_path / "p"), "--device", "cpu"], "--post "),
    ]
    for args, message in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and message in err, err
    code, _, err = run_cli(
        ["relations", "find", "--relation-file", missing + ".json", "--out", str(tmp_path / "r"), "--device", "cpu"],
        capsys,
    )
    assert code == 2 and "no such file" in err and "--relation-file" in err and "reinstall" not in err, err


def test_download_without_a_network_fails_in_seconds(capsys, monkeypatch):
    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", no_route)
    start = time.perf_counter()
    code, _, err = run_cli(["models", "info", "someorg/not-cached-anywhere", "--download"], capsys)
    assert code == 2 and "cannot reach the Hugging Face Hub" in err and time.perf_counter() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["models", "info", "someorg/not-cached-anywhere", "--download"], capsys)
    assert code == 2 and "HF_HUB_OFFLINE" in err


def test_tour_overwrite_reaches_every_step(tmp_path, monkeypatch):
    """Each step gets the tour's --overwrite for its own folder, so rerunning a tour into the same folder works."""
    from engramlab import tour
    from engramlab.report import Section

    seen = []

    def step(ctx):
        seen.append(ctx.overwrite)
        folder = prepare_out_dir(ctx.out / "step", ctx.overwrite)
        write_json(folder / "summary.json", {})
        return TourSection("fake", Section("fake"))

    step.__name__ = "model_step"
    monkeypatch.setattr(tour, "TOUR_STEPS", [step])
    monkeypatch.setattr(tour, "load_model", lambda *a, **k: None)
    tour.run_tour(tmp_path / "t", model="m", only=["model"])
    summary = tour.run_tour(tmp_path / "t", model="m", only=["model"], overwrite=True)
    assert seen == [False, True] and "error" not in summary["steps"]["fake"]
    for module in ("relations", "posttrain", "hlop", "tta"):  # the study steps hand it on to their studies
        source = Path(tour.__file__).parent.joinpath(module, "tour.py").read_text()
        assert "overwrite=ctx.overwrite" in source, module


def test_decode_compare_leaves_neurons_without_a_top_token_out():
    """Two models whose up_proj rows 0-4 are zero in every layer: those neurons would 'agree' on an arbitrary token;
    they are excluded, and agreement is computed over the rest (the knowledge gate's rule for decode compare)."""
    from engramlab.decode.compare import compare_models
    from engramlab.models import from_hf

    models = []
    for seed in (0, 1):
        model = tiny_model("llama", seed)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.up_proj.weight[:5] = 0
        models.append(from_hf(model))
    result = compare_models(*models, site="up", top_k=3)
    assert result.n_excluded == 5 * 2 and result.excluded[:, :5].all() and not result.excluded[:, 5:].any()
    assert result.agreement == pytest.approx(float(result.same[:, 5:].mean()))
    summary = result.summary()
    assert summary["n_compared"] == summary["n_neurons"] - 10 and summary["excluded_neurons"]["count"] == 10


def test_fact_accuracy_mean_leaves_out_relations_without_prompts():
    from engramlab.organisms.evaluate import _mean_over_known

    assert _mean_over_known({"a": 0.5, "b": float("nan"), "c": 1.0}) == 0.75
    assert np.isnan(_mean_over_known({"b": float("nan")}))
