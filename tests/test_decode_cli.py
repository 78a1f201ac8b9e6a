"""`engramlab decode ...` end to end on a saved tiny Llama: files written, and every bad input ends with exit code 2
and one line on stderr."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import typer

import engramlab.cli
from conftest import INTERMEDIATE, LAYERS, run_cli, tiny_model
from engramlab.decode.cli import app as decode_app
from test_decode import tiny_tokenizer


@pytest.fixture(autouse=True)
def decode_mounted(monkeypatch):
    """Run through `engramlab.cli.main` (its error handling) with the decode commands mounted, whether or not the
    top-level CLI mounts them yet."""
    group = next((g for g in engramlab.cli.app.registered_groups if g.name == "decode"), None)
    if group is None or not group.typer_instance.registered_commands:
        root = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
        root.add_typer(decode_app, name="decode")
        monkeypatch.setattr(engramlab.cli, "app", root)


@pytest.fixture(autouse=True)
def no_transformers_bars():
    """transformers' own "Loading weights" bar writes to stderr; keep stderr to engramlab's lines here."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny Llama on disk whose neuron 1:5 decodes to w42."""
    path = tmp_path_factory.mktemp("tiny-llama-decode")
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[5] = 1000 * model.lm_head.weight[42]
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_atlas_search_compare_steer(saved, tmp_path, capsys):
    out = tmp_path / "atlas"
    code, stdout, err = run_cli(
        [
            "decode",
            "atlas",
            "--model",
            str(saved),
            "--top-k",
            "5",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--fold-norm",
            "--softmax",
        ],
        capsys,
    )
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"atlas.parquet", "summary.json", "atlas.html"}
    assert pq.read_table(out / "atlas.parquet").num_rows == LAYERS * INTERMEDIATE * 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fold_norm"] and 0 <= summary["top1_changed_by_fold_norm"] <= 1
    assert "top-1 token changed by --fold-norm" in stdout

    code, stdout, err = run_cli(
        [
            "decode",
            "search",
            "--atlas",
            str(out),
            "--word",
            "W42",
            "--limit",
            "3",
            "--out",
            str(tmp_path / "hits.parquet"),
        ],
        capsys,
    )
    assert code == 0, err
    assert pq.read_table(tmp_path / "hits.parquet").num_rows >= 1

    code, stdout, err = run_cli(
        ["decode", "compare", "--a", str(saved), "--b", str(saved), "--out", str(tmp_path / "cmp"), "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["agreement"] == 1.0
    assert "top-1 agreement 1.0000" in stdout

    code, stdout, err = run_cli(
        [
            "decode",
            "steer",
            "--model",
            str(saved),
            "--neuron",
            "1:5",
            "--values",
            "0,20",
            "--prompt",
            "w3 w4",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "steer"),
        ],
        capsys,
    )
    assert code == 0, err
    steer = json.loads((tmp_path / "steer" / "summary.json").read_text())
    assert steer["token"] == "w42" and [r["value"] for r in steer["rows"]] == [None, 0.0, 20.0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--neuron", "3"], "--neuron must be LAYER:INDEX"),
        (["--neuron", "a:b"], "--neuron must be LAYER:INDEX"),
        (["--neuron", "7:1"], "layer 7 is out of range"),
        (["--neuron", "1:37"], "neuron index 37 is out of range"),
        (["--neuron", "1:2", "--values", "1,x"], "--values must be comma-separated numbers"),
        (["--neuron", "1:2", "--chat"], "no chat template"),
        (["--neuron", "1:2", "--site", "down"], "cannot be clamped"),
    ],
)
def test_steer_bad_input_exits_2_one_line(saved, args, message, capsys):
    code, _, err = run_cli(
        ["decode", "steer", "--model", str(saved), "--prompt", "w3", "--device", "cpu", *args], capsys
    )
    assert message in one_line_error(code, err)


def test_other_bad_inputs_exit_2_one_line(saved, tmp_path, capsys):
    code, _, err = run_cli(["decode", "search", "--atlas", str(tmp_path), "--token", "w1"], capsys)
    assert "no atlas.parquet" in one_line_error(code, err)
    code, _, err = run_cli(
        ["decode", "atlas", "--model", str(saved), "--site", "mlp", "--out", str(tmp_path / "a"), "--device", "cpu"],
        capsys,
    )
    assert "not a decode site" in one_line_error(code, err)
    other = tmp_path / "wide"
    model = tiny_model("llama")
    model.config.intermediate_size = 37  # same config, but a different vocab below
    model.resize_token_embeddings(120)
    model.save_pretrained(other)
    code, _, err = run_cli(
        ["decode", "compare", "--a", str(saved), "--b", str(other), "--out", str(tmp_path / "c"), "--device", "cpu"],
        capsys,
    )
    line = one_line_error(code, err)
    assert "vocab 99" in line and "vocab 120" in line
    code, _, err = run_cli(
        ["decode", "compare", "--a", str(saved), "--b", str(saved), "--shared-head", "c", "--out", str(tmp_path / "d")],
        capsys,
    )
    assert "--shared-head must be a or b" in one_line_error(code, err)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_explorer_in_headless_chromium(saved, tmp_path, capsys):
    """The page runs in a real browser: a search by URL fragment lists the planted neuron, a click target opens it,
    and a screenshot is not blank."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    out = tmp_path / "atlas"
    assert run_cli(["decode", "atlas", "--model", str(saved), "--out", str(out), "--device", "cpu"], capsys)[0] == 0
    url = (out / "atlas.html").resolve().as_uri() + "#q=w42&mode=exact&n=1:5"
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run([*flags, "--dump-dom", url], check=False, capture_output=True, text=True, timeout=120).stdout
    assert 'data-g="42"' in dom  # neuron 1:5 = global row 1*37+5 listed among the hits
    assert "Neuron 1:5</h2>" in dom  # the #n=1:5 fragment opened the neuron panel
    assert '<code>"w42"</code>' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,900", f"--screenshot={shot}", url], check=False, capture_output=True, timeout=120
    )
    width, height, pixels = _png(shot.read_bytes())
    assert (width, height) == (1200, 900)
    assert len(set(pixels)) > 10  # text was drawn, not a blank page


def _png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the (filtered) pixel bytes of a PNG, without an imaging library."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_tour_step(saved, tmp_path):
    from engramlab.decode.tour import decode_step
    from engramlab.report.tour import TourContext

    result = decode_step(TourContext(model=str(saved), out=tmp_path, device="cpu", dtype="auto", seed=0))
    assert result.name == "decode" and result.summary["n_neurons"] == LAYERS * INTERMEDIATE
    assert 0 <= result.summary["top1_changed_by_fold_norm"] <= 1
    assert (tmp_path / "decode" / "atlas" / "atlas.html").is_file()
    assert "<td>1:5</td><td>&#x27;w42&#x27;" in result.section.tables[1]  # the planted neuron is the sharpest
