"""Paper 1 building blocks: batched AP vs scikit-learn, the unit index, masks, responses on disk, recall rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from conftest import INTERMEDIATE, LAYERS, tiny_model
from engramlab.errors import EngramError
from engramlab.models import HookEngine
from engramlab.relations.accuracy import is_correct
from engramlab.relations.ap import average_precision, average_precision_chunked
from engramlab.relations.prompts import load_relation_file
from engramlab.relations.responses import ResponseMatrix
from engramlab.relations.units import UnitSpace, channel_scores, random_like


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.integers(1, 6), st.integers(0, 2**31 - 1), st.sampled_from([2, 5, 1000]))
def test_ap_equals_sklearn_with_ties(n_prompts, n_units, seed, levels):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(n_prompts, n_units)).astype(np.float32)  # few levels: many ties
    labels = rng.integers(0, 2, size=n_prompts)
    labels[0] = 1
    ours = average_precision(torch.from_numpy(scores), torch.from_numpy(labels)).numpy()
    reference = [average_precision_score(labels, scores[:, j]) for j in range(n_units)]
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)


def test_vectorised_ap_equals_per_unit_loop_and_chunks():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.normal(size=(50, 37)).round(1))
    labels = torch.from_numpy(rng.integers(0, 2, 50))
    whole = average_precision(scores, labels)
    loop = torch.stack([average_precision(scores[:, j : j + 1], labels)[0] for j in range(37)])
    torch.testing.assert_close(whole, loop, rtol=0, atol=1e-12)  # same numbers up to summation order
    torch.testing.assert_close(whole, average_precision_chunked(scores, labels, chunk=5), rtol=0, atol=1e-12)


def test_unit_space_numbers_gate_up_down_of_every_layer():
    layout = HookEngine(tiny_model("llama")).layout
    space = UnitSpace(layout)
    assert space.size == LAYERS * (2 * INTERMEDIATE + 32)
    layer, site, index = space.locate(np.array([0, INTERMEDIATE, 2 * INTERMEDIATE, space.size - 1]))
    assert layer.tolist() == [0, 0, 0, LAYERS - 1]
    assert site.tolist() == ["mlp.gate", "mlp.up", "mlp.down", "mlp.down"]
    assert index.tolist() == [0, 0, 0, 31]
    gpt2 = UnitSpace(HookEngine(tiny_model("gpt2")).layout)
    assert gpt2.sites == ("mlp.up", "mlp.down")
    with pytest.raises(EngramError, match="--units"):
        UnitSpace(layout, "heads")


def test_masks_switch_off_each_rows_own_units():
    space = UnitSpace(HookEngine(tiny_model("llama")).layout)
    sets = [np.array([1, INTERMEDIATE + 2]), np.array([], dtype=np.int64), np.array([space.size - 1])]
    masks = space.masks(sets)
    assert masks[("mlp.gate", 0)][0, 1] and masks[("mlp.up", 0)][0, 2]
    assert masks[("mlp.down", LAYERS - 1)][2, 31]
    assert sum(int(m.sum()) for m in masks.values()) == 3
    assert not any(m[1].any() for m in masks.values())


def test_channel_scores_take_the_better_of_gate_and_up():
    layout = HookEngine(tiny_model("llama")).layout
    neurons, channels = UnitSpace(layout, "neurons"), UnitSpace(layout, "channels")
    scores = np.random.default_rng(0).random((2, neurons.size))
    mapped = channel_scores(neurons, channels, scores)
    assert mapped.shape == (2, channels.size)
    np.testing.assert_array_equal(
        mapped[:, :INTERMEDIATE], np.maximum(scores[:, :INTERMEDIATE], scores[:, INTERMEDIATE : 2 * INTERMEDIATE])
    )
    np.testing.assert_array_equal(
        mapped[:, INTERMEDIATE : INTERMEDIATE + 32], scores[:, 2 * INTERMEDIATE : 2 * INTERMEDIATE + 32]
    )


def test_random_control_matches_site_counts_and_avoids_target():
    space = UnitSpace(HookEngine(tiny_model("llama")).layout)
    target = np.array([0, 1, 2, INTERMEDIATE + 5, 2 * INTERMEDIATE + 1])
    control = random_like(space, target, seed=3)
    assert sorted(space.site_of(control).tolist()) == sorted(space.site_of(target).tolist())
    assert not set(control) & set(target)
    assert np.array_equal(control, random_like(space, target, seed=3))
    assert not np.array_equal(control, random_like(space, target, seed=4))


def test_recall_rule():
    assert is_correct(" Paris.", "Paris")
    assert is_correct(" quarterback", "Quarterback")
    assert is_correct(" Unit", "United States")
    assert not is_correct(" ", "Paris")
    assert not is_correct(" Lyon", "Paris")
    assert not is_correct(" Parisian", "Paris")


def test_response_matrix_resumes_and_reads_columns(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(6, 4)
    m = ResponseMatrix(tmp_path / "r.f32", 6, 4, "job-a")
    m.append(data[:2])
    again = ResponseMatrix(tmp_path / "r.f32", 6, 4, "job-a")  # an interrupted run starts again
    assert again.done == 2
    again.append(data[2:])
    assert again.complete
    np.testing.assert_array_equal(again.columns(1, 3), data[:, 1:3])
    np.testing.assert_array_equal(again.columns(0, 4, rows=np.array([5, 0])), data[[5, 0]])
    fresh = ResponseMatrix(tmp_path / "r.f32", 6, 4, "job-b")  # another job never reuses the rows
    assert fresh.done == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "malformed JSON"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"name": "r", "samples": []}), "prompt_templates"),
        (json.dumps({"name": "r", "prompt_templates": ["no placeholder"], "samples": []}), "exactly once"),
        (json.dumps({"name": "r", "prompt_templates": ["{} is in"], "samples": [{"subject": "a"}]}), "object"),
        (
            json.dumps({"name": "r", "prompt_templates": ["{} is in"], "samples": [{"subject": "a", "object": "b"}]}),
            "at least 10",
        ),
    ],
)
def test_malformed_relation_file_is_named(tmp_path, content, message):
    path = tmp_path / "rel.json"
    path.write_text(content)
    with pytest.raises(EngramError, match=message) as err:
        load_relation_file(path)
    assert str(path) in str(err.value)


def test_relation_file_templates_split_selection_and_heldout(tmp_path):
    path = tmp_path / "rel.json"
    samples = [{"subject": f"s{i}", "object": f"o{i}"} for i in range(20)]
    path.write_text(
        json.dumps({"name": "my relation", "prompt_templates": ["{} is in", "The home of {} is"], "samples": samples})
    )
    rel = load_relation_file(path)
    assert rel.name == "my_relation"
    assert [t.text for t in rel.heldout_templates] == ["The home of {} is? Answer:", "The home of {} is"]
    assert rel.select_subjects.isdisjoint(rel.eval_subjects)
