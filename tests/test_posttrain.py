"""Paper 3 building blocks on tiny random models: patching, directions, ablation, entropy neurons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import tiny_model
from engramlab.data.statements import Statement, truefalse_prompt
from engramlab.models import from_hf
from engramlab.posttrain import entropy, patching, refusal, truth

WORDS = [
    "<pad>",
    "<eos>",
    "TRUE",
    "FALSE",
    "This",
    "statement",
    "is:",
    "is",
    "in",
    "The",
    "city",
    "of",
    ".",
    "Paris",
    "Lyon",
    "Rome",
    "Milan",
    "France",
    "Italy",
    "User:",
    "Assistant:",
]


def word_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update({f"w{i}": i for i in range(len(WORDS), 99)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "left"
    return fast


def loaded(seed: int = 0):
    return from_hf(tiny_model("llama", seed), word_tokenizer())


def statement(text: str, label: bool) -> Statement:
    return Statement(text, label, "test")


SHOTS = [statement("The city of Paris is in France .", True), statement("The city of Rome is in France .", False)]
PAIR = patching.Pair(
    statement("The city of Paris is in France .", True), statement("The city of Lyon is in Italy .", False)
)


def test_patching_identical_runs_has_no_effect():
    lm = loaded()
    same = patching.Pair(PAIR.true, PAIR.true)
    result = patching.patching_map(lm, lm, [same], n_toks=5, shots=SHOTS)
    np.testing.assert_allclose(result.effect, result.corrupted, atol=1e-5)
    assert result.clean == pytest.approx(result.corrupted, abs=1e-6)


def test_patching_the_last_layer_everywhere_recovers_the_source_metric():
    lm = loaded()
    result = patching.patching_map(lm, lm, [PAIR], n_toks=1, shots=SHOTS)
    # the last position of the last layer's output is all the final logits depend on
    assert result.effect[-1, -1] == pytest.approx(result.clean, abs=1e-5)
    assert result.effect[0, -1] != pytest.approx(result.clean, abs=1e-3)


def test_cross_model_patching_uses_the_source_models_activations():
    a, b = loaded(0), loaded(1)
    result = patching.patching_map(a, b, [PAIR], n_toks=1, shots=SHOTS)
    batch = a.tokenizer(truefalse_prompt(PAIR.true, SHOTS), return_tensors="pt")
    with a.hooks.record("resid_post", 1) as rec:
        a.model(**batch)
    with torch.no_grad():
        logits = b.layout.lm_head(b.layout.final_norm(rec["resid_post", 1][:, -1]))[0]  # b reads out a's residual
    true_id, false_id = truth.label_token_ids(b.tokenizer)
    assert result.effect[-1, -1] == pytest.approx(float(logits[true_id] - logits[false_id]), abs=1e-5)


def test_binned_normalisation():
    effect = np.array([[0.0, 1.0], [0.5, 0.26]])
    np.testing.assert_allclose(patching.binned_normalise(effect), [[0.0, 1.0], [0.1, 0.0]])


def test_diff_in_means_recovers_a_planted_direction():
    rng = np.random.default_rng(0)
    v = rng.normal(size=32)
    labels = rng.integers(0, 2, 400).astype(bool)
    acts = rng.normal(size=(400, 32)) + np.where(labels, 1.0, -1.0)[:, None] * v
    d = truth.mm_direction(acts, labels)
    assert truth.cosine(d, v) > 0.98
    probe = truth.Probe.fit(d, acts, labels)
    assert probe.accuracy(acts, labels) > 0.95
    orthogonal = rng.normal(size=32)
    orthogonal -= (orthogonal @ v) / (v @ v) * v  # a direction that carries no label information
    assert truth.Probe.fit(orthogonal, acts, labels).accuracy(acts, labels) < 0.65


def test_statement_acts_are_the_last_token_residual():
    lm = loaded()
    texts = ["The city of Paris is in France .", "The city of Rome ."]
    acts = truth.statement_acts(lm, texts, [0, 1])
    batch = lm.tokenizer(texts[1:], return_tensors="pt")
    with lm.hooks.record("resid_post", 1) as rec:
        lm.model(**batch)
    np.testing.assert_allclose(acts[1][1], rec["resid_post", 1][0, -1].numpy(), atol=1e-5)


def test_truth_intervention_moves_pd_and_nie_formula():
    lm = loaded()
    stmts = [statement("The city of Paris is in France .", True), statement("The city of Lyon is in Italy .", False)]
    plain = truth.prob_difference(lm, stmts, shots=SHOTS)
    d = np.random.default_rng(0).normal(size=32).astype(np.float32) * 5
    moved = truth.prob_difference(lm, stmts, direction=d, layers=[0, 1], shots=SHOTS)
    assert not np.allclose(plain, moved)
    out = truth.nie(np.array([0.5, -0.5]), np.array([-1.0, 1.0]), np.array([True, False]))
    assert (out["nie_true_to_false"], out["nie_false_to_true"], out["nie"]) == (1.0, 1.0, 1.0)


def test_refusal_ablation_leaves_no_component_anywhere():
    lm = loaded()
    r = np.random.default_rng(0).normal(size=32).astype(np.float32)
    unit = torch.as_tensor(r / np.linalg.norm(r))
    batch = lm.tokenizer(["User: w30 w31 Assistant:"], return_tensors="pt")
    with refusal.ablation(lm, r), lm.hooks.record(["resid_pre", "resid_post"], None) as rec:
        lm.model(**batch)
    for key in rec.keys():  # noqa: SIM118 (a Recording is not iterable)
        assert (rec[key] @ unit).abs().max() < 1e-5, key


def test_refusal_direction_is_mean_difference():
    lm = loaded()
    harmful, harmless = ["User: w30 w31 Assistant:", "User: w40 Assistant:"], ["User: w50 w51 w52 Assistant:"]
    d = refusal.refusal_direction(lm, harmful, harmless, layer=1)
    batch = lm.tokenizer(harmful, return_tensors="pt", padding=True)
    with lm.hooks.record("resid_pre", 1, positions="last") as rec:
        lm.model(**batch)
    with lm.hooks.record("resid_pre", 1, positions="last") as rec2:
        lm.model(**lm.tokenizer(harmless, return_tensors="pt"))
    expected = rec["resid_pre", 1].double().mean(0) - rec2["resid_pre", 1].double().mean(0)
    np.testing.assert_allclose(d, expected.numpy(), atol=1e-6)
    assert refusal.refusal_rate(["I'm sorry, no.", "Sure: here", "  I cannot do that"]) == pytest.approx(2 / 3)


def test_logit_var_equals_direct_computation():
    lm = loaded()
    result = entropy.entropy_neurons(lm, n=3, chunk=5)
    model = lm.model
    w_out = model.model.layers[-1].mlp.down_proj.weight.detach().T.numpy()  # [I, H]
    w_u = model.lm_head.weight.detach().numpy() * model.model.norm.weight.detach().numpy()[None]
    w_u = w_u - w_u.mean(0, keepdims=True)
    for i in (0, 7, 36):
        cos = [w_out[i] @ w_u[v] / (np.linalg.norm(w_out[i]) * np.linalg.norm(w_u[v])) for v in range(w_u.shape[0])]
        assert result.logit_var[i] == pytest.approx(np.var(cos), rel=1e-4)
        assert result.norm[i] == pytest.approx(np.linalg.norm(w_out[i]), rel=1e-5)
    high = result.norm[result.selected] > np.percentile(result.norm, 75)
    assert high.all() and len(result.selected) == 3
    assert entropy.iou([1, 2, 3], [2, 3, 4]) == 0.5


def test_entropy_effect_of_mean_ablation():
    lm = loaded()
    effect = entropy.entropy_effect(lm, [0, 5], ["w30 w31 w32", "w40 w41"], batch_size=2)
    assert len(effect["delta"]) == 2 and np.isfinite(effect["entropy"])
    assert any(abs(d) > 0 for d in effect["delta"])
