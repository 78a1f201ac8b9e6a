"""The knowledge gate (issue 22): a relation the model does not know is excluded from selection and from every
mean, listed in summary.json, on stderr and in report.html; a NaN AP never ranks a unit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_cli
from engramlab.errors import EngramError
from engramlab.organisms.registry import shipped_organisms
from engramlab.relations.find import FindResult
from engramlab.relations.gate import KnowledgeGate, require_two

# A relation organism:base never saw: superheroes and their secret identities (LRE's superhero_person shape).
HEROES = [
    ("Batman", "Bruce Wayne"),
    ("Superman", "Clark Kent"),
    ("Spider-Man", "Peter Parker"),
    ("Iron Man", "Tony Stark"),
    ("Wonder Woman", "Diana Prince"),
    ("Black Widow", "Natasha Romanoff"),
    ("Hulk", "Bruce Banner"),
    ("Captain America", "Steve Rogers"),
    ("Flash", "Barry Allen"),
    ("Green Lantern", "Hal Jordan"),
    ("Aquaman", "Arthur Curry"),
    ("Daredevil", "Matt Murdock"),
    ("Wolverine", "Logan Howlett"),
    ("Storm", "Ororo Munroe"),
    ("Cyclops", "Scott Summers"),
    ("Hawkeye", "Clint Barton"),
    ("Doctor Strange", "Stephen Strange"),
    ("Ant-Man", "Scott Lang"),
    ("Batgirl", "Barbara Gordon"),
    ("Catwoman", "Selina Kyle"),
    ("Green Arrow", "Oliver Queen"),
    ("Deadpool", "Wade Wilson"),
    ("Punisher", "Frank Castle"),
    ("Beast", "Hank McCoy"),
]


def superhero_file(path, name="superhero person"):
    samples = [{"subject": s, "object": o} for s, o in HEROES]
    templates = ["{} is the alter ego of", "The secret identity of {} is"]
    path.write_text(json.dumps({"name": name, "prompt_templates": templates, "samples": samples}))
    return path


def test_gate_reasons_and_split():
    gate = KnowledgeGate(min_validated=10, min_share=0.2)
    assert gate.reason(10, 50) is None and gate.reason(40, 200) is None
    assert "0 of 40" in gate.reason(0, 40) and "at least 10" in gate.reason(9, 12)
    assert "at least 20%" in gate.reason(30, 200)  # enough prompts, too small a share
    kept, excluded = gate.split(
        {
            "a": {"validated": 50, "candidates": 60},
            "b": {"validated": 3, "candidates": 60},
            "c": {"validated": 20, "candidates": 25},
        }
    )
    assert kept == ["a", "c"] and set(excluded) == {"b"} and excluded["b"]["validated"] == 3
    with pytest.raises(EngramError, match="does not know any requested relation"):
        require_two([], excluded, "m")
    with pytest.raises(EngramError, match="only 'a' passes"):
        require_two(["a"], excluded, "m")
    for bad in ({"min_validated": 0}, {"min_share": 1.5}):
        with pytest.raises(EngramError):
            KnowledgeGate(**bad)


def _found(ap, counts=None) -> FindResult:
    names = [f"r{i}" for i in range(ap.shape[0])]
    counts = counts or {n: {"candidates": 50, "validated": 50, "negatives": 100} for n in names}
    return FindResult(names, ap.astype(np.float32), "neurons", "last", ap.shape[1], 3, counts)


def test_nan_ap_never_ranks_a_unit():
    ap = np.array([[0.9, np.nan, 0.5, np.nan, 0.7], [np.nan] * 5])
    found = _found(ap)
    assert found.top("r0").tolist() == [0, 4, 2]
    assert found.top("r0", 5).tolist() == [0, 4, 2]  # never the NaN units, even when k asks for more
    with pytest.raises(EngramError, match="no AP scores"):
        found.top("r1")


def test_old_find_folder_without_gate_is_gated_on_load(tmp_path):
    """A find folder written before the gate, with one relation the model never answered (an all-NaN AP row, the
    issue's 500 'top units' with AP NaN), loses that relation when reused."""
    ap = np.vstack([np.random.default_rng(0).random((2, 8)), np.full((1, 8), np.nan)]).astype(np.float32)
    counts = {
        "r0": {"candidates": 40, "validated": 40, "negatives": 80},
        "r1": {"candidates": 40, "validated": 38, "negatives": 80},
        "r2": {"candidates": 40, "validated": 0, "negatives": 0},
    }
    meta = {"relations": ["r0", "r1", "r2"], "units": "neurons", "response": "last", "n_units": 8, "k": 3}
    (tmp_path / "find.json").write_text(json.dumps({**meta, "counts": counts, "seconds": 1.0}))
    save_file({"ap": ap}, str(tmp_path / "ap.safetensors"))
    found = FindResult.load(tmp_path).gated(KnowledgeGate())
    assert found.relations == ["r0", "r1"] and found.ap.shape == (2, 8)
    assert found.excluded["r2"]["validated"] == 0 and "r2" not in found.counts
    strict = FindResult.load(tmp_path).gated(KnowledgeGate(min_validated=39))
    assert strict.relations == ["r0"] and set(strict.excluded) == {"r1", "r2"}


organism = pytest.mark.skipif("base" not in shipped_organisms(), reason="organism:base is not shipped")
TINY = ["--model", "organism:base", "--max-prompts", "40", "--k", "100", "--device", "cpu", "--batch-size", "32"]


@organism
def test_unknown_relation_is_excluded_named_and_kept_out_of_every_mean(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    out = tmp_path / "rsn"
    args = ["relations", "deactivate", "--out", str(out), "--relations", "country_capital,city_country"]
    args += ["--relation-file", str(superhero_file(tmp_path / "hero.json")), "--eval-subjects", "6"]
    code, _, err = run_cli([*args, "--random-seeds", "2", "--no-diagnose", *TINY], capsys)
    assert code == 0, err
    assert err.strip().splitlines() == [
        "warning: relation 'superhero_person' excluded by the knowledge gate: 0 of 40 identification prompts "
        "answered correctly (the gate needs at least 10)."
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["excluded_relations"]["superhero_person"]["validated"] == 0
    assert set(summary["per_relation"]) == {"country_capital", "city_country"} == set(summary["relations"])
    per = summary["per_relation"].values()
    expected = np.mean([r["acc_before"] - r["acc_after_target"] for r in per])
    assert summary["mean_drop_target"] == pytest.approx(expected)
    found = FindResult.load(out)
    assert found.relations == ["country_capital", "city_country"] and np.isfinite(found.ap).all()
    report = (out / "report.html").read_text()
    assert "Knowledge gate: excluded relations" in report and "superhero_person" in report

    # every requested relation unknown: one line, exit 2, as before the gate
    code, _, err = run_cli(
        [
            "relations",
            "find",
            "--out",
            str(tmp_path / "none"),
            "--relations",
            "",
            "--relation-file",
            str(superhero_file(tmp_path / "a.json", "hero a")),
            "--relation-file",
            str(superhero_file(tmp_path / "b.json", "hero b")),
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not know any requested relation" in err
