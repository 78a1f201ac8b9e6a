"""LM-head neuron decoding (Davies 2025): the atlas against a naive per-neuron loop on every family, ties, chunking,
fold-norm, softmax, parquet/explorer files, search, compare and clamp steering."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import transformers

from conftest import FAMILIES, INTERMEDIATE, LAYERS, VOCAB, tiny_model
from engramlab.decode import (
    compare_atlases,
    compare_models,
    decode_atlas,
    decode_vectors,
    load_atlas,
    naive_decode,
    neuron_vectors,
    search_atlas,
    steer_neuron,
    topk_rows,
    write_atlas,
    write_comparison,
)
from engramlab.decode.explorer import explorer_data
from engramlab.errors import EngramError
from engramlab.models import from_hf


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def integer_model(family: str, seed: int = 0, low: int = -2, high: int = 3):
    """A tiny model with small integer weights in float64: sums are exact and ties are frequent."""
    model = tiny_model(family, seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(low, high, p.shape, generator=g, dtype=torch.float64))
    return model


def explicit_vectors(model, family: str, site: str) -> list[torch.Tensor]:
    """The decoded vectors read straight off the modules, independently of `ModelLayout`."""
    out = []
    for layer in range(LAYERS):
        if family == "gpt2":
            mlp = model.transformer.h[layer].mlp
            w = {"up": mlp.c_fc.weight.T, "down": mlp.c_proj.weight}[site]  # Conv1D: [in, out]
        elif family == "gpt_neox":
            mlp = model.gpt_neox.layers[layer].mlp
            w = {"up": mlp.dense_h_to_4h.weight, "down": mlp.dense_4h_to_h.weight.T}[site]
        else:
            mlp = model.model.layers[layer].mlp
            w = {"up": mlp.up_proj.weight, "gate": mlp.gate_proj.weight, "down": mlp.down_proj.weight.T}[site]
        assert w.shape == (INTERMEDIATE, model.config.get_text_config().hidden_size)
        out.append(w.detach())
    return out


def sites_of(family: str) -> list[str]:
    return ["up", "gate", "down"] if family not in ("gpt2", "gpt_neox") else ["up", "down"]


# ----------------------------------------------------------------------------------------------------------------
# The atlas equals the naive per-neuron loop.


@pytest.mark.parametrize("family", FAMILIES)
def test_atlas_equals_naive_loop_with_ties(family):
    model = integer_model(family)
    loaded = from_hf(model)
    for site in sites_of(family):
        vectors = explicit_vectors(model, family, site)
        ref_ids, ref_scores = naive_decode(vectors, model.lm_head.weight.detach(), top_k=7)
        atlas = decode_atlas(loaded, site=site, top_k=7)
        assert atlas.ids.shape == (LAYERS, INTERMEDIATE, 7)
        assert np.array_equal(atlas.ids.reshape(-1, 7), ref_ids.numpy()), (family, site)
        assert np.array_equal(atlas.scores.reshape(-1, 7), ref_scores.float().numpy()), (family, site)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_atlas_equals_naive_loop_random_float64(family):
    model = tiny_model(family).double()
    atlas = decode_atlas(from_hf(model), top_k=5)
    ref_ids, ref_scores = naive_decode(explicit_vectors(model, family, "up"), model.lm_head.weight.detach(), 5)
    assert np.array_equal(atlas.ids.reshape(-1, 5), ref_ids.numpy())
    np.testing.assert_allclose(atlas.scores.reshape(-1, 5), ref_scores.numpy(), rtol=1e-6)


def test_integer_weights_do_create_ties_at_the_kth_place():
    """The tie test above is only meaningful if the k-th and (k+1)-th scores tie somewhere."""
    model = integer_model("llama")
    scores = torch.cat(neuron_vectors(from_hf(model).layout, "up")) @ model.lm_head.weight.detach().T
    top = torch.topk(scores, 8, dim=1).values
    assert (top[:, 6] == top[:, 7]).sum() > 10


def test_topk_rows_matches_stable_sort_on_adversarial_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (200, 30), generator=g).float()
    scores[0] = 0.0  # a whole row tied
    scores[1] = torch.arange(30).float()  # strictly increasing: best ids at the end
    coarse = torch.randn(300, 2000, generator=g).to(torch.bfloat16)  # bf16: short ties at the k-th place
    for matrix, ks in ((scores, (1, 2, 5, 21, 22, 29, 30)), (coarse, (1, 10))):
        ref = torch.sort(matrix, dim=1, descending=True, stable=True)
        for k in ks:
            vals, ids = topk_rows(matrix, k)
            assert torch.equal(ids, ref.indices[:, :k]), k
            assert torch.equal(vals, ref.values[:, :k]), k
    top = torch.topk(coarse.float(), 11, dim=1).values
    assert (top[:, 9] == top[:, 10]).any()  # the bf16 case does tie


def test_chunk_size_gives_identical_results():
    model = integer_model("llama", seed=3)
    vectors = neuron_vectors(from_hf(model).layout, "up")
    unembed = model.lm_head.weight.detach()
    reference = decode_vectors(vectors, unembed, 6, chunk_size=None)
    for chunk in (1, 2, 5, 36, 37, 38, 73, 74, 1000):
        decoded = decode_vectors(vectors, unembed, 6, chunk_size=chunk)
        assert torch.equal(decoded.ids, reference.ids), chunk
        assert torch.equal(decoded.scores, reference.scores), chunk


def test_bad_arguments_raise_engram_error():
    loaded = from_hf(tiny_model("gpt2"))
    with pytest.raises(EngramError, match="not gated"):
        decode_atlas(loaded, site="gate")
    with pytest.raises(EngramError, match="decode site"):
        decode_atlas(loaded, site="mlp")
    with pytest.raises(EngramError, match="--top-k"):
        decode_atlas(loaded, top_k=VOCAB + 1)
    with pytest.raises(EngramError, match="chunk_size"):
        decode_atlas(loaded, chunk_size=0)


# ----------------------------------------------------------------------------------------------------------------
# Fold-norm and softmax.


def test_fold_norm_equals_explicit_rmsnorm_formula_llama():
    model = tiny_model("llama").double()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.rand(model.config.hidden_size, dtype=torch.float64) * 2 - 0.5)
    atlas = decode_atlas(from_hf(model), top_k=4, fold_norm=True)
    g, eps = model.model.norm.weight.detach(), model.config.rms_norm_eps
    w = torch.cat([layer.mlp.up_proj.weight.detach() for layer in model.model.layers])  # [L*N, H]
    folded = g * w / torch.sqrt(w.pow(2).mean(dim=1, keepdim=True) + eps)
    ref = torch.sort(folded @ model.lm_head.weight.detach().T, dim=1, descending=True, stable=True)
    assert np.array_equal(atlas.ids.reshape(-1, 4), ref.indices[:, :4].numpy())
    np.testing.assert_allclose(atlas.scores.reshape(-1, 4), ref.values[:, :4].numpy(), rtol=1e-6)
    raw_top1 = (w @ model.lm_head.weight.detach().T).argmax(dim=1).numpy()
    assert np.array_equal(atlas.top1_raw.reshape(-1), raw_top1)
    changed = float(np.mean(raw_top1 != ref.indices[:, 0].numpy()))
    assert atlas.top1_changed_by_fold_norm == pytest.approx(changed)
    assert 0 < changed < 1  # a non-uniform gain does reorder some neurons
    assert atlas.summary()["top1_changed_by_fold_norm"] == pytest.approx(changed)


def test_fold_norm_uses_gemma_one_plus_weight():
    model = tiny_model("gemma").double()
    with torch.no_grad():
        model.model.norm.weight.normal_()
    atlas = decode_atlas(from_hf(model), top_k=3, fold_norm=True)
    g, eps = model.model.norm.weight.detach(), model.config.rms_norm_eps
    w = torch.cat([layer.mlp.up_proj.weight.detach() for layer in model.model.layers])
    folded = (1 + g) * w / torch.sqrt(w.pow(2).mean(dim=1, keepdim=True) + eps)
    ref = torch.sort(folded @ model.lm_head.weight.detach().T, dim=1, descending=True, stable=True)
    assert np.array_equal(atlas.ids.reshape(-1, 3), ref.indices[:, :3].numpy())


def test_softmax_is_over_the_whole_vocabulary():
    model = tiny_model("qwen2").double()
    atlas = decode_atlas(from_hf(model), top_k=3, softmax=True, chunk_size=10)
    w = torch.cat([layer.mlp.up_proj.weight.detach() for layer in model.model.layers])
    probs = torch.softmax(w @ model.lm_head.weight.detach().T, dim=1)
    expected = torch.gather(probs, 1, torch.as_tensor(atlas.ids.reshape(-1, 3)))
    np.testing.assert_allclose(atlas.probs.reshape(-1, 3), expected.numpy(), rtol=1e-5)


def test_half_precision_model_decodes_in_float32_on_cpu():
    model = tiny_model("llama").to(torch.bfloat16)
    atlas = decode_atlas(from_hf(model), top_k=3)
    ref_ids, _ = naive_decode(
        [v.float() for v in explicit_vectors(model, "llama", "up")], model.lm_head.weight.detach().float(), 3
    )
    assert np.array_equal(atlas.ids.reshape(-1, 3), ref_ids.numpy())


# ----------------------------------------------------------------------------------------------------------------
# Files, search, explorer.

PLANT = (1, 5, 42)  # layer, neuron, token id


@pytest.fixture
def planted():
    """A tiny Llama whose neuron 1:5 has an up row along the LM-head row of token 42 and writes that direction
    (its down_proj column), as a trained concept neuron would."""
    model = tiny_model("llama")
    with torch.no_grad():
        layer, neuron, token = PLANT
        model.lm_head.weight[token] *= 10  # a token the head can express strongly (tiny inits are ~0.02)
        direction = model.lm_head.weight[token] / model.lm_head.weight[token].norm()
        model.model.layers[layer].mlp.up_proj.weight[neuron] = 0.1 * direction
        model.model.layers[layer].mlp.down_proj.weight[:, neuron] = direction
    return from_hf(model, tokenizer=tiny_tokenizer(), ref="tiny-llama")


def test_write_atlas_files(planted, tmp_path):
    atlas = decode_atlas(planted, top_k=4, softmax=True)
    summary = write_atlas(atlas, tmp_path, rows_per_group=100)
    table = pq.read_table(tmp_path / "atlas.parquet")
    assert table.column_names == ["layer", "neuron", "rank", "token_id", "token", "score", "prob"]
    assert table.num_rows == LAYERS * INTERMEDIATE * 4
    assert pq.ParquetFile(tmp_path / "atlas.parquet").metadata.num_row_groups > 1  # streamed
    rows = table.to_pylist()
    assert all(r["token"] == f"w{r['token_id']}" or r["token_id"] < 2 for r in rows)
    first = [r for r in rows if (r["layer"], r["neuron"]) == PLANT[:2]]
    assert [r["rank"] for r in first] == [0, 1, 2, 3] and first[0]["token"] == "w42"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("n_neurons", "seconds", "neurons_per_second", "device", "site", "top_k", "fold_norm"):
        assert key in on_disk
    assert on_disk["n_neurons"] == LAYERS * INTERMEDIATE and summary["rows"] == table.num_rows
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files
    back = load_atlas(tmp_path)
    assert np.array_equal(back.ids, atlas.ids) and np.array_equal(back.scores, atlas.scores)
    assert back.token(42) == "w42"


def test_search_finds_the_planted_neuron(planted, tmp_path):
    write_atlas(decode_atlas(planted, top_k=5), tmp_path)
    hits = search_atlas(tmp_path, token="w42")
    assert (hits["layer"][0].as_py(), hits["neuron"][0].as_py(), hits["rank"][0].as_py()) == (1, 5, 0)
    assert hits["top_token"][0].as_py() == "w42"
    scores = hits["score"].to_pylist()
    assert scores == sorted(scores, reverse=True)
    assert search_atlas(tmp_path, word="  W42 ", limit=1).to_pylist()[0]["neuron"] == 5
    assert search_atlas(tmp_path, token_id=42, max_rank=1)["neuron"].to_pylist()[0] == 5
    assert search_atlas(tmp_path, token="w42", layers=[0]).num_rows == len(
        [n for n in search_atlas(tmp_path, token="w42")["layer"].to_pylist() if n == 0]
    )
    assert search_atlas(tmp_path, token="nope").num_rows == 0
    with pytest.raises(EngramError, match="exactly one"):
        search_atlas(tmp_path, token="w42", word="w42")
    with pytest.raises(EngramError, match=re.escape("no atlas.parquet")):
        search_atlas(tmp_path / "missing", token="w42")


def test_explorer_page_embeds_the_atlas(planted, tmp_path):
    atlas = decode_atlas(planted, top_k=3)
    summary = write_atlas(atlas, tmp_path)
    page = (tmp_path / "atlas.html").read_text()
    data = json.loads(
        re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', page, re.DOTALL).group(1)
    )
    assert data["complete"] and data["k"] == 3 and data["L"] == LAYERS and data["N"] == INTERMEDIATE
    assert len(data["t"]) == LAYERS * INTERMEDIATE * 3
    planted_row = (PLANT[0] * INTERMEDIATE + PLANT[1]) * 3
    assert data["tok"][data["t"][planted_row]] == "w42"
    assert "http" not in page.split("<script id")[0].replace("http-equiv", "")  # nothing fetched
    assert summary["explorer"]["complete"]
    capped = explorer_data(atlas, max_rows=20)
    assert not capped["complete"] and "cap 20" in capped["note"] and len(capped["t"]) == 20
    assert max(capped["n"]) < LAYERS * INTERMEDIATE


# ----------------------------------------------------------------------------------------------------------------
# Compare.


def test_compare_identical_and_shared_head():
    a = from_hf(tiny_model("llama"), ref="A")
    result = compare_models(a, from_hf(tiny_model("llama"), ref="A2"), top_k=5)
    assert result.agreement == 1.0 and result.overlap_at_k == 1.0
    assert result.agreement_per_layer == [1.0] * LAYERS and result.n_neurons == LAYERS * INTERMEDIATE
    assert result.chance_agreement < 0.5

    b_model = tiny_model("llama")
    with torch.no_grad():
        b_model.lm_head.weight.copy_(tiny_model("llama", seed=7).lm_head.weight)
    b = from_hf(b_model, ref="B")
    own = compare_models(a, b, top_k=5)
    assert own.agreement < 0.5  # only the head differs
    assert compare_models(a, b, shared_head="a").agreement == 1.0
    assert compare_models(a, b, shared_head="b").agreement == 1.0
    by_hand = (own.a.top1 == own.b.top1).mean(axis=1)
    np.testing.assert_allclose(own.agreement_per_layer, by_hand)


def test_compare_writes_files(tmp_path):
    a = from_hf(tiny_model("gpt2"), tokenizer=tiny_tokenizer(), ref="A")
    b = from_hf(tiny_model("gpt2", seed=1), tokenizer=tiny_tokenizer(), ref="B")
    summary = write_comparison(compare_models(a, b), tmp_path)
    for key in ("agreement", "agreement_per_layer", "n_neurons"):
        assert key in json.loads((tmp_path / "summary.json").read_text())
    table = pq.read_table(tmp_path / "compare.parquet")
    assert table.num_rows == summary["n_neurons"] == LAYERS * INTERMEDIATE
    assert np.mean(table["same"].to_numpy(zero_copy_only=False)) == pytest.approx(summary["agreement"])
    assert "plotly" in (tmp_path / "report.html").read_text()


def test_compare_mismatched_shapes_names_both():
    a = from_hf(tiny_model("llama"), ref="A")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=41,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    b = from_hf(transformers.LlamaForCausalLM(config).eval(), ref="B")
    with pytest.raises(EngramError, match=r"A \(A\) has 2 layers x 37 neurons.*B \(B\) has 2 layers x 41"):
        compare_models(a, b)
    with pytest.raises(EngramError, match="different shapes"):
        compare_atlases(decode_atlas(a, top_k=2), decode_atlas(b, top_k=2))


# ----------------------------------------------------------------------------------------------------------------
# Steering by clamping.


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_clamp_to_the_natural_value_leaves_logits_unchanged(family):
    """site up: a neuron whose up row (and bias) is zero outputs 0 everywhere, so clamping it to 0 is a no-op over
    a whole prompt; site act: on a one-token prompt the natural value is one number, clamp to exactly that."""
    model = tiny_model(family)
    layer, neuron = 1, 4
    with torch.no_grad():
        up = model.transformer.h[layer].mlp.c_fc if family == "gpt2" else model.model.layers[layer].mlp.up_proj
        if family == "gpt2":
            up.weight[:, neuron] = 0
            up.bias[neuron] = 0
        else:
            up.weight[neuron] = 0
    loaded = from_hf(model, tokenizer=tiny_tokenizer())
    prompt = "w5 w9 w17 w23"
    result = steer_neuron(loaded, layer, neuron, [0.0, 50.0], prompt, site="up", max_new_tokens=4, token="w7")
    assert result.natural_min == result.natural_max == 0.0
    assert result.prob[1] == pytest.approx(result.prob[0], rel=1e-6, abs=1e-9)
    assert result.continuation[1] == result.continuation[0]
    assert result.prob[2] != pytest.approx(result.prob[0], rel=1e-3)  # a large clamp does act

    ids = loaded.tokenizer("w11", return_tensors="pt")["input_ids"]
    with loaded.hooks.record("mlp.act", layer) as rec:
        baseline = model(input_ids=ids).logits
    natural = rec["mlp.act", layer][0, 0, neuron].item()
    with loaded.hooks.clamp("mlp.act", layer, [neuron], natural):
        clamped = model(input_ids=ids).logits
    assert torch.equal(clamped, baseline)
    one = steer_neuron(loaded, layer, neuron, [natural], "w11", site="act", max_new_tokens=0)
    assert one.natural_last == pytest.approx(natural)
    assert one.prob[1] == pytest.approx(one.prob[0], rel=1e-6)


def test_steer_promotes_the_planted_token(planted):
    result = steer_neuron(planted, 1, 5, [0, 30], "w3 w4 w8", site="act", max_new_tokens=3)
    assert result.token == "w42" and result.values == [None, 0.0, 30.0]
    assert result.prob[2] > 0.5 > result.prob[0]
    assert result.top_next[2] == "w42" and result.continuation[2].split()[0] == "w42"
    assert result.word_ids == [42] and result.prob_word == pytest.approx(result.prob)  # WordLevel: one spelling
    assert len(result.continuation) == 3


def test_steer_chat_template(planted):
    with pytest.raises(EngramError, match="no chat template"):
        steer_neuron(planted, 1, 5, [10], "w3", chat=True)
    planted.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w2{% endif %}"
    )
    result = steer_neuron(planted, 1, 5, [10], "w3 w4", chat=True, max_new_tokens=2)
    assert result.prompt.split() == ["w3", "w4", "w2"]


def test_steer_bad_neurons(planted):
    with pytest.raises(EngramError, match="layer 9 is out of range"):
        steer_neuron(planted, 9, 0, [1], "w3")
    with pytest.raises(EngramError, match="neuron index 37 is out of range"):
        steer_neuron(planted, 0, 37, [1], "w3")
    with pytest.raises(EngramError, match="cannot be clamped"):
        steer_neuron(planted, 0, 1, [1], "w3", site="down")
    with pytest.raises(EngramError, match="not one"):
        steer_neuron(planted, 0, 1, [1], "w3", token="w3 w4")


def test_auto_chunk_size_fits_memory():
    from engramlab.decode.atlas import auto_chunk_size

    rows = auto_chunk_size(128256, torch.float32, torch.device("cpu"))
    assert 1 <= rows <= 2048 and (rows % 64 == 0 or rows < 64)
    assert auto_chunk_size(10**12, torch.float32, torch.device("cpu")) == 1  # never zero
