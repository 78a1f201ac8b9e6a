"""`engramlab models census`: every causal-LM family of the installed transformers, built tiny, mapped and checked.

For each `model_type` in transformers' causal-LM auto mapping: build a tiny random model (`engramlab.models.tiny`),
discover its layout, and run exactness checks whose reference is computed without the hook engine:

- `act`: the recorded `mlp.act` equals the down projection's input captured with a plain PyTorch hook in a run
  without the engine. In a MoE layer the expert neurons are checked through the experts module's output: the
  recorded act of every routed (token, expert) pair, pushed through that expert's down projection and weighted by
  the routing weights captured on the experts module's arguments, sums to the output of a plain run. Experts kept
  as a list of modules are checked expert by expert: the rows each expert's down projection received, traced back
  to their tokens by nearest neighbour among the block's inputs.
- `halves`: for a fused gate+up projection, act(recorded gate)·(recorded up) equals that captured input.
- `zero`: zeroing every neuron of every layer makes each layer's MLP output equal the output of a copy of the model
  whose down projections have zero weights (its bias, or zero), and the logits equal that copy's.
- `identity`: with the engine recording every site of every layer, the logits are bit-identical to a plain run.
- `generate`: zeroing half the neurons of layer 0 stays active in every step of `generate` (the tokens equal the
  weight-zeroed copy's, and the hook fires once per step).

A family passes when every check that applies passes; `unsupported` rows carry the one-line reason discovery
gave; `no tiny model` rows are families whose default config cannot be shrunk and run (their error is shown).
Scope: "decoder" is a decoder-only causal LM with attention; "encoder-decoder" (the decoder of a seq2seq model),
"encoder" (a masked-LM encoder run causally) and "recurrent" (no attention module) are listed but counted apart.
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.arch import SITES, DenseMlp, ExpertsMlp
from engramlab.models.hooks import HookEngine
from engramlab.models.layout import ModelLayout, discover, iter_dense

CHECKS = ("act", "halves", "zero", "identity", "generate")
_ATTENTION = re.compile(r"attention|attn|MLA", re.IGNORECASE)  # attention module class names (LongcatFlashMLA)


@dataclass
class CensusRow:
    """One family's census result."""

    family: str
    scope: str  # decoder | encoder-decoder | encoder | recurrent
    result: str  # pass | FAIL | unsupported | no tiny model
    kind: str = ""  # MLP kinds of the layers: gated, non-gated, fused, moe, moe+shared
    layers: int = 0
    neurons: str = ""  # neurons per layer ("96", or "96/240" when dense and MoE layers mix)
    reason: str = ""
    checks: dict | None = None  # check -> "pass" | "fail: ..." | "n/a: ..."
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def causal_lm_families() -> list[str]:
    """Every model_type of the installed transformers' AutoModelForCausalLM mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def scope_of(model_type: str, model: nn.Module | None) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    config = getattr(model, "config", None)
    seq2seq = getattr(config, "is_encoder_decoder", False) or bool(getattr(config, "encoder_layers", 0))
    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES or seq2seq:
        return "encoder-decoder"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if model is not None and not any(_ATTENTION.search(type(m).__name__) for m in model.modules()):
        return "recurrent"
    return "decoder"


def run_census(families: Iterable[str] | None = None, progress: Callable[[str], None] | None = None) -> list[CensusRow]:
    """Census rows for `families` (default: every causal-LM family of the installed transformers)."""
    rows = []
    for family in families if families is not None else causal_lm_families():
        if progress is not None:
            progress(family)
        rows.append(check_family(family))
    return rows


def check_family(model_type: str) -> CensusRow:
    """Build, map and check one family; never raises."""
    from engramlab.models.tiny import tiny_model

    start = time.perf_counter()
    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")
        try:
            model = tiny_model(model_type)
            batch = _batch(model)
            with torch.no_grad():
                model(**batch)
        except Exception as err:  # the family's own code fails on its shrunk default config: not ours to judge
            return CensusRow(model_type, scope_of(model_type, None), "no tiny model", reason=_one_line(err))
        scope = scope_of(model_type, model)
        try:
            layout = ModelLayout(model, discover(model))
        except EngramError as err:
            return CensusRow(model_type, scope, "unsupported", reason=_one_line(err), seconds=_since(start))
        row = CensusRow(
            model_type,
            scope,
            "pass",
            kind=", ".join(layout.spec.mlp_kinds),
            layers=layout.n_layers,
            neurons="/".join(dict.fromkeys(str(s.neurons) for s in layout.spec.layer_specs)),
        )
        row.checks = run_checks(model, layout, batch)
        failed = [name for name, verdict in row.checks.items() if verdict.startswith("fail")]
        if failed:
            row.result = "FAIL"
            row.reason = "; ".join(f"{name}: {row.checks[name][6:]}" for name in failed)
        row.seconds = _since(start)
        return row


def run_checks(model: nn.Module, layout: ModelLayout, batch: dict) -> dict[str, str]:
    """Every census check on one model; each verdict is "pass", "fail: why" or "n/a: why"."""
    engine = HookEngine(model, layout=layout)
    checks = {
        "act": _check_act,
        "halves": _check_halves,
        "zero": _check_zero,
        "identity": _check_identity,
        "generate": _check_generate,
    }
    ran = _layers_that_run(model, layout, batch)
    with_mlp = [layer for layer in ran if layer in layout.mlp_layers]  # hybrids: some layers have none
    verdicts = {}
    for name, check in checks.items():
        if name != "identity" and not with_mlp:
            verdicts[name] = "n/a: no layer with an MLP ran"
            continue
        try:
            with torch.no_grad():
                verdicts[name] = check(model, layout, engine, batch, ran if name == "identity" else with_mlp)
        except EngramError as err:
            verdicts[name] = f"fail: {_one_line(err)}"
        except Exception as err:  # a crash inside a check is a failure of the engine on this family
            verdicts[name] = f"fail: {type(err).__name__}: {_one_line(err)}"
    return verdicts


# ------------------------------------------------------------------------------------------------------------------
# The checks. References come from plain PyTorch hooks and weight edits on a copy, never from the engine.


def _check_act(model, layout: ModelLayout, engine: HookEngine, batch, ran: list[int]) -> str:
    plain = _capture(model, layout, batch)
    with engine.record("mlp.act", ran) as rec:
        model(**batch)
    for layer in ran:
        spec = layout.layer_spec(layer)
        recorded = rec["mlp.act", layer]  # [B, T, neurons]
        flat = recorded.reshape(-1, recorded.shape[-1])  # [N, neurons]
        for dense, offset in iter_dense(spec):
            expected = plain[("down_in", layer, offset)].reshape(flat.shape[0], -1)
            if not torch.equal(flat[:, offset : offset + dense.width], expected.float()):
                return f"fail: layer {layer} mlp.act differs from the down projection's input"
        experts = layout.layers[layer].get_submodule(spec.mlp.experts) if isinstance(spec.mlp, ExpertsMlp) else None
        if experts is not None and spec.mlp.listed is not None:  # type: ignore[union-attr]
            why = _listed_act_matches(layer, spec.mlp, flat, plain)  # type: ignore[arg-type]
            if why:
                return f"fail: layer {layer} {why}"
        elif experts is not None and not getattr(experts, "has_post_expert_norm", False):  # else not linear in act
            why = _expert_act_matches(layout, layer, spec.mlp, flat[:, : spec.mlp.routed_width], plain)
            if why:
                return f"fail: layer {layer} {why}"
    return "pass"


def _listed_act_matches(layer: int, mlp: ExpertsMlp, act: torch.Tensor, plain: dict) -> str | None:
    """Each listed expert's down-projection input rows, captured with plain hooks, equal the recorded act of the
    tokens those rows were gathered from (found by nearest neighbour among the block's input tokens)."""
    tokens = plain[("block_in", layer)].reshape(act.shape[0], -1).float()  # [N, H]
    for expert in range(mlp.n_experts):
        inputs, down_in = plain.get(("expert_in", layer, expert)), plain.get(("expert_down_in", layer, expert))
        if not inputs:
            continue
        rows = torch.cat([x.reshape(-1, tokens.shape[1]) for x in inputs]).float()
        if not rows.shape[0]:
            continue
        distance, token = torch.cdist(rows, tokens).min(dim=1)
        if float(distance.max()) > 0:
            return f"expert {expert} saw a row that is none of the block's input tokens"
        expected = torch.cat([x.reshape(-1, mlp.width) for x in down_in])
        got = act[token, expert * mlp.width : (expert + 1) * mlp.width]
        if not torch.equal(got, expected.float()):
            return f"expert {expert}'s recorded act differs from its down projection's input"
    return None


def _expert_act_matches(layout, layer: int, mlp: ExpertsMlp, act: torch.Tensor, plain: dict) -> str | None:
    """Push the recorded expert act [N, E*I] through each expert's down projection and compare with the plain
    experts output."""
    module = layout.layers[layer].get_submodule(mlp.experts)
    down = module.down_proj.float()  # [E, H, I] or transposed [E, I, H]
    per_expert = act.view(act.shape[0], mlp.n_experts, mlp.width)  # [N, E, I]
    if mlp.transposed:
        outs = torch.einsum("nei,eih->neh", per_expert, down)
    else:
        outs = torch.einsum("nei,ehi->neh", per_expert, down)
    bias = getattr(module, "down_proj_bias", None) if getattr(module, "has_bias", False) else None
    if mlp.routing == "all":  # Llama 4: output block e, row n is expert e's output for token n
        expected = plain[("experts_out", layer)].view(mlp.n_experts, -1, outs.shape[-1]).transpose(0, 1)
        got = outs
    else:
        index, weights = plain[("routing", layer)]
        index = index.reshape(act.shape[0], -1)
        weights = weights.reshape(act.shape[0], -1).float()
        chosen = outs.gather(1, index[:, :, None].expand(-1, -1, outs.shape[-1]))  # [N, k, H]
        if bias is not None:
            chosen = chosen + bias.float()[index]
        got = (chosen * weights[:, :, None]).sum(1)
        expected = plain[("experts_out", layer)].reshape(got.shape)
    if not _close(got, expected.float()):
        return f"expert act does not reproduce the experts output ({_max_diff(got, expected):.2g})"
    return None


def _check_halves(model, layout: ModelLayout, engine: HookEngine, batch, ran: list[int]) -> str:
    fused = [
        (layer, dense, offset) for layer in ran for dense, offset in iter_dense(layout.layer_spec(layer)) if dense.fused
    ]
    if not fused:
        return "n/a: no fused gate+up projection"
    plain = _capture(model, layout, batch)
    with engine.record(["mlp.gate", "mlp.up"], sorted({layer for layer, _, _ in fused})) as rec:
        model(**batch)
    for layer, dense, offset in fused:
        if dense.act is None:
            return f"n/a: layer {layer} has no activation module"
        act = layout.layers[layer].get_submodule(dense.act)
        gate = rec["mlp.gate", layer][..., offset : offset + dense.width]
        up = rec["mlp.up", layer][..., offset : offset + dense.width]
        expected = plain[("down_in", layer, offset)].float()
        if not _close(act(gate) * up, expected.reshape(gate.shape)):
            return f"fail: layer {layer}: act(gate)·up is not the down projection's input"
    return "pass"


def _check_zero(model, layout: ModelLayout, engine: HookEngine, batch, ran: list[int]) -> str:
    masks = {("mlp.act", layer): torch.ones(layout.site_width("mlp.act", layer), dtype=torch.bool) for layer in ran}
    with engine.edit_neurons(masks):
        hooked = _capture(model, layout, batch, logits=True)
    zeroed = _zero_down_weights(model, layout, ran, None)
    reference = _capture(zeroed, ModelLayout(zeroed, layout.spec), batch, logits=True)
    for layer in ran:
        got, expected = hooked[("mlp_out", layer)], reference[("mlp_out", layer)]
        if not _close(got, expected):
            return f"fail: layer {layer} MLP output {_max_diff(got, expected):.2g} away from its bias"
        spec = layout.layer_spec(layer)
        if isinstance(spec.mlp, DenseMlp):
            bias = getattr(layout.layers[layer].get_submodule(spec.mlp.down.path), "bias", None)
            target = torch.zeros_like(got) if bias is None else bias.float().expand_as(got)
            if not torch.equal(got.float(), target):
                return f"fail: layer {layer} MLP output is not its down projection's bias"
    if not _close(hooked["logits"], reference["logits"]):
        return "fail: logits differ from the weight-zeroed copy"
    return "pass"


def _check_identity(model, layout: ModelLayout, engine: HookEngine, batch, ran: list[int]) -> str:
    plain = model(**batch).logits
    keys = [(s, i) for s in SITES for i in ran if layout.has_site(s, i)]
    with _record_keys(engine, keys) as rec:
        hooked = model(**batch).logits
    if not torch.equal(plain, hooked):
        return f"fail: logits change by {_max_diff(plain, hooked):.2g} with every site recorded"
    for site, layer in keys:
        width = layout.site_width(site, layer)
        if rec[site, layer].shape[-1] != width:
            return f"fail: ({site}, {layer}) recorded width {rec[site, layer].shape[-1]}, expected {width}"
    return "pass"


def _check_generate(model, layout: ModelLayout, engine: HookEngine, batch, ran: list[int]) -> str:
    if not hasattr(model, "generate"):
        return "n/a: the model has no generate()"
    kwargs = {"max_new_tokens": 3, "do_sample": False, "min_new_tokens": 3}
    layer = ran[0]
    width = layout.site_width("mlp.act", layer)
    half = list(range(0, width, 2))
    zeroed = _zero_down_weights(model, layout, [layer], half)
    try:
        expected = zeroed.generate(**batch, **kwargs)
    except Exception as err:  # HF's own generate fails on this tiny model: nothing to compare against
        return f"n/a: generate fails without hooks ({type(err).__name__})"
    calls: list[int] = []  # calls of the module the edit lives on (XLNet runs its MLP twice per step)
    handle = layout.parts("mlp.act", layer)[0].module.register_forward_hook(lambda *args: calls.append(1))
    try:
        with engine.zero("mlp.act", layer, half) as ctx:
            got = model.generate(**batch, **kwargs)
    finally:
        handle.remove()
    if not torch.equal(got, expected):
        return "fail: generated tokens differ from the weight-zeroed copy's"
    if ctx.fired[("mlp.act", layer)] != len(calls) or len(calls) < 3:
        return f"fail: the edit fired {ctx.fired[('mlp.act', layer)]} times in {len(calls)} calls of its module"
    return "pass"


# ------------------------------------------------------------------------------------------------------------------
# Helpers.


def _layers_that_run(model: nn.Module, layout: ModelLayout, batch: dict) -> list[int]:
    """Layers whose forward runs on a text-only batch (Mllama skips its cross-attention layers without images)."""
    ran: set[int] = set()
    handles = [layer.register_forward_hook(lambda *args, i=i: ran.add(i)) for i, layer in enumerate(layout.layers)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(ran)


def _record_keys(engine: HookEngine, keys: list[tuple[str, int]]):
    """A recording of exactly these (site, layer) pairs (sites differ per layer in mixed models)."""
    from engramlab.models.hooks import Recording

    return Recording(engine, keys, "all", None, torch.float32, False)


def _capture(model: nn.Module, layout: ModelLayout, batch: dict, logits: bool = False) -> dict:
    """Down projections' inputs, MLP outputs, experts' arguments and outputs of one forward, with plain hooks."""
    captured: dict = {}
    handles = []

    def keep(key, index=0):
        def pre(mod, args, kwargs):
            value = args[index] if len(args) > index else list(kwargs.values())[index - len(args)]
            captured[key] = value.detach().clone()

        return pre

    for layer in range(layout.n_layers):
        block, spec = layout.layers[layer], layout.layer_spec(layer)
        if spec.mlp is None:
            continue
        for dense, offset in iter_dense(spec):
            down = block.get_submodule(dense.down.path)
            handles.append(down.register_forward_pre_hook(keep(("down_in", layer, offset)), with_kwargs=True))
        mlp = spec.mlp
        out_module = block.get_submodule(mlp.down.path if isinstance(mlp, DenseMlp) else mlp.block)
        handles.append(out_module.register_forward_hook(_keep_output(captured, ("mlp_out", layer))))
        if isinstance(mlp, ExpertsMlp) and mlp.listed is not None:
            handles.append(
                block.get_submodule(mlp.block).register_forward_pre_hook(keep(("block_in", layer)), with_kwargs=True)
            )
            for index, expert in enumerate(block.get_submodule(mlp.experts)):
                down = expert.get_submodule(mlp.listed.down.path)
                handles.append(expert.register_forward_pre_hook(_append(captured, ("expert_in", layer, index))))
                handles.append(down.register_forward_pre_hook(_append(captured, ("expert_down_in", layer, index))))
        elif isinstance(mlp, ExpertsMlp):
            experts = block.get_submodule(mlp.experts)
            handles.append(experts.register_forward_hook(_keep_output(captured, ("experts_out", layer))))
            if mlp.routing == "top_k":

                def routing(mod, args, kwargs, layer=layer):
                    captured[("routing", layer)] = tuple(t.detach() for t in [*args[1:], *kwargs.values()][:2])

                handles.append(experts.register_forward_pre_hook(routing, with_kwargs=True))
    try:
        out = model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if logits:
        captured["logits"] = out.logits
    return captured


def _append(captured: dict, key):
    def pre(mod, args):
        captured.setdefault(key, []).append(args[0].detach().clone())

    return pre


def _keep_output(captured: dict, key):
    def hook(mod, args, output):
        value = output[0] if isinstance(output, (tuple, list)) else output
        captured[key] = value.detach().float().clone()  # a copy: some families add into it in place afterwards

    return hook


def _zero_down_weights(model: nn.Module, layout: ModelLayout, layers, neurons: list[int] | None) -> nn.Module:
    """A copy of the model whose down projections read nothing from `neurons` (all if None) of `layers`."""
    edited = copy.deepcopy(model)
    edited_layers = edited.get_submodule(layout.spec.layers)
    for layer in layers:
        spec, block = layout.layer_spec(layer), edited_layers[layer]
        index = torch.arange(spec.neurons) if neurons is None else torch.as_tensor(neurons)
        for dense, offset in iter_dense(spec):
            cols = index[(index >= offset) & (index < offset + dense.width)] - offset
            weight = block.get_submodule(dense.down.path).weight  # [H, I] or Conv1D [I, H]
            if dense.down.transposed:
                weight[cols, :] = 0
            else:
                weight[:, cols] = 0
        if isinstance(spec.mlp, ExpertsMlp):
            mlp = spec.mlp
            units = index[index < mlp.routed_width]
            expert, neuron = units // mlp.width, units % mlp.width
            if mlp.listed is not None:
                for e, module in enumerate(block.get_submodule(mlp.experts)):
                    weight, cols = module.get_submodule(mlp.listed.down.path).weight, neuron[expert == e]
                    if mlp.listed.down.transposed:
                        weight[cols, :] = 0
                    else:
                        weight[:, cols] = 0
                continue
            down = block.get_submodule(mlp.experts).down_proj  # [E, H, I] or [E, I, H]
            if mlp.transposed:
                down[expert, neuron, :] = 0
            else:
                down[expert, :, neuron] = 0
    return edited


def _batch(model: nn.Module) -> dict:
    vocab = int(model.get_output_embeddings().weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, min(vocab, 200)), (2, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(b.abs().max()))))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float().reshape(a.shape)).abs().max()) if a.numel() == b.numel() else float("nan")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return re.sub(r"\s+", " ", line)[:200]


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


class _quiet_transformers:
    """Silence transformers' logger while tiny models are built (each family warns about its shrunk config)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        return False


def summary(rows: list[CensusRow]) -> dict:
    """Counts per scope and result; `silently_wrong` is the number of FAIL rows (must be 0)."""
    out: dict = {}
    for row in rows:
        scope = out.setdefault(row.scope, {})
        scope[row.result] = scope.get(row.result, 0) + 1
    decoder = out.get("decoder", {})
    built = sum(n for result, n in decoder.items() if result != "no tiny model")
    return {
        "by_scope": out,
        "decoder_built": built,
        "decoder_pass": decoder.get("pass", 0),
        "decoder_pass_rate": round(decoder.get("pass", 0) / built, 3) if built else None,
        "silently_wrong": sum(1 for row in rows if row.result == "FAIL"),
    }


__all__ = ["CHECKS", "CensusRow", "causal_lm_families", "check_family", "run_census", "scope_of", "summary"]
