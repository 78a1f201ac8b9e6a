"""Issue 5's template control, `--heldout-templates` and paper 1's perplexity probe, on tiny in-process models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import tiny_model
from engramlab.data.facts import load_relation
from engramlab.errors import EngramError
from engramlab.models import from_hf
from engramlab.relations.find import FindResult
from engramlab.relations.perplexity import pooled_perplexity, sentence_nll
from engramlab.relations.prompts import (
    PromptSet,
    evaluation_prompts,
    frames_in,
    identification_prompts,
    split_templates,
)
from engramlab.relations.template_control import template_control
from engramlab.relations.tokens import encode, subject_and_template
from engramlab.relations.units import UnitSpace
from test_relations_planted import ANSWER, PLANTED, _word_tokenizer, planted_gpt2

# --------------------------------------------------------------------------------------------------------------
# Subject spans -> token positions


def test_subject_positions_with_word_tokens_and_left_padding():
    tok = _word_tokenizer()
    texts = ["w3 w4 w5", "w30 w31 w7 w8 w9", "w2 w3 w4 w50"]
    spans = [(3, 5), (0, 7), (9, 12)]  # middle, start (two words), end
    batch, offsets = encode(tok, texts, "cpu", offsets=True)
    subject, template = subject_and_template(offsets, batch["attention_mask"], spans)
    # row 0 is left-padded by 2, row 2 by 1
    assert subject.int().tolist() == [[0, 0, 0, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]
    assert template.int().tolist() == [[0, 0, 1, 0, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]
    # left padding: positions are counted from each row's first real token
    assert batch["position_ids"][0].tolist() == [0, 0, 0, 1, 2]
    with pytest.raises(EngramError, match="no subject token"):
        subject_and_template(offsets, batch["attention_mask"], [(40, 45)] * 3)


def test_subject_tokens_of_organism_prompts_spell_the_subject():
    pytest.importorskip("engramlab.organisms.registry")
    from engramlab.organisms.registry import shipped_organisms

    if "base" not in shipped_organisms():
        pytest.skip("organism:base is not shipped")
    from engramlab.models import load_model

    tok = load_model("organism:base", device="cpu").tokenizer
    prompts = evaluation_prompts({n: load_relation(n) for n in ("company_ceo", "person_plays_pro_sport")})
    # subject first (stmt: "{}'s CEO is") and in the middle (p1b: "Question: The CEO of {} is? Answer:", qa, stmt2)
    index = np.concatenate([np.flatnonzero(prompts.frame == f)[:4] for f in ("stmt", "p1b", "qa", "stmt2")])
    chosen = prompts.subset(index)
    assert chosen.text[0].startswith(chosen.subject[0]) and not chosen.text[4].startswith(chosen.subject[4])
    batch, offsets = encode(tok, chosen.text, "cpu", offsets=True)
    subject, template = subject_and_template(offsets, batch["attention_mask"], chosen.subject_spans())
    for row, text in enumerate(chosen.text):
        ids = batch["input_ids"][row]
        assert tok.decode(ids[subject[row]]).strip() == chosen.subject[row]
        rest = text.replace(chosen.subject[row], "")
        assert "".join(tok.decode(ids[template[row]]).split()) == "".join(rest.split())  # the rest, BOS excluded
        assert not subject[row, ~batch["attention_mask"][row].bool()].any()


# --------------------------------------------------------------------------------------------------------------
# Template control on planted units


SUBJECT_UNIT, TEMPLATE_UNIT = 3, 7  # layer-0 fc_in outputs of the tiny GPT-2
A_SUBJECTS, A_WORD = range(30, 35), 11  # relation A's subjects, and one word of A's template


def _token_local_gpt2():
    """A GPT-2 whose layer-0 MLP sees only the current token (attention writes nothing, no position embedding).
    fc_in unit SUBJECT_UNIT reads e0 - e1, which only A's subject tokens carry; TEMPLATE_UNIT reads e2 - e3, which
    only A's template word carries. For every other token both readings are exactly 0."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        wte = model.transformer.wte.weight
        wte[:, 1] = wte[:, 0]
        wte[:, 3] = wte[:, 2]
        for t in A_SUBJECTS:
            wte[t, 0] += 3.0
            wte[t, 1] -= 3.0
        wte[A_WORD, 2] += 3.0
        wte[A_WORD, 3] -= 3.0
        fc = model.transformer.h[0].mlp.c_fc  # Conv1D: weight [in, out]
        for unit, (i, j) in ((SUBJECT_UNIT, (0, 1)), (TEMPLATE_UNIT, (2, 3))):
            fc.weight[:, unit] = 0.0
            fc.weight[i, unit], fc.weight[j, unit] = 1.0, -1.0
            fc.bias[unit] = 0.0
    return model


def _planted_prompts() -> tuple[PromptSet, list[tuple[np.ndarray, np.ndarray]]]:
    """5 prompts of relation A (subject in the middle) and 20 of B (subject first): chance AP = 0.2."""
    items = [("A", f"w{A_WORD} w12 {{}} w13", f"w{s}") for s in A_SUBJECTS]
    items += [("B", "{} w21 w22", f"w{40 + i % 10}") for i in range(20)]
    prompts = PromptSet(
        text=[t.replace("{}", s) for _, t, s in items],
        gold=["x"] * len(items),
        relation=np.array([r for r, _, _ in items], dtype=object),
        subject=[s for _, _, s in items],
        frame=np.array(["f"] * len(items), dtype=object),
        split=np.array(["selection"] * len(items), dtype=object),
        subject_start=np.array([t.index("{}") for _, t, _ in items]),
    )
    return prompts, [(np.arange(5), np.arange(5, 25))]


def test_template_control_tells_subject_units_from_template_units():
    loaded = from_hf(_token_local_gpt2(), _word_tokenizer())
    space = UnitSpace(loaded.layout)
    up0 = next(b for b in space.blocks if b.layer == 0 and b.site == "mlp.up").offset
    ap = np.zeros((1, space.size), dtype=np.float32)
    ap[0, up0 + SUBJECT_UNIT], ap[0, up0 + TEMPLATE_UNIT] = 0.9, 0.8  # rank 1 and 2
    found = FindResult(relations=["A"], ap=ap, units="neurons", response="mean", n_units=space.size, k=10)
    prompts, rows = _planted_prompts()
    control = template_control(loaded, found, prompts, rows, top=2, batch_size=8)
    first, second = control.rows
    assert (first["index"], first["site"], second["index"]) == (SUBJECT_UNIT, "mlp.up", TEMPLATE_UNIT)
    assert first["ap_subject"] == pytest.approx(1.0) and second["ap_template"] == pytest.approx(1.0)
    # the other side is exactly 0 on every prompt: all scores tie and AP is the positive rate
    assert first["ap_template"] == pytest.approx(0.2) and second["ap_subject"] == pytest.approx(0.2)
    assert first["ap_all"] == pytest.approx(1.0) and second["ap_all"] == pytest.approx(1.0)
    assert (first["detector"], second["detector"]) == ("subject", "template")
    assert control.summary["share_template_detectors"] == 0.5
    assert control.per_relation["A"]["median_ap_subject"] == pytest.approx(0.6)


# --------------------------------------------------------------------------------------------------------------
# --heldout-templates


def test_heldout_templates_default_none_and_custom():
    rels = {n: load_relation(n) for n in ("company_ceo", "country_capital")}
    default = split_templates(rels, None)
    assert frames_in(default, "heldout") == ["p1b", "stmt2"]
    assert frames_in(default, "selection") == ["p1", "stmt", "qa"]
    paper = split_templates(rels, "none")
    assert frames_in(paper, "heldout") == []
    assert frames_in(paper, "selection") == ["p1", "stmt", "qa", "p1b", "stmt2"]  # zs is never trained: unused
    custom = split_templates(rels, "p1, qa")
    assert frames_in(custom, "heldout") == ["p1", "qa"]
    assert frames_in(custom, "selection") == ["stmt", "p1b", "stmt2"]
    candidates = identification_prompts(custom, 200, 0)
    assert set(candidates.frame) == {"stmt", "p1b", "stmt2"}
    assert [t.split for t in load_relation("company_ceo").templates][:4] == ["selection"] * 3 + ["heldout"]  # cache
    with_zs = split_templates(rels, "zs")
    assert frames_in(with_zs, "heldout") == ["zs"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("p1b,stmt9", "unknown template frame 'stmt9'"),
        ("none,p1", "'none' cannot be combined"),
        ("p1,stmt,qa,p1b,stmt2", "keeps no template for selection"),
    ],
)
def test_heldout_templates_errors_name_the_problem(spec, message):
    rels = {"company_ceo": load_relation("company_ceo")}
    with pytest.raises(EngramError, match=message):
        split_templates(rels, spec)


def test_split_keeps_relation_file_frames(tmp_path):
    import json

    from engramlab.relations.prompts import load_relation_file

    path = tmp_path / "rel.json"
    samples = [{"subject": f"s{i}", "object": f"o{i}"} for i in range(20)]
    path.write_text(
        json.dumps({"name": "r", "prompt_templates": ["{} is in", "The home of {} is"], "samples": samples})
    )
    rel = load_relation_file(path)
    split = split_templates({"r": rel}, "file0_p1")
    assert [(t.frame, t.split) for t in split["r"].templates] == [
        ("file0_p1", "heldout"),
        ("file0_stmt", "selection"),
        ("file1_p1", "selection"),
        ("file1_stmt", "selection"),
    ]
    assert dataclasses.replace(rel) == rel  # the original is untouched


# --------------------------------------------------------------------------------------------------------------
# Perplexity probe


def test_perplexity_is_exp_mean_nll_by_hand_with_padding():
    model = tiny_model("gpt2")  # learned absolute positions: left padding must not shift them
    loaded = from_hf(model, _word_tokenizer())
    tok = loaded.tokenizer
    texts = ["w3 w4 w5 w6", "w7 w8", "w10 w11 w12 w13 w14 w15"]
    spans = [(9, 11), (3, 5), (16, 24)]  # the last word(s): "w6", "w8", "w14 w15"
    result = sentence_nll(loaded, texts, spans, batch_size=3)
    by_hand, obj_by_hand, counts = [], [], []
    with torch.no_grad():
        for text, n_obj in zip(texts, (1, 1, 2), strict=True):
            ids = torch.tensor([tok(text)["input_ids"]])
            logp = torch.log_softmax(
                model(input_ids=ids).logits[0, :-1].double(), dim=-1
            )  # no BOS: first token is context
            nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            by_hand.append(float(nll.sum()))
            obj_by_hand.append(float(nll[-n_obj:].sum()))
            counts.append(ids.shape[1] - 1)
    np.testing.assert_allclose(result.nll[0], by_hand, rtol=1e-5)
    np.testing.assert_allclose(result.span_nll[0], obj_by_hand, rtol=1e-5)
    assert result.n_tokens.tolist() == counts and result.n_span_tokens.tolist() == [1, 1, 2]
    expected = np.exp(np.sum(by_hand) / np.sum(counts))
    assert pooled_perplexity(result.nll[0], result.n_tokens) == pytest.approx(expected, rel=1e-5)


def test_perplexity_rises_when_the_planted_neuron_is_zeroed():
    loaded = from_hf(planted_gpt2(), _word_tokenizer())  # the planted neuron makes every next token w42
    space = UnitSpace(loaded.layout)
    planted = next(b for b in space.blocks if b.layer == 1 and b.site == "mlp.up").offset + PLANTED
    texts = [" ".join([f"w{ANSWER}"] * n) for n in (3, 4, 5)]
    spans = [(len(t) - 3, len(t)) for t in texts]
    sets = [np.array([], dtype=np.int64), np.array([planted]), np.array([planted + 1])]
    result = sentence_nll(loaded, texts, spans, space, sets, batch_size=4)
    before, after, neighbour = (pooled_perplexity(result.nll[s], result.n_tokens) for s in range(3))
    assert before < 1.5  # w42 is predicted with near certainty
    assert after > 100 * before
    assert neighbour == pytest.approx(before, rel=0.05)
    single = sentence_nll(loaded, texts[:1], spans[:1], space, [sets[1]], batch_size=1)
    assert single.nll[0, 0] == pytest.approx(result.nll[1, 0], rel=1e-5)  # batched rows equal a separate run


def test_channels_are_scored_from_their_gate_and_up_neurons():
    from engramlab.models import HookEngine
    from engramlab.relations.units import source_neurons

    layout = HookEngine(tiny_model("llama")).layout
    neurons, channels = UnitSpace(layout, "neurons"), UnitSpace(layout, "channels")
    act1 = next(b for b in channels.blocks if b.layer == 1 and b.site == "mlp.act").offset
    down0 = next(b for b in channels.blocks if b.layer == 0 and b.site == "mlp.down").offset
    ids, owner = source_neurons(neurons, channels, np.array([act1 + 4, down0 + 2]))
    layer, site, index = neurons.locate(ids)
    assert list(zip(layer.tolist(), site.tolist(), index.tolist(), strict=True)) == [
        (1, "mlp.gate", 4),
        (1, "mlp.up", 4),
        (0, "mlp.down", 2),
    ]
    assert owner.tolist() == [0, 0, 1]
