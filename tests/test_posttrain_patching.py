"""Paper 3's patching variants and the truth-direction NIE on tiny random models, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from engramlab.data.chat import harmless_examples
from engramlab.data.statements import Statement, truefalse_prompt
from engramlab.errors import EngramError
from engramlab.models import from_hf
from engramlab.posttrain import patching, study, truth
from test_posttrain import PAIR, SHOTS, loaded, statement, word_tokenizer


def naive_cell(source, target, clean_prompt: str, corrupted_prompt: str, layer: int, position: int, metric) -> float:
    """One (layer, position) patch as a plain full-prompt forward (no batching, no prefix cache)."""
    tok = target.tokenizer
    with torch.inference_mode():
        with source.hooks.record("resid_post", None) as rec:
            source.model(**tok(clean_prompt, return_tensors="pt"))
        with target.hooks.patch("resid_post", layer, rec["resid_post", layer], positions=[position]):
            logits = target.model(**tok(corrupted_prompt, return_tensors="pt")).logits[:, -1]
    return float(metric(logits)[0])


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_batched_prefix_cached_map_equals_one_plain_forward_per_cell(family):
    source = from_hf(tiny_model(family, 0), word_tokenizer())
    target = from_hf(tiny_model(family, 1), word_tokenizer())
    result = patching.patching_map(source, target, [PAIR], n_toks=5, shots=SHOTS, batch_size=4)
    clean_prompt, corrupted_prompt = truefalse_prompt(PAIR.true, SHOTS), truefalse_prompt(PAIR.false, SHOTS)
    length = len(target.tokenizer(corrupted_prompt)["input_ids"])
    true_id, false_id = truth.label_token_ids(target.tokenizer)

    def metric(logits):
        return logits[:, true_id] - logits[:, false_id]

    for layer in range(2):
        for p in range(5):
            expected = naive_cell(source, target, clean_prompt, corrupted_prompt, layer, length - 5 + p, metric)
            assert result.effect[layer, p] == pytest.approx(expected, abs=1e-4), (layer, p)
    assert result.knowledge.tolist() == [True, False, False, False, False]  # "Italy" vs "France", then the same


def test_noise_variant_restores_only_what_the_noise_reached():
    lm = loaded()
    pair = patching.Pair(
        Statement("The city of Paris is in France .", True, "test", "Paris"),
        Statement("The city of Lyon is in Italy .", False, "test", "Lyon"),
    )
    result = patching.patching_map(lm, lm, [pair], n_toks=11, shots=SHOTS, variant="noise", noise_scale=3.0)
    tokens = result.tokens
    subject = tokens.index("Paris") if "Paris" in tokens else tokens.index("Lyon")
    assert result.knowledge.tolist() == [i == subject for i in range(11)]  # the subject token is the noised one
    assert abs(result.clean - result.corrupted) > 1e-3  # the noise changed the answer
    # before the subject, the clean and noisy runs agree: restoring there changes nothing
    np.testing.assert_allclose(result.effect[:, :subject], result.corrupted, atol=1e-5)
    # the last layer's last position is all the logits read: restoring it recovers the clean metric
    assert result.effect[-1, -1] == pytest.approx(result.clean, abs=1e-4)
    with pytest.raises(EngramError, match="same model"):
        patching.patching_map(lm, loaded(1), [pair], shots=SHOTS, variant="noise")


def test_no_question_metric_is_the_argmax_logit_difference():
    lm = loaded(1)
    tok = lm.tokenizer
    with torch.inference_mode():
        clean = lm.model(**tok("The city of Paris is in", return_tensors="pt")).logits[0, -1]
        corrupted = lm.model(**tok("The city of Rome is in", return_tensors="pt")).logits[0, -1]
    a, b = int(clean.argmax()), int(corrupted.argmax())
    assert a != b  # seed 1 gives two different answers, so the pair is kept
    pair = patching.Pair(
        statement("The city of Paris is in France", True), statement("The city of Rome is in France", False)
    )
    result = patching.patching_map(lm, lm, [pair], variant="no_question")
    assert result.tokens == ["The", "city", "of", "Rome", "is", "in"]
    assert result.clean == pytest.approx(float(clean[a] - clean[b]), abs=1e-5)
    assert result.corrupted == pytest.approx(float(corrupted[a] - corrupted[b]), abs=1e-5)
    assert result.effect[-1, -1] == pytest.approx(result.clean, abs=1e-4)
    assert result.knowledge.tolist() == [False, False, False, True, False, False]
    # Paris and Lyon both predict the same token: such a pair measures nothing and is dropped
    same = patching.Pair(pair.true, statement("The city of Lyon is in France", False))
    with pytest.raises(EngramError, match="predict the same token"):
        patching.patching_map(lm, lm, [same], variant="no_question")


def test_sft_statements_come_from_the_sft_answers_with_same_object_false_twins():
    answers = {e.assistant for e in harmless_examples("train")}
    stmts = patching.sft_statements(5)
    assert {s.source for s in stmts} == {"sft_plus", "sft_opposite", "sft_first"}
    for true, false in zip(stmts[::2], stmts[1::2], strict=True):
        assert true.label and not false.label
        assert true.text in answers and false.text not in answers
        assert true.text.split(" is ")[-1] == false.text.split(" is ")[-1]  # same object, another subject


def test_pool_groups_knowledge_other_and_last_positions():
    values = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 5.0]])
    pooled = patching.pool(values, np.array([False, True, False, True]))  # the last position counts as "last"
    np.testing.assert_allclose(pooled, [[2.0, 2.0, 4.0], [0.0, 0.5, 5.0]])


def test_nie_divides_the_mean_effects_as_the_paper_does():
    labels = np.array([True, True, False, False])
    pd_base = np.array([0.8, -0.9, -0.8, 0.6])  # the second true statement is already judged false
    pd_int = np.array([0.0, -0.8, 0.0, 0.6])
    out = truth.nie(pd_base, pd_int, labels)
    # by hand: true PD -0.05 -> -0.4, (-0.35)/(-0.95); false PD -0.1 -> 0.3, 0.4/1.1
    assert out["nie_true_to_false"] == pytest.approx(0.35 / 0.95)
    assert out["nie_false_to_true"] == pytest.approx(0.4 / 1.1)
    assert out["nie"] == pytest.approx((0.35 / 0.95 + 0.4 / 1.1) / 2)
    # a mean of per-statement ratios would give (0.444 - 1.0) / 2 < 0 for the true statements
    with pytest.raises(EngramError):
        truth.nie(pd_base[:2], pd_int[:2], labels[:2])


def test_intervention_sign_pushes_true_statements_to_false_and_back():
    lm = loaded()
    true_id, false_id = truth.label_token_ids(lm.tokenizer)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():  # a readout where direction u means TRUE and -u means FALSE
        lm.model.lm_head.weight[true_id] = 2 * u
        lm.model.lm_head.weight[false_id] = -2 * u
    stmts = [statement("The city of Paris is in France .", True), statement("The city of Lyon is in Italy .", False)]
    plain = truth.prob_difference(lm, stmts, shots=SHOTS)
    moved = truth.prob_difference(lm, stmts, direction=50 * u.numpy(), layers=[1], shots=SHOTS, positions="last")
    assert moved[0] < -0.9 and moved[1] > 0.9  # subtracted on the true statement, added on the false one
    assert truth.nie(plain, moved, np.array([True, False]))["nie"] > 0.9


def test_intervention_positions_of_each_kind():
    tok = word_tokenizer()
    prompts = [truefalse_prompt(s, SHOTS) for s in (PAIR.true, statement("The city of Rome .", True))]
    batch = tok(prompts, return_tensors="pt", padding=True)
    ids = batch["input_ids"]
    for where, expected in (("statement", ["France", "."]), ("object", ["France"]), ("last", ["is:"])):
        mask = truth.intervention_positions(tok, prompts, ids.shape[1], where)
        assert tok.convert_ids_to_tokens(ids[0][mask[0]].tolist()) == expected
    assert tok.convert_ids_to_tokens(ids[1][truth.intervention_positions(tok, prompts, ids.shape[1])[1]].tolist()) == [
        "Rome",
        ".",
    ]
    with pytest.raises(EngramError, match="positions"):
        truth.intervention_positions(tok, prompts, ids.shape[1], "middle")


def test_options_reject_unknown_variant_and_token():
    with pytest.raises(EngramError, match="--variant 'rome'"):
        study.Options(knowledge_variant="rome")
    with pytest.raises(EngramError, match="--token"):
        study.Options(truth_token="comma")


def test_cli_names_the_bad_option_in_one_line(tmp_path, capsys):
    from engramlab.cli import main

    for args, message in (
        (["knowledge", "--variant", "rome"], "--variant 'rome' is unknown"),
        (["truth", "--token", "comma"], "--token 'comma' is unknown"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["posttrain", *args, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_p_value_tells_whether_the_model_separates_the_pairs():
    def made(gaps):
        return patching.PatchingMap(
            effect=np.zeros((1, 1)),
            clean=0.0,
            corrupted=0.0,
            tokens=["x"],
            knowledge=np.zeros(1, dtype=bool),
            gaps=np.asarray(gaps),
        )

    assert made([2.0, 2.5, 1.5, 3.0]).p_value < 0.01
    assert made([0.3, -0.5, 0.1, -0.2]).p_value > 0.3
    assert np.isnan(made([1.0]).p_value)
    assert made([2.0, 2.5, 1.5, 3.0]).n_pairs == 4
