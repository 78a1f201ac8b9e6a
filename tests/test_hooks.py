"""The hook engine against hand computations on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import HIDDEN, INTERMEDIATE, LAYERS, no_hooks_left, tiny_model
from engramlab.errors import EngramError
from engramlab.models import SITES, HookEngine


def _sites(engine: HookEngine) -> list[str]:
    layout = engine.layout
    return [s for s in SITES if all(layout.has_site(s, i) for i in range(layout.n_layers))]


def _linear(module: torch.nn.Module, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    weight = module.weight.T if transposed else module.weight
    return F.linear(x, weight, module.bias)


def test_recording_equals_manual_mlp_computation(model, batch):
    engine = HookEngine(model)
    with engine.record(_sites(engine), positions="all") as rec:
        logits = model(**batch).logits
    for layer in range(LAYERS):
        block = engine.layout.layers[layer]
        spec = engine.layout.mlp(layer)
        x = _mlp_input(model, engine, layer, batch)
        up = _linear(block.get_submodule(spec.up.path), x, spec.up.transposed)
        act_fn = block.get_submodule(spec.act)
        if spec.gated:
            gate = _linear(block.get_submodule(spec.gate.path), x, spec.gate.transposed)
            torch.testing.assert_close(rec["mlp.gate", layer], gate)
            expected = act_fn(gate) * up
        else:
            expected = act_fn(up)
        torch.testing.assert_close(rec["mlp.up", layer], up)
        torch.testing.assert_close(rec["mlp.act", layer], expected)
        down = _linear(block.get_submodule(spec.down.path), expected, spec.down.transposed)
        torch.testing.assert_close(rec["mlp.down", layer], down)
        assert rec["resid_pre", layer].shape == (2, 7, HIDDEN)
        assert rec["mlp.act", layer].shape == (2, 7, INTERMEDIATE)
    torch.testing.assert_close(rec["resid_pre", 1], rec["resid_post", 0])
    final = engine.layout.final_norm(rec["resid_post", LAYERS - 1])
    torch.testing.assert_close(engine.layout.lm_head(final), logits)


def _mlp_input(model, engine, layer, batch) -> torch.Tensor:
    """The MLP's input, read with a plain PyTorch hook (independent of the engine)."""
    captured = {}
    mlp_parent = engine.layout.layer_module(layer, engine.layout.mlp(layer).up.path.rsplit(".", 1)[0])
    handle = mlp_parent.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    try:
        model(**batch)
    finally:
        handle.remove()
    return captured["x"]


def test_every_hook_fires_once_per_forward(model, batch):
    engine = HookEngine(model)
    with engine.record(_sites(engine)) as rec:
        model(**batch)
    assert set(rec.fired.values()) == {1}


def test_no_intervention_is_bit_identical(model, batch):
    engine = HookEngine(model)
    plain = model(**batch).logits
    with engine.record(_sites(engine), positions="nonpad", reduce="mean"):
        hooked = model(**batch).logits
    assert torch.equal(plain, hooked)
    assert no_hooks_left(model)


def _zero_weights(model, engine, site, layer, neuron):
    """The weight edit equivalent to zeroing one neuron at a site."""
    spec = engine.layout.mlp(layer)
    block = engine.layout.layers[layer]
    if site == "mlp.act":  # down_proj input channel -> the down_proj column
        down = block.get_submodule(spec.down.path)
        w = down.weight
        (w[neuron, :] if spec.down.transposed else w[:, neuron]).zero_()
    else:  # an output channel of up/gate -> its row and bias
        proj = spec.up if site == "mlp.up" else spec.gate
        module = block.get_submodule(proj.path)
        w = module.weight
        (w[:, neuron] if proj.transposed else w[neuron, :]).zero_()
        if module.bias is not None:
            module.bias[neuron] = 0


@pytest.mark.parametrize("site", ["mlp.act", "mlp.up", "mlp.gate"])
def test_zeroing_equals_weight_edit(family, site, batch):
    model = tiny_model(family)
    engine = HookEngine(model)
    if site == "mlp.gate" and not engine.layout.spec.gated:
        pytest.skip("non-gated MLP")
    with engine.zero(site, 1, [5]) as ctx:
        hooked = model(**batch).logits
    assert ctx.fired[(site, 1)] == 1
    edited = tiny_model(family)
    with torch.no_grad():
        _zero_weights(edited, HookEngine(edited), site, 1, 5)
    torch.testing.assert_close(hooked, edited(**batch).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hooked, model(**batch).logits)


def test_zeroing_changes_only_the_chosen_neuron(model, batch):
    engine = HookEngine(model)
    with engine.zero("mlp.act", 0, [3, 10]), engine.record("mlp.act", 0) as rec:
        model(**batch)
    with engine.record("mlp.act", 0) as plain:
        model(**batch)
    acts, ref = rec["mlp.act", 0], plain["mlp.act", 0]
    assert torch.all(acts[..., [3, 10]] == 0)
    keep = [i for i in range(INTERMEDIATE) if i not in (3, 10)]
    assert torch.equal(acts[..., keep], ref[..., keep])


def test_clamp_and_scale(model, batch):
    engine = HookEngine(model)
    with engine.clamp("mlp.up", 0, [2], 7.5), engine.record("mlp.up", 0) as rec:
        model(**batch)
    assert torch.all(rec["mlp.up", 0][..., 2] == 7.5)
    with engine.record("mlp.up", 0) as plain:
        model(**batch)
    with engine.scale("mlp.up", 0, [2], -2.0), engine.record("mlp.up", 0) as scaled:
        model(**batch)
    torch.testing.assert_close(scaled["mlp.up", 0][..., 2], -2.0 * plain["mlp.up", 0][..., 2])


def test_hooks_removed_after_exit_and_after_exception(model, batch):
    engine = HookEngine(model)
    with engine.zero("mlp.act", 0, [1]), engine.record(["resid_pre", "mlp.act"], reduce="mean"):
        model(**batch)
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"), engine.zero("mlp.act", 0, [1]), engine.record("resid_post", None):
        model(**batch)
        raise RuntimeError("boom")
    assert no_hooks_left(model)


def test_per_row_masks_equal_row_by_row_runs(model):
    engine = HookEngine(model)
    input_ids = torch.randint(2, 99, (1, 6)).repeat(3, 1)
    masks = torch.zeros(3, INTERMEDIATE, dtype=torch.bool)
    masks[0, [1, 2, 3]] = True
    masks[1, [10, 20]] = True  # row 2: no neuron zeroed
    up_masks = torch.zeros(3, INTERMEDIATE, dtype=torch.bool)
    up_masks[2, 7] = True
    edits = {("mlp.act", 0): masks, ("mlp.up", 1): up_masks}
    with engine.edit_neurons(edits):
        batched = model(input_ids=input_ids).logits
    for row in range(3):
        single = {key: m[row] for key, m in edits.items()}
        with engine.edit_neurons(single):
            alone = model(input_ids=input_ids[row : row + 1]).logits
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[2])


def test_zeroing_holds_during_generate(family):
    model = tiny_model(family)
    engine = HookEngine(model)
    input_ids = torch.randint(2, 99, (2, 5))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with engine.zero("mlp.act", 0, list(range(0, INTERMEDIATE, 2))) as ctx:
        hooked = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    assert ctx.fired[("mlp.act", 0)] == 6  # one prefill plus five cached steps
    edited = tiny_model(family)
    with torch.no_grad():
        for n in range(0, INTERMEDIATE, 2):
            _zero_weights(edited, HookEngine(edited), "mlp.act", 0, n)
    expected = edited.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    assert torch.equal(hooked, expected)


def test_record_all_positions_across_generate_steps(model):
    engine = HookEngine(model)
    input_ids = torch.randint(2, 99, (1, 4))
    with engine.record("resid_post", 1) as rec:
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    # 4 prompt positions + 2 cached steps (the last generated token is never fed back)
    assert rec["resid_post", 1].shape == (1, out.shape[1] - 1, HIDDEN)
    with engine.record("resid_post", 1) as full:
        model(input_ids=out[:, :-1])
    torch.testing.assert_close(rec["resid_post", 1], full["resid_post", 1], rtol=1e-4, atol=1e-5)


def test_positions_nonpad_mean_and_last(model, batch):
    engine = HookEngine(model)
    with engine.record("mlp.act", 0) as full:
        model(**batch)
    with (
        engine.record("mlp.act", 0, positions="nonpad", reduce="mean") as mean,
        engine.record("mlp.act", 0, positions="last") as last,
    ):
        model(**batch)
    acts = full["mlp.act", 0]
    mask = batch["attention_mask"].bool()
    for row in range(2):
        torch.testing.assert_close(mean["mlp.act", 0][row], acts[row][mask[row]].mean(0))
    torch.testing.assert_close(last["mlp.act", 0], acts[:, -1])
    assert mean.counts(("mlp.act", 0)).tolist() == [5.0, 7.0]


def test_last_position_with_right_padding(model):
    engine = HookEngine(model)
    input_ids = torch.randint(2, 99, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    with engine.record("resid_pre", 1) as full, engine.record("resid_pre", 1, positions="last") as last:
        model(input_ids=input_ids, attention_mask=attention_mask)
    acts = full["resid_pre", 1]
    torch.testing.assert_close(last["resid_pre", 1], torch.stack([acts[0, 5], acts[1, 3]]))


def test_integer_positions(model, batch):
    engine = HookEngine(model)
    with engine.record("resid_post", 0) as full, engine.record("resid_post", 0, positions=[1, -1]) as some:
        model(**batch)
    torch.testing.assert_close(some["resid_post", 0], full["resid_post", 0][:, [1, 6]])


def test_add_direction_at_last_position(model, batch):
    engine = HookEngine(model)
    v = torch.randn(HIDDEN)
    with engine.record("resid_post", 0) as plain:
        model(**batch)
    with engine.add_direction("resid_post", 0, v, coeff=3.0, positions="last"), engine.record("resid_post", 0) as added:
        model(**batch)
    expected = plain["resid_post", 0].clone()
    expected[:, -1] += 3.0 * v
    torch.testing.assert_close(added["resid_post", 0], expected)


def test_add_direction_per_row_coefficients(model, batch):
    engine = HookEngine(model)
    v = torch.randn(HIDDEN)
    with engine.record("resid_pre", 1) as plain:
        model(**batch)
    with (
        engine.add_direction("resid_pre", 1, v, coeff=torch.tensor([0.0, 2.0])),
        engine.record("resid_pre", 1) as added,
    ):
        model(**batch)
    torch.testing.assert_close(added["resid_pre", 1][0], plain["resid_pre", 1][0])
    torch.testing.assert_close(added["resid_pre", 1][1], plain["resid_pre", 1][1] + 2.0 * v)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post", "attn.out", "mlp.down"])
def test_ablation_leaves_no_component_along_v(model, batch, site):
    engine = HookEngine(model)
    v = torch.randn(HIDDEN)
    with engine.ablate_direction(site, None, v), engine.record(site, None) as rec:
        out = model(**batch).logits
    unit = v / v.norm()
    for layer in range(LAYERS):
        along = rec[site, layer] @ unit
        assert along.abs().max() < 1e-5
    assert torch.isfinite(out).all()


def test_patching_everything_recovers_the_source_run(model):
    engine = HookEngine(model)
    source_ids = torch.randint(2, 99, (1, 6))
    target_ids = torch.randint(2, 99, (1, 6))
    with engine.record("resid_pre", 0) as src:
        source_logits = model(input_ids=source_ids).logits
    # resid_pre of layer 0 is the whole input to the stack (position ids are the same): patching all of it
    with engine.patch("resid_pre", 0, src["resid_pre", 0]):
        patched = model(input_ids=target_ids).logits
    torch.testing.assert_close(patched, source_logits)
    with engine.record("resid_pre", 1) as same:
        plain = model(input_ids=target_ids).logits
    with engine.patch("resid_pre", 1, same["resid_pre", 1]):
        assert torch.equal(model(input_ids=target_ids).logits, plain)


def test_patch_per_row_positions(model):
    engine = HookEngine(model)
    source_ids = torch.randint(2, 99, (1, 5))
    target_ids = torch.randint(2, 99, (1, 5))
    with engine.record("resid_post", 0) as src:
        model(input_ids=source_ids)
    with engine.record("resid_post", 0) as tgt:
        model(input_ids=target_ids)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[torch.arange(5), torch.arange(5)] = True  # row r patches position r only
    with engine.patch("resid_post", 0, src["resid_post", 0], positions=mask), engine.record("resid_post", 0) as rec:
        model(input_ids=target_ids.repeat(5, 1))
    for r in range(5):
        expected = tgt["resid_post", 0][0].clone()
        expected[r] = src["resid_post", 0][0, r]
        torch.testing.assert_close(rec["resid_post", 0][r], expected)


def test_stop_after_last_recorded_site(model, batch):
    engine = HookEngine(model)
    with engine.record("mlp.act", 0) as full:
        model(**batch)
    with engine.record(["mlp.act", "resid_pre"], 0, stop=True) as early:
        out = model(**batch)
        pytest.fail(f"the forward should have stopped, got {type(out)}")
    assert torch.equal(early["mlp.act", 0], full["mlp.act", 0])
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.zero("mlp.nope", 0, [1]), "unknown site"),
        (lambda e: e.zero("mlp.act", 9, [1]), "out of range"),
        (lambda e: e.zero("mlp.act", 0, [INTERMEDIATE]), "out of range"),
        (lambda e: e.add_direction("resid_pre", 0, torch.ones(3)), "must be"),
        (lambda e: e.record("mlp.act", 0, positions="nonpad"), "needs reduce"),
        (lambda e: e.record("mlp.act", 0, reduce="max"), "not supported"),
    ],
)
def test_bad_arguments_raise_clear_errors(model, call, message):
    with pytest.raises(EngramError, match=message):
        call(HookEngine(model))


def test_per_row_batch_mismatch_is_explained(model):
    engine = HookEngine(model)
    mask = torch.zeros(3, INTERMEDIATE, dtype=torch.bool)
    with (
        pytest.raises(EngramError, match="3 rows but the batch in flight has 2"),
        engine.edit_neurons({("mlp.act", 0): mask}),
    ):
        model(input_ids=torch.randint(2, 99, (2, 4)))
    assert no_hooks_left(model)


def test_gate_site_rejected_for_non_gated_mlp():
    with pytest.raises(EngramError, match="not gated"):
        HookEngine(tiny_model("gpt2")).zero("mlp.gate", 0, [1])
