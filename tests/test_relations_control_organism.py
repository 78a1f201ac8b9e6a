"""`relations diagnose`, `relations perplexity` and `--heldout-templates` end to end on the shipped base organism
(two relations, a few prompts)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from engramlab.cli import main
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
    "50",
    "--device",
    "cpu",
    "--batch-size",
    "32",
]


@pytest.fixture(scope="module")
def found_mean(tmp_path_factory):
    """One `relations find` with the paper's mean response, shared by the tests below."""
    out = tmp_path_factory.mktemp("rsn") / "find"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAMLAB_QUIET", "1")
        try:
            main(["relations", "find", "--out", str(out), "--response", "mean", *TINY])
        except SystemExit as exit_:
            assert exit_.code == 0
    return out


def test_diagnose_reuses_finds_prompts_and_negatives(found_mean, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    out = tmp_path / "diag"
    code, _, err = run_cli(
        ["relations", "diagnose", "--neurons", str(found_mean), "--out", str(out), "--top", "20", *TINY], capsys
    )
    assert code == 0, err
    rows = pq.read_table(out / "template_control.parquet").to_pydict()
    assert len(rows["relation"]) == 40 and set(rows["detector"]) <= {"template", "subject", "mixed"}
    # with --response mean the selection AP is the AP of the mean over all tokens: same prompts, same negatives
    np.testing.assert_allclose(rows["ap_all"], rows["ap"], atol=1e-6)
    found = FindResult.load(found_mean)
    assert rows["unit"][:20] == found.top("country_capital", 20).tolist()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("median_ap_subject", "median_ap_template", "share_template_detectors", "per_relation"):
        assert key in summary
    assert 0 <= summary["share_template_detectors"] <= 1
    assert "subject tokens vs from template tokens" in (out / "report.html").read_text()


def test_perplexity_probe_writes_rows_summary_and_plot(found_mean, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    out = tmp_path / "ppl"
    code, _, err = run_cli(
        [
            "relations",
            "perplexity",
            "--neurons",
            str(found_mean),
            "--out",
            str(out),
            "--random-seeds",
            "2",
            "--max-objects",
            "5",
            *TINY,
        ],
        capsys,
    )
    assert code == 0, err
    rows = pq.read_table(out / "perplexity.parquet").to_pydict()
    n_sentences = rows["condition"].count("none")
    assert 2 <= n_sentences <= 10
    assert len(rows["relation"]) == n_sentences * (2 + 2)  # none, target, 2 random seeds
    assert all(p > 1 for p in rows["ppl"])
    summary = json.loads((out / "summary.json").read_text())
    rel = summary["per_relation"]["country_capital"]
    assert rel["n_sentences"] <= 5 and rel["ppl_before"] > 1 and rel["ppl_after_target"] > 1
    assert summary["ppl_ratio_target"] > 0 and summary["n_relations"] == 2
    assert "Perplexity of the probe sentences" in (out / "report.html").read_text()


def test_heldout_templates_none_reports_no_heldout_drop(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    out = tmp_path / "none"
    code, _, err = run_cli(
        [
            "relations",
            "deactivate",
            "--out",
            str(out),
            "--heldout-templates",
            "none",
            "--eval-subjects",
            "4",
            "--random-seeds",
            "1",
            "--no-diagnose",
            *TINY,
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_templates"] == [] and "p1b" in summary["selection_templates"]
    assert (
        summary["mean_drop_target_heldout_templates"] is None and "no template is held out" in summary["heldout_note"]
    )
    assert "acc_before_heldout" not in summary["per_relation"]["country_capital"]
    found = FindResult.load(out)
    assert found.heldout_templates == [] and "stmt2" in found.selection_templates
    prompts = pq.read_table(out / "identification_prompts.parquet").to_pydict()
    assert {"p1b", "stmt2"} <= set(prompts["frame"])  # the paper's protocol selects on every template


def test_heldout_templates_errors_exit_2_with_one_line(found_mean, tmp_path, capsys):
    code, _, err = run_cli(
        ["relations", "deactivate", "--out", str(tmp_path / "x"), "--heldout-templates", "p1b,stmt7", *TINY], capsys
    )
    assert code == 2 and "'stmt7'" in err and len(err.strip().splitlines()) == 1
    # the reused units were selected on p1, stmt, qa: calling qa "held out" would be false
    code, _, err = run_cli(
        [
            "relations",
            "diagnose",
            "--neurons",
            str(found_mean),
            "--out",
            str(tmp_path / "y"),
            "--heldout-templates",
            "qa",
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and "'qa'" in err and len(err.strip().splitlines()) == 1
