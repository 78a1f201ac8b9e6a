"""A model larger than its device: accelerate's device_map with CPU and disk offload (issue 21).

On CPU, a `max_memory` far below the model's size forces most layers onto disk (`offload_folder`); accelerate's
hooks bring each offloaded layer's weights in for its forward. Recordings (relations find), edits (zeroed units
in recall), patches (activation patching) and weight reads (the decode atlas) must give what the model gives
when it sits whole on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli
from engramlab.decode.atlas import decode_atlas
from engramlab.errors import EngramError
from engramlab.models.loading import is_offloaded, load_model, parse_max_memory
from engramlab.organisms.registry import shipped_organisms
from engramlab.relations.accuracy import recall
from engramlab.relations.find import FindResult
from engramlab.relations.units import UnitSpace

pytestmark = pytest.mark.skipif("base" not in shipped_organisms(), reason="organism:base is not shipped")

CAP = {"cpu": 15_000_000}  # bytes: the base organism is ~43 MB in bfloat16, ~86 MB in float32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(whole on the CPU, offloaded) copies of the base organism."""
    folder = tmp_path_factory.mktemp("offload")
    whole = load_model("organism:base", device="cpu")
    offloaded = load_model("organism:base", device="auto", max_memory=CAP, offload_folder=folder)
    return whole, offloaded


def test_the_model_is_really_offloaded(models):
    whole, offloaded = models
    assert not is_offloaded(whole.model) and is_offloaded(offloaded.model)
    placement = set(offloaded.model.hf_device_map.values())
    assert "disk" in placement, placement
    assert offloaded.device == torch.device("cpu") and offloaded.dtype == whole.dtype
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(offloaded.model(ids).logits, whole.model(ids).logits, rtol=0, atol=0)


def test_recordings_and_edits_match_the_whole_model(models):
    whole, offloaded = models
    prompts = ["The capital of France is", "The capital of Japan is", "Paris is a city in"]
    golds = ["Paris", "Tokyo", "France"]
    space = UnitSpace(whole.layout, "neurons")
    sets = [np.array([], dtype=np.int64), np.arange(0, space.size, 7)]  # nothing off, then every 7th unit off
    a = recall(whole, prompts, golds, space, sets, batch_size=2)
    b = recall(offloaded, prompts, golds, space, sets, batch_size=2)
    np.testing.assert_array_equal(a.predictions, b.predictions)
    assert (a.predictions[0] != a.predictions[1]).any()  # the edit changed something: it did fire
    with whole.hooks.record("mlp.act", None) as rec_a:
        whole.model(**whole.tokenizer(prompts, return_tensors="pt", padding=True))
    with offloaded.hooks.record("mlp.act", None) as rec_b:
        offloaded.model(**offloaded.tokenizer(prompts, return_tensors="pt", padding=True))
    for layer in range(whole.layout.n_layers):
        torch.testing.assert_close(rec_b["mlp.act", layer], rec_a["mlp.act", layer], rtol=0, atol=0)


def test_patching_matches_the_whole_model(models):
    from engramlab.data import statements
    from engramlab.posttrain import patching

    whole, offloaded = models
    stmts = statements.got_statements("cities", "all")
    pairs = patching.pairs_by_last_word(stmts, whole.tokenizer, 2)
    a = patching.patching_map(whole, whole, pairs, batch_size=64)
    b = patching.patching_map(offloaded, offloaded, pairs, batch_size=64)
    np.testing.assert_allclose(b.effect, a.effect, rtol=1e-5, atol=1e-5)  # float32 rounding, values ~5
    assert np.abs(a.effect).max() > 0  # the patches changed the metric somewhere


def test_decode_atlas_reads_offloaded_weights(models):
    whole, offloaded = models
    a = decode_atlas(whole, top_k=5, fold_norm=True)
    b = decode_atlas(offloaded, top_k=5, fold_norm=True)
    np.testing.assert_array_equal(b.ids, a.ids)
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b.top1_raw, a.top1_raw)
    assert is_offloaded(offloaded.model)  # every weight went back where it was


def test_relations_find_cli_with_disk_offload(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ENGRAMLAB_QUIET", "1")
    tiny = ["relations", "find", "--model", "organism:base", "--relations", "country_capital,city_country"]
    tiny += ["--max-prompts", "10", "--k", "20", "--batch-size", "8"]
    code, _, err = run_cli([*tiny, "--device", "cpu", "--out", str(tmp_path / "whole")], capsys)
    assert code == 0, err
    offload = ["--max-memory", "cpu=15MB", "--offload-folder", str(tmp_path / "disk")]
    code, _, err = run_cli([*tiny, "--device", "auto", *offload, "--out", str(tmp_path / "offloaded")], capsys)
    assert code == 0, err
    a, b = FindResult.load(tmp_path / "whole"), FindResult.load(tmp_path / "offloaded")
    np.testing.assert_array_equal(b.ap, a.ap)
    for name in a.relations:
        np.testing.assert_array_equal(b.top(name), a.top(name))


def test_offload_options_are_checked(tmp_path):
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory("") is None
    for bad in ("20GiB", "gpu=1GB", "cpu="):
        with pytest.raises(EngramError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(EngramError, match="with --device auto"):
        load_model("organism:base", device="cpu", max_memory=CAP)
