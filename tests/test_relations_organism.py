"""Paper 1 end to end on the shipped base organism, with tiny settings (two relations, a few prompts)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from engramlab.organisms.registry import shipped_organisms
from engramlab.relations.find import FindResult

pytestmark = pytest.mark.skipif("base" not in shipped_organisms(), reason="organism:base is not shipped")

TINY = [
    "--model",
    "organism:base",
    "--relations",
    "country_capital,city_country",
    "--max-prompts",
    "40",
    "--k",
    "100",
    "--device",
    "cpu",
    "--batch-size",
    "32",
]


def test_find_and_deactivate_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    out = tmp_path / "rsn"
    code, _, err = run_cli(
        ["relations", "deactivate", "--out", str(out), "--random-seeds", "2", "--eval-subjects", "6", *TINY], capsys
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "relations",
        "k",
        "mean_drop_target",
        "mean_drop_random",
        "mean_drop_target_seen_templates",
        "mean_drop_target_heldout_templates",
    ):
        assert key in summary
    rel = summary["per_relation"]["country_capital"]
    assert rel["acc_before"] > 0.3  # the organism knows capitals
    assert 0 <= rel["acc_after_target"] <= 1 and rel["acc_after_random_std"] >= 0
    assert (out / "report.html").stat().st_size > 1000 and (out / "neurons.parquet").is_file()
    found = FindResult.load(out)
    assert found.ap.shape == (2, 6 * (1536 * 2 + 256))
    assert np.nanmax(found.ap) > 0.5  # some unit separates the relations better than chance (0.2)

    # --resume continues only a run of the same command with the same options: it reuses the cached responses
    # and gives the same scores and results; another command or other options are refused with one line
    args = ["relations", "deactivate", "--out", str(out), "--random-seeds", "2", "--eval-subjects", "6", *TINY]
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(FindResult.load(out).ap, found.ap)
    assert json.loads((out / "summary.json").read_text())["per_relation"] == summary["per_relation"]
    for other in (["relations", "find", "--out", str(out), *TINY], [*args[:-2], "--eval-subjects", "5"]):
        code, _, err = run_cli([*other, "--resume"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err, err


def test_malformed_relation_file_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "rel.json"
    bad.write_text('{"name": "r", "prompt_templates": ["{} is in"], "samples": [{"subject": "a"}]}')
    code, _, err = run_cli(
        [
            "relations",
            "find",
            "--out",
            str(tmp_path / "o"),
            "--relations",
            "country_capital",
            "--relation-file",
            str(bad),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2
    assert str(bad) in err and "object" in err
    assert len(err.strip().splitlines()) == 1


def test_find_on_chosen_layers_and_reuse(tmp_path, capsys, monkeypatch):
    """`--layers 4-5` scores only the units of layers 4 and 5 (ids over those layers, the parquet naming them);
    a reuse with --neurons keeps the find's layers, and a contradicting --layers is refused in one line."""
    import pyarrow.parquet as pq

    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    out = tmp_path / "find"
    code, _, err = run_cli(["relations", "find", "--out", str(out), "--layers", "4-5", *TINY], capsys)
    assert code == 0, err
    found = FindResult.load(out)
    assert found.layers == [4, 5] and found.ap.shape == (2, 2 * (1536 * 2 + 256))
    assert set(pq.read_table(out / "neurons.parquet")["layer"].to_pylist()) <= {4, 5}
    assert json.loads((out / "summary.json").read_text())["layers"] == [4, 5]
    reuse = ["relations", "deactivate", "--neurons", str(out), "--random-seeds", "1", "--eval-subjects", "4"]
    code, _, err = run_cli([*reuse, "--out", str(tmp_path / "bad"), "--layers", "3", *TINY], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--layers" in err, err
    code, _, err = run_cli([*reuse, "--out", str(tmp_path / "ok"), "--no-diagnose", *TINY], capsys)
    assert code == 0, err
