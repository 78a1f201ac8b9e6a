"""Every study on a tiny MoE model (mixtral: batched experts; deepseek_v3: dense first layer, shared expert;
list_mixtral: a list of expert modules, as transformers 4 kept them) and a tiny fused gate+up model (phi3):
relations units and responses, the decode atlas, post-training patching and entropy neurons, and `models info`.
Weights are read straight off the parameters as references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engramlab.decode.atlas import decode_atlas, naive_decode
from engramlab.models import from_hf
from engramlab.models.info import model_info
from engramlab.models.tiny import tiny_model
from engramlab.posttrain import entropy, patching
from engramlab.relations.responses import ResponseMatrix, collect_responses
from engramlab.relations.units import UnitSpace
from list_moe import tiny_list_moe
from test_posttrain import PAIR, SHOTS, word_tokenizer

TEXTS = ["w30 w31 w32 w33", "w40 w41", "w50 w51 w52", "Paris is in France"]


def _loaded(family: str):
    model = tiny_list_moe(family) if family.startswith("list_") else tiny_model(family)
    return from_hf(model, word_tokenizer(), ref=family)


def _explicit(model, family: str, layer: int, site: str) -> torch.Tensor:
    """[neurons, H] read off the parameters, independently of ModelLayout."""
    mlp = model.model.layers[layer].mlp
    if family == "phi3":
        width = mlp.down_proj.weight.shape[1]
        fused = mlp.gate_up_proj.weight  # [2I, H]: gate rows first, then up (Phi3MLP.forward's chunk order)
        return {"gate": fused[:width], "up": fused[width:], "down": mlp.down_proj.weight.T}[site].detach()
    if family == "list_mixtral":  # one module per expert: w1 (gate), w3 (up), w2 (down)
        name = {"gate": "w1", "up": "w3", "down": "w2"}[site]
        weights = [getattr(expert, name).weight for expert in mlp.block_sparse_moe.experts]
        return torch.cat([w.T if site == "down" else w for w in weights]).detach()
    experts = mlp.experts  # mixtral: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    width = experts.down_proj.shape[2]
    if site == "down":
        return experts.down_proj.transpose(1, 2).reshape(-1, experts.down_proj.shape[1]).detach()
    half = experts.gate_up_proj[:, :width] if site == "gate" else experts.gate_up_proj[:, width:]
    return half.reshape(-1, half.shape[-1]).detach()


@pytest.mark.parametrize("family", ["mixtral", "list_mixtral", "phi3"])
@pytest.mark.parametrize("site", ["up", "gate", "down"])
def test_atlas_over_expert_neurons_and_fused_halves(family, site):
    loaded = _loaded(family)
    model = loaded.model
    atlas = decode_atlas(loaded, site=site, top_k=5)
    vectors = [_explicit(model, family, layer, site) for layer in range(loaded.layout.n_layers)]
    ref_ids, ref_scores = naive_decode(vectors, model.lm_head.weight.detach(), top_k=5)
    assert atlas.ids.shape == (loaded.layout.n_layers, vectors[0].shape[0], 5)
    assert np.array_equal(atlas.ids.reshape(-1, 5), ref_ids.numpy())
    np.testing.assert_allclose(atlas.scores.reshape(-1, 5), ref_scores.numpy(), rtol=1e-5)


def test_atlas_refuses_mixed_widths_in_one_line():
    from engramlab.errors import EngramError

    with pytest.raises(EngramError, match=r"different MLP widths \(layers 0-1: 96 neurons; layers 2: 240 neurons\)"):
        decode_atlas(_loaded("deepseek_v3"), top_k=3)


def test_atlas_over_chosen_layers_keeps_the_model_layer_numbers(tmp_path):
    """DeepSeek's MoE layer (2) and its dense layer 1 decoded on their own: rows equal the naive decode of those
    layers, and the parquet, the reloaded atlas and the explorer name the model's layer, not the atlas's block."""
    from engramlab.decode.atlas import load_atlas, write_atlas
    from engramlab.decode.explorer import explorer_data

    loaded = _loaded("deepseek_v3")
    for layers in ([2], [1]):
        atlas = decode_atlas(loaded, top_k=4, layers=layers)
        assert atlas.layer_ids == layers and atlas.summary()["layers"] == str(layers[0])
        vectors = [loaded.layout.neuron_vectors(layers[0], "up").detach()]
        ref_ids, _ = naive_decode(vectors, loaded.model.lm_head.weight.detach(), top_k=4)
        assert np.array_equal(atlas.ids.reshape(-1, 4), ref_ids.numpy())
        assert atlas.neuron(layers[0], 5)[0][0] == int(atlas.ids[0, 5, 0])
        write_atlas(atlas, tmp_path / str(layers[0]), explorer=False)
        back = load_atlas(tmp_path / str(layers[0]))
        assert back.layer_ids == layers and np.array_equal(back.ids, atlas.ids)
        assert explorer_data(atlas)["ly"] == layers


def test_atlas_of_a_hybrid_decodes_its_mlp_layers():
    """Nemotron-H: the Mamba and attention layers have nothing to decode; its MoE (240) and MLP (96) layers differ
    in width, so the default is refused naming both groups, and one group decodes."""
    from engramlab.errors import EngramError

    loaded = _loaded("nemotron_h")
    with pytest.raises(EngramError, match=r"layers 1: 240 neurons; layers 3: 96 neurons"):
        decode_atlas(loaded, top_k=3)
    with pytest.raises(EngramError, match="layer 0 has no MLP to decode"):
        decode_atlas(loaded, top_k=3, layers=[0, 3])
    atlas = decode_atlas(loaded, top_k=3, layers=[3])
    assert atlas.layer_ids == [3] and atlas.ids.shape == (1, 96, 3)


def test_layer_ranges_parse_and_refuse_in_one_line():
    from engramlab.cli_options import layer_ranges
    from engramlab.errors import EngramError

    assert layer_ranges("0-2,5,7-8") == [0, 1, 2, 5, 7, 8] and layer_ranges(None) is None
    for bad in ("a", "3-1", "-1", ",", "2-x"):
        with pytest.raises(EngramError, match="--layers"):
            layer_ranges(bad)


def test_relation_units_and_responses_on_experts(tmp_path):
    """Unit (expert e, neuron j) of the gate site responds with its mean gate pre-activation over the tokens routed
    to e, computed here from the experts' weights and the routing captured with a plain hook."""
    loaded = _loaded("mixtral")
    layout = loaded.layout
    space = UnitSpace(layout)
    per_layer = [layout.site_width(s, i) for i in range(layout.n_layers) for s in ("mlp.gate", "mlp.up", "mlp.down")]
    assert space.size == sum(per_layer) and space.sites == ("mlp.gate", "mlp.up", "mlp.down")
    matrix = ResponseMatrix(tmp_path / "r", len(TEXTS), space.size, "fp")
    collect_responses(loaded, TEXTS, space, matrix, batch_size=2)
    layer = 1
    mlp = layout.mlp(layer)
    experts = loaded.model.model.layers[layer].mlp.experts
    captured = {}
    handle = experts.register_forward_pre_hook(lambda m, args: captured.update(x=args[0], index=args[1]))
    block = next(b for b in space.blocks if b.layer == layer and b.site == "mlp.gate")
    for row, text in enumerate(TEXTS):
        with torch.no_grad():
            loaded.model(**loaded.tokenizer([text], return_tensors="pt"))
        x, index = captured["x"], captured["index"]  # [T, H], [T, k]
        for expert, neuron in ((0, 3), (2, 7), (3, mlp.width - 1)):
            routed = (index == expert).any(-1)
            gate = x[routed] @ experts.gate_up_proj[expert, neuron].detach()
            expected = float(gate.mean()) if routed.any() else 0.0
            got = matrix.columns(block.offset + mlp.unit(expert, neuron), block.offset + mlp.unit(expert, neuron) + 1)
            assert got[row, 0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    handle.remove()


def test_relation_units_on_a_list_of_experts(tmp_path):
    """With experts kept as modules, unit (expert e, neuron j) of the up site responds with the mean of e's up
    projection output over the rows e was called with, captured by a plain hook on that expert's w3."""
    loaded = _loaded("list_mixtral")
    layout = loaded.layout
    space = UnitSpace(layout)
    matrix = ResponseMatrix(tmp_path / "r", len(TEXTS), space.size, "fp")
    collect_responses(loaded, TEXTS, space, matrix, batch_size=2)
    layer, mlp = 1, layout.mlp(1)
    experts = loaded.model.model.layers[layer].mlp.block_sparse_moe.experts
    captured: dict[int, torch.Tensor] = {}
    handles = [
        expert.w3.register_forward_hook(lambda m, args, out, e=e: captured.__setitem__(e, out))
        for e, expert in enumerate(experts)
    ]
    block = next(b for b in space.blocks if b.layer == layer and b.site == "mlp.up")
    for row, text in enumerate(TEXTS):
        captured.clear()
        with torch.no_grad():
            loaded.model(**loaded.tokenizer([text], return_tensors="pt"))
        for expert, neuron in ((0, 3), (1, 7), (2, 0), (3, mlp.width - 1)):
            out = captured.get(expert)
            expected = float(out[:, neuron].mean()) if out is not None and len(out) else 0.0
            unit = block.offset + mlp.unit(expert, neuron)
            assert matrix.columns(unit, unit + 1)[row, 0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    for handle in handles:
        handle.remove()


def test_relation_responses_on_a_hybrid_skip_layers_without_an_mlp(tmp_path):
    """Nemotron-H: paper 1's units live in the MoE and MLP layers only; the responses of an MLP layer's up units
    are the plain means of its up projection's output."""
    loaded = _loaded("nemotron_h")
    space = UnitSpace(loaded.layout)
    matrix = ResponseMatrix(tmp_path / "r", len(TEXTS), space.size, "fp")
    collect_responses(loaded, TEXTS, space, matrix, batch_size=1)
    block = next(b for b in space.blocks if b.layer == 3 and b.site == "mlp.up")
    captured = {}
    handle = loaded.model.model.layers[3].mixer.up_proj.register_forward_hook(
        lambda m, args, out: captured.update(up=out)
    )
    for row, text in enumerate(TEXTS):
        with torch.no_grad():
            loaded.model(**loaded.tokenizer([text], return_tensors="pt"))
        expected = captured["up"][0].mean(0).numpy()
        np.testing.assert_allclose(matrix.columns(block.offset, block.offset + 4)[row], expected[:4], rtol=1e-4)
    handle.remove()


def test_unit_masks_switch_off_expert_and_shared_neurons():
    """Deactivating units through UnitSpace.masks on a mixed dense/MoE model equals zeroing the same neurons'
    weights (an expert's up rows, the shared expert's up rows, a dense layer's up rows)."""
    loaded = _loaded("deepseek_v3")
    layout, model = loaded.layout, loaded.model
    space = UnitSpace(layout)
    up = {b.layer: b for b in space.blocks if b.site == "mlp.up"}
    moe_layer = next(i for i in range(layout.n_layers) if layout.mlp(i).kind == "moe+shared")
    mlp = layout.mlp(moe_layer)
    ids = np.array(
        [up[0].offset + 4, up[moe_layer].offset + mlp.unit(1, 2), up[moe_layer].offset + mlp.routed_width + 5]
    )
    masks = space.masks([ids])
    ids_t = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), loaded.hooks.edit_neurons(masks):
        hooked = model(input_ids=ids_t).logits
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[4] = 0
        block = model.model.layers[moe_layer].mlp
        block.experts.gate_up_proj[1, mlp.width + 2] = 0
        block.shared_experts.up_proj.weight[5] = 0
        expected = model(input_ids=ids_t).logits
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "list_mixtral", "phi3"])
def test_entropy_neurons_read_expert_and_fused_down_columns(family):
    loaded = _loaded(family)
    result = entropy.entropy_neurons(loaded, n=3, chunk=7)
    model = loaded.model
    w_out = _explicit(model, family, loaded.layout.n_layers - 1, "down").numpy()  # [neurons, H]
    w_u = model.lm_head.weight.detach().numpy() * model.model.norm.weight.detach().numpy()[None]
    w_u = w_u - w_u.mean(0, keepdims=True)
    for i in (0, 11, w_out.shape[0] - 1):
        cos = w_u @ w_out[i] / (np.linalg.norm(w_u, axis=1) * np.linalg.norm(w_out[i]))
        assert result.logit_var[i] == pytest.approx(np.var(cos), rel=1e-4)
    effect = entropy.entropy_effect(loaded, list(result.selected[:2]), ["w30 w31 w32", "w40 w41"], batch_size=2)
    assert np.isfinite(effect["entropy"]) and len(effect["delta"]) == 2


@pytest.mark.parametrize("family", ["mixtral", "list_mixtral", "phi3", "nemotron_h"])
def test_patching_identical_runs_has_no_effect(family):
    loaded = _loaded(family)
    same = patching.Pair(PAIR.true, PAIR.true)
    result = patching.patching_map(loaded, loaded, [same], n_toks=4, shots=SHOTS)
    np.testing.assert_allclose(result.effect, result.corrupted, atol=1e-5)


@pytest.mark.parametrize(
    "family, kind, neurons",
    [
        ("mixtral", "moe", [384, 384]),
        ("list_mixtral", "moe", [192, 192]),
        ("phi3", "fused", [96, 96]),
        ("deepseek_v3", "gated, moe+shared", [96, 96, 240]),
        ("nemotron_h", "none, moe+shared, non-gated", [0, 240, 0, 96]),
    ],
)
def test_models_info(family, kind, neurons):
    info = model_info(_loaded(family))
    assert info["mlp_kind"] == kind
    per_layer = info["units_per_layer"]["mlp.act"]
    assert (per_layer if isinstance(per_layer, list) else [per_layer] * len(neurons)) == neurons
    assert info["mlp_neurons_total"] == sum(neurons)
    assert sum(info["parameters_by_part"].values()) == info["parameters"]
    if "moe" in kind:
        assert info["experts"]["experts"] == 4
        assert info["experts"]["stored_as"] == ("list of modules" if family.startswith("list_") else "batched tensors")
    else:
        assert info["experts"] is None


def test_posttrain_on_a_dense_and_moe_mix(tmp_path):
    """DeepSeek's dense first layers and MoE layers differ in width: base and post are compared layer by layer
    (not refused as differently shaped), and entropy neurons come from the last layer with an MLP."""
    from engramlab.posttrain import study

    for name in ("base", "post"):
        tiny_model("deepseek_v3").save_pretrained(tmp_path / name)
        word_tokenizer().save_pretrained(tmp_path / name)
    opts = study.Options(base=str(tmp_path / "base"), post=str(tmp_path / "post"), out=tmp_path / "o", device="cpu")
    base, _ = study._load(opts)
    found = entropy.entropy_neurons(base, n=3)
    assert found.layer == 2 and len(found.norm) == base.layout.site_width("mlp.act", 2)
    assert entropy.last_mlp_layer(_loaded("nemotron_h").layout) == 3


def test_relation_units_name_their_expert():
    """DeepSeek (dense layers 0-1, a MoE layer 2 with a shared expert): a unit's routed expert is its index over
    the layer's per-expert width; dense, shared-expert and block-output units have none (-1). The top-units
    table, the concentration summary and the report's expert heatmap all read it."""
    from engramlab.relations import plots
    from engramlab.relations.find import FindResult, expert_concentration, top_units_table

    layout = _loaded("deepseek_v3").layout
    space = UnitSpace(layout)
    mlp = layout.mlp(2)
    up = next(b for b in space.blocks if b.layer == 2 and b.site == "mlp.up")
    down = next(b for b in space.blocks if b.layer == 2 and b.site == "mlp.down")
    dense = next(b for b in space.blocks if b.layer == 0 and b.site == "mlp.up")
    ids = np.array([up.offset + mlp.unit(1, 3), up.offset + mlp.unit(3, 0), up.offset + mlp.unit(3, 7)])
    shared = up.offset + mlp.routed_width + 2
    assert space.experts_of(ids).tolist() == [1, 3, 3]
    assert space.experts_of(np.array([shared, down.offset, dense.offset + 4])).tolist() == [-1, -1, -1]
    ap = np.zeros((2, space.size), dtype=np.float32)
    ap[0, ids], ap[0, shared] = [0.9, 0.8, 0.7], 0.95
    ap[1, dense.offset + 4] = 0.9
    found = FindResult(relations=["r0", "r1"], ap=ap, units="neurons", response="last", n_units=space.size, k=4)
    table = top_units_table(found, space).to_pydict()
    assert table["expert"][:4] == [-1, 1, 3, 3]  # ranks 1-4 of r0: the shared unit, then the three expert units
    summary = expert_concentration(found, space)
    assert summary["r0"] == {"routed_units": 3, "experts_used": 2, "top_expert": "2:3", "top_expert_share": 0.6667}
    assert summary["r1"] == {"routed_units": 0, "experts_used": 0}  # a dense unit, then zero-AP units of layer 0
    figure = plots.expert_histogram(found, space)
    assert "2:3" in list(figure.data[0].x) and int(np.asarray(figure.data[0].z)[0].sum()) == 3


def test_atlas_of_a_moe_model_names_each_neurons_expert(tmp_path):
    """The atlas parquet of a MoE layer carries the routed expert of every neuron (-1 for the shared expert's),
    reloads with it, and `decode search` hits carry it too."""
    from engramlab.decode.atlas import load_atlas, write_atlas
    from engramlab.decode.search import search_atlas

    loaded = _loaded("deepseek_v3")
    mlp = loaded.layout.mlp(2)
    atlas = decode_atlas(loaded, top_k=3, layers=[2])
    expected = [j // mlp.width if j < mlp.routed_width else -1 for j in range(loaded.layout.site_width("mlp.up", 2))]
    assert atlas.expert_of().tolist() == expected
    write_atlas(atlas, tmp_path / "a", explorer=False)
    back = load_atlas(tmp_path / "a")
    assert back.experts == ((4, mlp.width),) and back.expert_of().tolist() == expected
    token_id = int(atlas.ids[0, mlp.unit(3, 5), 0])
    hits = search_atlas(tmp_path / "a", token_id=token_id, max_rank=1).to_pydict()
    assert 3 in hits["expert"] and all(e == expected[n] for e, n in zip(hits["expert"], hits["neuron"], strict=True))
    assert decode_atlas(loaded, top_k=3, layers=[0, 1]).experts is None  # dense layers only


def test_unit_space_over_chosen_layers():
    """A unit space over some layers: ids run over those layers only (sorted, without repeats), and a layer
    without an MLP is refused in one line."""
    from engramlab.errors import EngramError

    layout = _loaded("nemotron_h").layout
    space = UnitSpace(layout, layers=[3, 1, 3])
    assert space.layers == (1, 3) and [b.layer for b in space.blocks] == [1, 1, 3, 3]
    assert space.size == UnitSpace(layout).size  # layers 0 and 2 hold no units anyway
    only = UnitSpace(layout, layers=[3])
    assert only.size == 96 + 64 and only.blocks[0].offset == 0
    with pytest.raises(EngramError, match="--layers: nemotron_h layer 2 has no MLP"):
        UnitSpace(layout, layers=[2])
