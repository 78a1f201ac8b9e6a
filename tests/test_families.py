"""Layout discovery and the hook engine on one tiny family per MLP kind, saved with save_pretrained and loaded back.

Kinds: gated (qwen3), non-gated with flattened [B*T, D] MLP tensors (opt), parallel attention+MLP (gptj), fused
gate+up (phi3), MoE with batched expert tensors (mixtral), MoE with a shared expert and dense first layers
(deepseek_v3), MoE with interleaved, biased, clamped experts (gpt_oss), Llama 4's every-expert-sees-every-token
experts (llama4_text), a hybrid whose layers hold one block each - Mamba, MoE, attention or MLP - so that some
have no MLP (nemotron_h), and MoE with a list of expert modules in four routing codes (tests/list_moe.py: Mixtral and
Qwen2-MoE as transformers 4 wrote them, DeepSeek-V2's remote code, a top-1 non-gated switch). References come from
plain PyTorch hooks and from weight edits on a copy of the model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import no_hooks_left
from engramlab.errors import EngramError
from engramlab.models import ExpertsMlp, load_model
from engramlab.models.census import check_family, run_census, run_checks, summary
from engramlab.models.layout import iter_dense
from engramlab.models.tiny import tiny_model
from list_moe import STYLES as LIST_STYLES
from list_moe import tiny_list_moe

KINDS = {
    "qwen3": "gated",
    "opt": "non-gated",
    "gptj": "non-gated",
    "phi3": "fused",
    "mixtral": "moe",
    "deepseek_v3": "gated, moe+shared",
    "gpt_oss": "moe",
    "llama4_text": "moe+shared",
    "nemotron_h": "none, moe+shared, non-gated",
    "list_mixtral": "moe",
    "list_qwen2_moe": "gated, moe+shared",
    "list_deepseek": "moe+shared",
    "list_switch": "moe",
}


def _build(name: str):
    return tiny_list_moe(name) if name in LIST_STYLES else tiny_model(name)


@pytest.fixture(scope="module", params=list(KINDS))
def loaded(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    _build(request.param).save_pretrained(path)
    return load_model(str(path), device="cpu", with_tokenizer=False)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 200, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _no_taps_left(model) -> bool:
    return no_hooks_left(model) and all("forward" not in vars(m) for m in model.modules())


def test_discovery_finds_the_kind(loaded):
    spec = loaded.layout.spec
    assert ", ".join(spec.mlp_kinds) == KINDS[spec.family]
    assert loaded.layout.hidden_size == 64
    for layer_spec in spec.layer_specs:
        if isinstance(layer_spec.mlp, ExpertsMlp):
            assert layer_spec.mlp.n_experts == 4
            assert layer_spec.neurons == 4 * layer_spec.mlp.width + (
                layer_spec.mlp.shared.width if layer_spec.mlp.shared else 0
            )


def test_census_checks_pass_after_loading(loaded, batch):
    verdicts = run_checks(loaded.model, loaded.layout, {k: v[1:] for k, v in batch.items()})
    assert not [v for v in verdicts.values() if v.startswith("fail")], verdicts


def _plain_down_inputs(loaded, batch) -> dict:
    """Each dense MLP's down-projection input, captured with plain hooks (no engine)."""
    captured, handles = {}, []
    layout = loaded.layout
    for layer in range(layout.n_layers):
        for dense, offset in iter_dense(layout.layer_spec(layer)):
            module = layout.layers[layer].get_submodule(dense.down.path)

            def pre(mod, args, key=(layer, offset)):
                captured[key] = args[0].detach().clone()

            handles.append(module.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            logits = loaded.model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    return captured, logits


def test_every_site_records_without_changing_logits(loaded, batch):
    layout, engine = loaded.layout, loaded.hooks
    captured, plain = _plain_down_inputs(loaded, batch)
    keys = [
        (s, i)
        for s in ("resid_pre", "resid_post", "attn.out", "mlp.gate", "mlp.up", "mlp.act", "mlp.down")
        for i in range(layout.n_layers)
        if layout.has_site(s, i)
    ]
    from engramlab.models.hooks import Recording

    with torch.no_grad(), Recording(engine, keys, "all", None, torch.float32, False) as rec:
        hooked = loaded.model(**batch).logits
    assert torch.equal(plain, hooked)
    for site, layer in keys:
        assert rec[site, layer].shape == (2, 6, layout.site_width(site, layer))
    for (layer, offset), down_in in captured.items():
        width = down_in.shape[-1]
        got = rec["mlp.act", layer][..., offset : offset + width]
        torch.testing.assert_close(got, down_in.reshape(got.shape), rtol=0, atol=0)
    assert _no_taps_left(loaded.model)


def _weight_edited(loaded, site: str, layer: int, units: list[int], factor: float = 0.0):
    """A copy of the model whose weights do what scaling `units` of (site, layer) by `factor` does."""
    edited = copy.deepcopy(loaded.model)
    layout = loaded.layout
    block = edited.get_submodule(layout.spec.layers)[layer]
    spec = layout.layer_spec(layer)
    index = torch.as_tensor(units)
    with torch.no_grad():
        for dense, offset in iter_dense(spec):
            _scale_dense(block, dense, site, index[(index >= offset) & (index < offset + dense.width)] - offset, factor)
        if isinstance(spec.mlp, ExpertsMlp):
            mlp = spec.mlp
            experts = block.get_submodule(mlp.experts)
            routed = index[index < mlp.routed_width]
            expert, neuron = routed // mlp.width, routed % mlp.width
            if mlp.listed is not None:
                for e, module in enumerate(experts):
                    _scale_dense(module, mlp.listed, site, neuron[expert == e], factor)
                return edited
            if site == "mlp.act":
                down = experts.down_proj
                if mlp.transposed:
                    down[expert, neuron, :] *= factor
                else:
                    down[expert, :, neuron] *= factor
            else:
                gate_rows, up_rows = _expert_rows(mlp)
                start, _, step = up_rows if site == "mlp.up" else gate_rows
                rows = start + step * neuron
                weight = experts.gate_up_proj
                if mlp.transposed:
                    weight[expert, :, rows] *= factor
                else:
                    weight[expert, rows, :] *= factor
                bias = getattr(experts, "gate_up_proj_bias", None)
                if bias is not None:
                    bias[expert, rows] *= factor
    return edited


def _scale_dense(parent, dense, site: str, local: torch.Tensor, factor: float) -> None:
    """Scale neurons `local` of a dense MLP (paths relative to `parent`: a layer, or one listed expert) in its
    weights: rows of gate/up (their half of a fused projection), columns of down."""
    if site == "mlp.act":
        weight = parent.get_submodule(dense.down.path).weight
        if dense.down.transposed:
            weight[local, :] *= factor
        else:
            weight[:, local] *= factor
        return
    proj = dense.up if site == "mlp.up" else dense.gate
    module = parent.get_submodule(proj.path)
    rows = local if proj.rows is None else proj.rows[0] + proj.rows[2] * local
    if proj.transposed:
        module.weight[:, rows] *= factor
    else:
        module.weight[rows, :] *= factor
    if module.bias is not None:
        module.bias[rows] *= factor


def _expert_rows(mlp: ExpertsMlp):
    from engramlab.models.arch import fused_rows

    return fused_rows(mlp.fused, mlp.width)


@pytest.mark.parametrize("site", ["mlp.act", "mlp.up", "mlp.gate"])
def test_scaling_equals_weight_edit(loaded, batch, site):
    layout, engine = loaded.layout, loaded.hooks
    layer = layout.n_layers - 1
    if not layout.has_site(site, layer):
        pytest.skip("non-gated MLP")
    width = layout.site_width(site, layer)
    units = sorted({1, 5, width // 2 + 3, width - 2})
    for mode, factor in (("zero", 0.0), ("scale", -1.5)):
        with torch.no_grad(), engine.edit_neurons({(site, layer): units}, mode, factor) as ctx:
            hooked = loaded.model(**batch).logits
        assert ctx.fired[(site, layer)] == 1
        edited = _weight_edited(loaded, site, layer, units, factor)
        with torch.no_grad():
            expected = edited(**batch).logits
        torch.testing.assert_close(hooked, expected, rtol=1e-4, atol=1e-5)
    assert _no_taps_left(loaded.model)


def test_clamp_sets_the_recorded_value(loaded, batch):
    layout, engine = loaded.layout, loaded.hooks
    layer = layout.n_layers - 1
    width = layout.site_width("mlp.act", layer)
    units = [0, width - 1]
    with torch.no_grad(), engine.clamp("mlp.act", layer, units, 4.25), engine.record("mlp.act", layer) as rec:
        loaded.model(**batch)
    values = rec["mlp.act", layer][..., units]
    if isinstance(layout.mlp(layer), ExpertsMlp):  # an expert neuron exists only for tokens routed to it
        assert set(values.unique().tolist()) <= {0.0, 4.25} and (values == 4.25).any()
    else:
        assert torch.all(values == 4.25)


def test_per_row_masks_and_last_position(loaded, batch):
    layout, engine = loaded.layout, loaded.hooks
    layer = layout.n_layers - 1
    width = layout.site_width("mlp.act", layer)
    masks = torch.zeros(2, width, dtype=torch.bool)
    masks[1, : width // 2] = True  # row 0 untouched
    with torch.no_grad():
        with engine.record("mlp.act", layer) as plain:
            loaded.model(**batch)
        with engine.edit_neurons({("mlp.act", layer): masks}, positions="last"), engine.record("mlp.act", layer) as rec:
            loaded.model(**batch)
    got, ref = rec["mlp.act", layer], plain["mlp.act", layer]
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1, :-1], ref[1, :-1])
    assert torch.all(got[1, -1, : width // 2] == 0)
    assert torch.equal(got[1, -1, width // 2 :], ref[1, -1, width // 2 :])


def test_add_direction_on_neurons(loaded, batch):
    layout, engine = loaded.layout, loaded.hooks
    layer = layout.n_layers - 1
    width = layout.site_width("mlp.act", layer)
    v = torch.randn(width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with engine.record("mlp.act", layer) as plain:
            loaded.model(**batch)
        with engine.add_direction("mlp.act", layer, v, coeff=2.0), engine.record("mlp.act", layer) as rec:
            loaded.model(**batch)
    delta = rec["mlp.act", layer] - plain["mlp.act", layer]
    if isinstance(layout.mlp(layer), ExpertsMlp):  # added to the neurons of the experts each token was routed to
        routed = plain["mlp.act", layer] != 0
        torch.testing.assert_close(delta[routed], (2.0 * v).expand_as(delta)[routed])
        assert torch.all(delta[~routed] == 0)
    else:
        torch.testing.assert_close(delta, (2.0 * v).expand_as(delta))


@pytest.mark.parametrize("site", ["resid_pre", "attn.out", "mlp.down", "resid_post"])
def test_hidden_site_edits(loaded, batch, site):
    engine, layout = loaded.hooks, loaded.layout
    layer = next(i for i in range(layout.n_layers) if layout.has_site(site, i))  # hybrids: not every layer has it
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with engine.ablate_direction(site, layer, v), engine.record(site, layer) as rec:
            loaded.model(**batch)
        assert (rec[site, layer] @ (v / v.norm())).abs().max() < 1e-4
        with engine.record(site, layer) as src:
            plain = loaded.model(**batch).logits
        with engine.patch(site, layer, src[site, layer]):
            assert torch.equal(loaded.model(**batch).logits, plain)


def test_neuron_ablation_and_patching_refused_on_expert_sites(loaded):
    layout, engine = loaded.layout, loaded.hooks
    moe = [i for i in range(layout.n_layers) if isinstance(layout.mlp(i), ExpertsMlp)]
    if not moe:
        pytest.skip("dense model")
    width = layout.site_width("mlp.act", moe[0])
    with pytest.raises(EngramError, match="routed experts"):
        engine.ablate_direction("mlp.act", moe[0], torch.ones(width))
    with pytest.raises(EngramError, match="routed experts"):
        engine.patch("mlp.act", moe[0], torch.ones(1, 3, width))
    with pytest.raises(EngramError, match="record-only"):
        engine.zero("moe.routing", moe[0], [0])


def test_expert_means_and_routing(loaded, batch):
    """Mean over routed tokens per expert equals the per-token recording averaged by hand; routing and router
    scores come out of the recording too."""
    layout, engine = loaded.layout, loaded.hooks
    moe = [i for i in range(layout.n_layers) if isinstance(layout.mlp(i), ExpertsMlp)]
    if not moe:
        pytest.skip("dense model")
    layer = moe[-1]
    mlp = layout.mlp(layer)
    sites = ["mlp.act", "moe.routing"] + (["moe.router"] if layout.has_site("moe.router", layer) else [])
    with torch.no_grad():
        with engine.record(sites, layer) as full:
            loaded.model(**batch)
        with engine.record("mlp.act", layer, positions="nonpad", reduce="mean") as mean:
            loaded.model(**batch)
    acts = full["mlp.act", layer][..., : mlp.routed_width].reshape(2, 6, mlp.n_experts, mlp.width)
    routing = full["moe.routing", layer]  # [B, T, E]
    routed = routing != 0
    nonpad = batch["attention_mask"].bool()
    counts = (routed & nonpad[:, :, None]).sum(1).float()  # [B, E]
    torch.testing.assert_close(mean.expert_counts(("mlp.act", layer)), counts)
    expected = (acts * (routed & nonpad[:, :, None])[..., None]).sum(1) / counts.clamp_min(1)[..., None]
    got = mean["mlp.act", layer][:, : mlp.routed_width].reshape(2, mlp.n_experts, mlp.width)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(acts[~routed] == 0)
    if mlp.routing == "top_k":
        assert torch.all(routed.sum(-1) == loaded.model.config.num_experts_per_tok)
    if "moe.router" in sites:
        block_in = full["moe.router", layer]
        assert block_in.shape == (2, 6, mlp.n_experts)


def test_generate_with_expert_edit(loaded):
    layout, engine = loaded.layout, loaded.hooks
    layer = layout.n_layers - 1
    width = layout.site_width("mlp.act", layer)
    units = list(range(0, width, 3))
    ids = torch.randint(3, 200, (1, 4), generator=torch.Generator().manual_seed(5))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "min_new_tokens": 4, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad(), engine.zero("mlp.act", layer, units):
        got = loaded.model.generate(ids, **kwargs)
    edited = _weight_edited(loaded, "mlp.act", layer, units)
    with torch.no_grad():
        assert torch.equal(got, edited.generate(ids, **kwargs))
    assert _no_taps_left(loaded.model)


def test_unmappable_family_is_refused_in_one_line():
    row = check_family("hrm_text")
    assert row.result == "unsupported" and "hrm_text" in row.reason and "\n" not in row.reason


NAMED_IN_ISSUE = [
    "qwen3",
    "gemma3_text",
    "olmo2",
    "olmo3",
    "granite",
    "cohere",
    "exaone",
    "internlm3",
    "smollm3",
    "ministral",
    "bloom",
    "gptj",
    "codegen",
    "starcoder2",
    "phi",
    "mpt",
    "gpt_bigcode",
    "opt",
    "biogpt",
    "nemotron",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "granitemoe",
    "llama4_text",
    "phimoe",
    "phi3",
    "phi4_multimodal",
]


def test_census_command_prints_pass_and_unsupported(cli, tmp_path):
    code, out, err = cli(
        ["models", "census", "--families", "llama,mixtral,phi3,hrm_text", "--json", "--out", str(tmp_path / "c.json")]
    )
    assert code == 0, err
    payload = json.loads(out)
    results = {row["family"]: row["result"] for row in payload["rows"]}
    assert results == {"llama": "pass", "mixtral": "pass", "phi3": "pass", "hrm_text": "unsupported"}
    assert payload["summary"]["silently_wrong"] == 0
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == payload["rows"]
    code, _, err = cli(["models", "census", "--families", "nope"])
    assert code == 2 and "nope" in err


@pytest.mark.slow
def test_full_census_of_the_installed_transformers():
    rows = run_census()
    totals = summary(rows)
    assert totals["silently_wrong"] == 0, [r.family for r in rows if r.result == "FAIL"]
    assert totals["decoder_pass_rate"] >= 0.9, totals
    by_family = {row.family: row.result for row in rows}
    assert all(by_family[f] == "pass" for f in NAMED_IN_ISSUE), {f: by_family[f] for f in NAMED_IN_ISSUE}


def test_listed_experts_that_cannot_be_tapped_are_refused_in_one_line():
    """Experts without an activation module, and a block that hands its experts rows that are not copies of its
    input tokens (so no row can be traced to a token), are refused, never half-mapped."""
    from engramlab.models import discover

    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.experts = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {"w1": torch.nn.Linear(64, 96), "w3": torch.nn.Linear(64, 96), "w2": torch.nn.Linear(96, 64)}
            )
            for _ in range(4)
        )
    with pytest.raises(EngramError, match="activation as a function") as refused:
        discover(model)
    assert "\n" not in str(refused.value)

    model = tiny_list_moe("list_switch")
    for layer in model.model.layers:
        block = layer.mlp
        block.forward = lambda x, block=block: type(block).forward(block, x * 2.0) / 2.0  # experts see 2x
    with pytest.raises(EngramError, match="not copies of the MoE block's input tokens"):
        discover(model)


def test_listed_experts_tell_identical_prompts_apart():
    """The same prompt twice in one batch gives bit-identical tokens; a per-row edit of row 1 still lands on row 1
    only (row 0 keeps the plain logits, row 1 gets the weight-edited model's)."""
    from engramlab.models import HookEngine

    model = tiny_list_moe("list_mixtral")
    engine = HookEngine(model)
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(4)).repeat(2, 1)
    width = engine.layout.site_width("mlp.act", 1)
    masks = torch.zeros(2, width, dtype=torch.bool)
    masks[1, ::3] = True
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with engine.edit_neurons({("mlp.act", 1): masks}):
            hooked = model(input_ids=ids).logits
        edited = copy.deepcopy(model)
        units = torch.arange(0, width, 3)
        for e, expert in enumerate(edited.model.layers[1].mlp.block_sparse_moe.experts):
            local = units[(units >= e * 48) & (units < (e + 1) * 48)] - e * 48
            expert.w2.weight[:, local] = 0
        expected = edited(input_ids=ids).logits
    assert torch.equal(hooked[0], plain[0])
    torch.testing.assert_close(hooked[1], expected[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hooked[1], plain[1])


def test_gathered_tokens_traces_rows_to_tokens():
    from engramlab.models.expert_list import gathered_tokens

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(9, 16, generator=generator)
    tokens[6] = tokens[2]  # a duplicate token
    picks = [torch.tensor([6, 2, 0]), torch.tensor([8, 2, 6, 5])]  # expert 0, expert 1; duplicates in both
    rows = torch.cat([tokens[p] for p in picks])
    expert = torch.cat([torch.full((len(p),), e) for e, p in enumerate(picks)])
    token = gathered_tokens(tokens, rows, expert)
    assert torch.equal(tokens[token], rows)
    assert token.tolist() == [2, 6, 0, 8, 2, 6, 5]  # equal rows of one expert get equal tokens in ascending order
    with pytest.raises(EngramError, match="not copies"):
        gathered_tokens(tokens, rows + 1e-3, expert)
    with pytest.raises(EngramError, match="not copies"):  # more equal rows than equal tokens
        gathered_tokens(tokens, tokens[[2, 2, 2]], torch.zeros(3, dtype=torch.long))


def test_final_norm_is_the_one_the_head_reads():
    """LFM2 names its final norm embedding_norm; a BERT-style prediction head puts a transform in between, so
    there is no final norm to fold in and the studies that need one refuse it in one line."""
    from engramlab.models import ModelLayout

    assert ModelLayout(tiny_model("lfm2")).final_norm is not None
    with pytest.raises(EngramError, match="does not read"):
        ModelLayout(tiny_model("megatron-bert")).final_norm  # noqa: B018


def test_expert_tap_keeps_accelerate_device_hooks():
    """With device_map="auto" accelerate wraps each module's forward; the expert loop slots in behind that wrapper
    (so inputs still move to the experts' device) and the wrapper is back in place afterwards."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("mixtral")
    reference = copy.deepcopy(model)
    for layer in model.model.layers:
        add_hook_to_module(layer.mlp.experts, AlignDevicesHook(execution_device="cpu"))
    wrappers = [vars(layer.mlp.experts)["forward"] for layer in model.model.layers]
    from engramlab.models import HookEngine

    engine = HookEngine(model)
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(2))
    even = list(range(0, 384, 2))  # the even neurons of every expert (4 experts x 96)
    with torch.no_grad(), engine.zero("mlp.act", 1, even):
        hooked = model(input_ids=ids).logits
    with torch.no_grad():
        reference.model.layers[1].mlp.experts.down_proj[:, :, ::2] = 0
        torch.testing.assert_close(hooked, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert [vars(layer.mlp.experts)["forward"] for layer in model.model.layers] == wrappers
    assert all(vars(layer.mlp.experts)["_old_forward"].__self__ is layer.mlp.experts for layer in model.model.layers)


def test_listed_expert_tap_keeps_accelerate_device_hooks():
    """The list tap shadows accelerate's `_old_forward` of the block and of every expert, and puts them back."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from engramlab.models import HookEngine

    model = tiny_list_moe("list_deepseek")
    reference = copy.deepcopy(model)
    modules = [m for layer in model.model.layers for m in (layer.mlp, *layer.mlp.experts)]
    for module in modules:
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu"))
    wrappers = [vars(m)["forward"] for m in modules]
    engine = HookEngine(model)
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), engine.zero("mlp.act", 1, list(range(0, 192, 2))):
        hooked = model(input_ids=ids).logits
    with torch.no_grad():
        for expert in reference.model.layers[1].mlp.experts:
            expert.down_proj.weight[:, ::2] = 0
        torch.testing.assert_close(hooked, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert [vars(m)["forward"] for m in modules] == wrappers
    assert all(vars(m)["_old_forward"].__self__ is m for m in modules)


def test_remote_code_checkpoint_with_a_list_of_experts(tmp_path, monkeypatch):
    """A DeepSeek-V2-style checkpoint whose modeling code ships beside its weights (config auto_map) is refused
    without --trust-remote-code and, with it, loads through transformers' remote-code path with its expert neurons
    addressable and exact."""
    import shutil
    from pathlib import Path

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    checkpoint = tmp_path / "deepseek-remote"
    tiny_list_moe("list_deepseek").save_pretrained(checkpoint)
    shutil.copy(Path(__file__).with_name("list_moe.py"), checkpoint / "modeling_list_moe.py")
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "deepseek_v2_remote"  # unknown to transformers, as a remote-code checkpoint's type is
    config["auto_map"] = {
        "AutoConfig": "modeling_list_moe.list_deepseek_config",
        "AutoModelForCausalLM": "modeling_list_moe.list_deepseek_model",
    }
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngramError, match="trust"):
        load_model(str(checkpoint), device="cpu", with_tokenizer=False)
    lm = load_model(str(checkpoint), device="cpu", with_tokenizer=False, trust_remote_code=True)
    assert type(lm.model).__module__.startswith("transformers_modules")
    assert lm.layout.spec.mlp_kinds == ("moe+shared",)
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert not [v for v in run_checks(lm.model, lm.layout, batch).values() if v.startswith("fail")]


def test_layers_without_an_mlp_are_told_apart_from_unrecognised_ones():
    """Nemotron-H's Mamba and attention layers have no MLP: their MLP sites are absent with a reason, and paper 1's
    units skip them. A layer holding a linear map to the hidden size outside its mixers is refused instead (it
    could be an MLP engramlab does not recognise), never mapped as MLP-less."""
    from engramlab.models import ModelLayout, discover
    from engramlab.relations.units import UnitSpace

    layout = ModelLayout(tiny_model("nemotron_h"))
    kinds = [spec.kind for spec in layout.spec.layer_specs]
    assert kinds == ["none", "moe+shared", "none", "non-gated"]
    with pytest.raises(EngramError, match="layer 0: that layer has no MLP"):
        layout.check_site("mlp.act", 0)
    assert layout.has_site("attn.out", 2) and not layout.has_site("mlp.down", 2)
    space = UnitSpace(layout)
    assert {b.layer for b in space.blocks} == {1, 3}
    from engramlab.models import HookEngine

    engine = HookEngine(layout.model, layout=layout)
    with torch.no_grad(), engine.record(space.keys(), reduce="mean") as rec:  # exactly the pairs that exist
        layout.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert sorted(rec.keys()) == sorted(space.keys()) and rec["mlp.up", 3].shape == (1, 96)
    with pytest.raises(EngramError, match="not both"):
        engine.record([("mlp.up", 3)], 3)

    model = tiny_model("nemotron_h")
    model.model.layers[0].extra = torch.nn.Linear(64, 64)
    with pytest.raises(EngramError, match="no MLP found in layer 0"):
        discover(model)


def test_a_module_named_like_a_norm_that_holds_linear_maps_is_not_a_norm():
    """RoBERTa-PreLayerNorm's MLP blocks are called RobertaPreLayerNormIntermediate / ...Output: taking them for
    norms hid the MLP (and, for a layer without an MLP, would have made the layer look MLP-less)."""
    from engramlab.models import ModelLayout

    layout = ModelLayout(tiny_model("roberta-prelayernorm"))
    assert layout.spec.mlp_kinds == ("non-gated",) and layout.layer_spec(0).neurons == 96


@pytest.mark.parametrize("name", ["list_deepseek", "mixtral"])
def test_expert_neurons_of_a_disk_offloaded_moe_model(name, tmp_path):
    """accelerate's device_map with a memory cap that holds the first decoder layer but not the second: the MoE
    layer on disk records, routes and zeroes expert neurons exactly as the whole model on the CPU does."""
    from engramlab.models.loading import is_offloaded

    checkpoint = tmp_path / name
    model = _build(name)
    model.save_pretrained(checkpoint)
    size = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in model.named_modules()}
    # accelerate keeps room for the largest layer as its onload buffer: the embedding, layer 0 and that room fit
    cap = size["model.embed_tokens"] + 2 * size["model.layers.0"] + 20_000
    whole = load_model(str(checkpoint), device="cpu", with_tokenizer=False)
    offloaded = load_model(
        str(checkpoint), device="auto", max_memory={"cpu": cap}, offload_folder=tmp_path / "off", with_tokenizer=False
    )
    assert is_offloaded(offloaded.model) and offloaded.model.hf_device_map["model.layers.1"] == "disk"
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    width = whole.layout.site_width("mlp.act", 1)
    results = []
    for lm in (whole, offloaded):
        zeroed = lm.hooks.zero("mlp.act", 1, list(range(0, width, 3)))
        with torch.no_grad(), lm.hooks.record(["mlp.act", "moe.routing"], 1) as rec, zeroed:
            logits = lm.model(input_ids=ids).logits
        results.append((logits, rec["mlp.act", 1], rec["moe.routing", 1]))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_listed_experts_with_random_routing_are_refused_in_one_line():
    """Router noise (Mixtral's jitter in training mode) routes the replay pass differently from the capture pass:
    the tap says so instead of returning outputs computed for other rows."""
    from engramlab.models import HookEngine

    model = tiny_list_moe("list_mixtral")
    engine = HookEngine(model)  # discovered while the router is deterministic
    gate = model.model.layers[1].mlp.block_sparse_moe.gate
    gate.forward = lambda x: torch.nn.functional.linear(x, gate.weight) + torch.randn(x.shape[0], 4)
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    recording = engine.record("mlp.act", 1)
    with pytest.raises(EngramError, match="routed tokens differently"), torch.no_grad(), recording:
        model(input_ids=ids)
    block = model.model.layers[1].mlp.block_sparse_moe
    assert all("forward" not in vars(m) for m in block.modules() if m is not gate)  # every stub put back
