"""Layout discovery: where a causal LM keeps its decoder layers, attention outputs and MLP neurons, read off its
module tree and config instead of a hand-written row per family.

`discover(model)` finds:
- the decoder layers: the one `ModuleList` of `config.num_hidden_layers` modules (beside the input embedding when
  several lists have that length);
- the input and output embeddings from `get_input_embeddings()` / `get_output_embeddings()`, and the final norm:
  the norm module beside the decoder layers;
- per layer, the attention output projection (o_proj, c_proj, dense, out_proj, ... inside self_attn / attn /
  attention / self_attention) and the MLP: projections by their known name sets, each confirmed by its shape
  (hidden -> intermediate -> hidden), or a MoE block with its router and shared expert, whose experts are a
  batched-experts module (transformers 5 stores them as [experts, out, in] parameter tensors) or a `ModuleList` of
  expert MLPs (transformers 4, remote code); or no MLP at all, for a hybrid's layer that holds only attention or a
  recurrent mixer (Nemotron-H).

Some facts cannot be read off names and shapes, so they are measured on the model itself with a probe forward of
a few random tokens (skipped on the meta device): which half of a fused gate+up projection is the gate, whether
engramlab's expert loop (`engramlab.models.experts`) reproduces the family's own experts forward, and whether a
list-of-experts block can be tapped (`engramlab.models.expert_list`).

Whatever cannot be resolved unambiguously raises `EngramError` with one line naming the missing part and the
family; nothing is guessed. `OVERRIDES` in `engramlab.models.arch` holds hand-written exceptions.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.arch import (
    HIDDEN_SITES,
    MLP_NEURON_SITES,
    OVERRIDES,
    ROUTER_SITES,
    SITES,
    ArchSpec,
    DenseMlp,
    ExpertsMlp,
    FusedOrder,
    LayerSpec,
    Projection,
    fused_rows,
)
from engramlab.models.expert_list import probe_expert_list
from engramlab.models.experts import expert_vectors, outputs_match, probe_experts

# Name sets of MLP projections, most specific first. Gated: (gate, up, down); paired: (up or fused gate_up, down).
GATED_NAMES = (
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
    ("proj_up_gate", "proj_up", "proj_down"),
    ("w_in.w_0", "w_in.w_1", "w_out"),
)
PAIR_NAMES = (
    ("gate_up_proj", "down_proj"),
    ("up_proj", "down_proj"),
    ("fc1", "fc2"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("fc_in", "fc_out"),
    ("Wi", "Wo"),
    ("input_linear", "output_linear"),
    ("intermediate.dense", "output.dense"),
    ("intermediate", "output"),
    ("lin1", "lin2"),
    ("layer_1", "layer_2"),
    ("key", "value"),
    ("0", "2"),
)
ACT_NAMES = ("act_fn", "act", "activation_fn", "activation", "gelu_impl", "intermediate_act_fn", "activation_function")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "self_att")
ATTN_OUT_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo", "Wo", "o", "o_b_proj", "attention_out", "output.dense")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "layer_norm")
SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
ROUTER_NAMES = ("gate", "router")
_TOWERS = re.compile(r"(^|\.|_)(vision|visual|image|audio|speech|vqmodel)", re.IGNORECASE)  # not the text decoder
# Subtrees that are not the decoder's attention or MLP: recurrent and convolutional mixers, cross-attention. A subtree
# named `mixer` is kept when its class says it is an MLP, MoE or attention (Nemotron-H names every layer's one block
# `mixer`, whichever kind it is).
_SKIP_NAMES = frozenset({"mamba", "mixer", "linear_attn", "temporal_block", "conv", "encoder_attn", "crossattention"})
_MIXER_ROLE = re.compile(r"MLP|MoE|Moe|Experts|FeedForward|Attention")


def discover(model: nn.Module) -> ArchSpec:
    """Resolve the layout of a loaded (or meta-device) HF causal LM from its module tree and config."""
    config = model.config
    family = str(getattr(config, "model_type", type(model).__name__))
    override = OVERRIDES.get(family)
    if override is not None:
        return override(model)  # type: ignore[operator]
    names = {id(module): name for name, module in model.named_modules()}
    embed_module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed_module is None or id(embed_module) not in names:
        raise EngramError(f"{family}: no input embedding found (get_input_embeddings() returned nothing).")
    if head_module is None or id(head_module) not in names or getattr(head_module, "weight", None) is None:
        raise EngramError(f"{family}: no LM head found (get_output_embeddings() returned nothing).")
    embed, lm_head = names[id(embed_module)], names[id(head_module)]
    layers_path, layers = _find_layers(model, family, embed)
    final_norm = _find_final_norm(model, layers_path)
    probes: dict[tuple[type, str], object] = {}
    layer_specs = tuple(_layer_spec(layer, i, family, probes) for i, layer in enumerate(layers))
    return ArchSpec(
        family=family,
        layers=layers_path,
        embed=embed,
        lm_head=lm_head,
        final_norm=final_norm,
        layer_specs=layer_specs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Model-level parts.


def _text_layers(config) -> int | None:
    try:
        text = config.get_text_config()
    except ValueError:  # several text configs (e.g. an encoder and a decoder): no single decoder stack
        return None
    for name in ("decoder_layers", "num_hidden_layers"):  # a seq2seq decoder run alone counts decoder_layers
        n = getattr(text, name, None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _find_layers(model: nn.Module, family: str, embed: str) -> tuple[str, nn.ModuleList]:
    n_layers = _text_layers(model.config)
    if n_layers is None:
        raise EngramError(f"{family}: the config names no single num_hidden_layers, so the decoder stack is unknown.")
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name
    ]
    if len(found) > 1:  # keep the lists that sit beside the input embedding, then those outside vision/audio towers
        parent = embed.rsplit(".", 1)[0] if "." in embed else ""
        beside = [(n, m) for n, m in found if (n.rsplit(".", 1)[0] if "." in n else "") == parent]
        found = beside or [(n, m) for n, m in found if not _TOWERS.search(n)] or found
    if len(found) != 1:
        where = ", ".join(n for n, _ in found) or "none"
        raise EngramError(
            f"{family}: cannot tell the decoder layers apart: {len(found)} ModuleLists of num_hidden_layers="
            f"{n_layers} modules ({where})."
        )
    return found[0][0], found[0][1]  # type: ignore[return-value]


def _is_norm(module: nn.Module) -> bool:
    """A normalisation module: its class name ends in "norm" (AXK2's GatedRMSNorm holds a small gate MLP), or has
    "norm" in it and no linear map inside (RoBERTa-PreLayerNorm's MLP blocks carry the family's name,
    `RobertaPreLayerNormIntermediate`)."""
    name = type(module).__name__.lower()
    if isinstance(module, nn.LayerNorm) or name.endswith("norm"):
        return True
    return "norm" in name and not any(_dims(m) is not None for m in module.modules())


def _find_final_norm(model: nn.Module, layers_path: str) -> str | None:
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    norms = [name for name, child in parent.named_children() if _is_norm(child)]
    if len(norms) > 1:  # e.g. BLOOM's word_embeddings_layernorm beside ln_f
        norms = [n for n in norms if n in FINAL_NORM_NAMES] or [n for n in norms if "emb" not in n.lower()]
    if len(norms) != 1:
        return None
    return f"{parent_path}.{norms[0]}" if parent_path else norms[0]


# ----------------------------------------------------------------------------------------------------------------
# Per-layer parts.


def _layer_spec(layer: nn.Module, index: int, family: str, probes: dict) -> LayerSpec:
    modules = dict(layer.named_modules())
    attn_paths = [p for p in modules if p and _is_attention(p, modules) and not _skipped(p, modules)]
    attn_paths = [p for p in attn_paths if not any(p.startswith(q + ".") for q in attn_paths)]  # outermost only
    hidden = _hidden_size(layer, modules)
    attn_out = _find_attn_out(modules, attn_paths, hidden, family, index)
    excluded = attn_paths + [p for p, m in modules.items() if p and _is_norm(m)]
    experts = [
        p
        for p, m in modules.items()
        if _param3(m, "down_proj") is not None
        and (_param3(m, "gate_up_proj") is not None or _param3(m, "up_proj") is not None)
    ]
    listed = [p for p, m in modules.items() if p.rsplit(".", 1)[-1] == "experts" and isinstance(m, nn.ModuleList)]
    if len(experts) + len(listed) > 1:
        raise EngramError(
            f"{family}: layer {index} holds {len(experts) + len(listed)} experts modules "
            f"({', '.join(experts + listed)})."
        )
    if listed:  # transformers 4 / remote code: one module per expert, fed the tokens routed to it
        mlp = _listed_experts_mlp(layer, modules, listed[0], hidden, excluded, family, index, probes)
    elif experts:
        mlp = _experts_mlp(layer, modules, experts[0], hidden, excluded, family, index, probes)
    else:
        dense = _dense_mlps(layer, modules, hidden, excluded, family, index, probes)
        if not dense and _mixer_only(modules, excluded, hidden):
            return LayerSpec(attn_out=attn_out, mlp=None)
        if len(dense) != 1:
            what = ", ".join(d.down.path.rsplit(".", 1)[0] or "(layer)" for d in dense) or "none"
            if not dense:
                raise EngramError(
                    f"{family}: no MLP found in layer {index} (looked for gate_proj/up_proj/down_proj, w1/w3/w2, "
                    f"gate_up_proj, fc1/fc2, c_fc/c_proj, dense_h_to_4h/dense_4h_to_h, fc_in/fc_out and batched "
                    f"experts, with hidden {hidden} -> intermediate -> hidden shapes)."
                )
            raise EngramError(f"{family}: layer {index} holds {len(dense)} MLPs ({what}); cannot tell which one.")
        mlp = dense[0]
    return LayerSpec(attn_out=attn_out, mlp=mlp)


def _skipped(path: str, modules: dict[str, nn.Module]) -> bool:
    """Inside a subtree that holds neither the decoder's attention nor its MLP (see `_SKIP_NAMES`)."""
    names = path.split(".")
    for i, name in enumerate(names):
        if name in _SKIP_NAMES:
            module = modules.get(".".join(names[: i + 1]))
            if name != "mixer" or module is None or not _MIXER_ROLE.search(type(module).__name__):
                return True
    return False


def _is_attention(path: str, modules: dict[str, nn.Module]) -> bool:
    name = path.rsplit(".", 1)[-1]
    return name in ATTN_NAMES or (name == "mixer" and "Attention" in type(modules[path]).__name__)


def _mixer_only(modules: dict[str, nn.Module], excluded: list[str], hidden: int) -> bool:
    """A hybrid model's layer without an MLP (Nemotron-H's Mamba and attention layers): it holds attention or a
    recurrent mixer, and no linear map to or from the hidden size outside them that an MLP could be made of."""
    mixers = [p for p in modules if p and (_skipped(p, modules) or _is_attention(p, modules))]
    loose = [
        p
        for p, m in modules.items()
        if p
        and (dims := _dims(m)) is not None
        and hidden in dims[:2]
        and not _skipped(p, modules)
        and not any(p == q or p.startswith(q + ".") for q in excluded)
    ]
    return bool(mixers) and not loose


def _hidden_size(layer: nn.Module, modules: dict[str, nn.Module]) -> int:
    for module in [layer, *modules.values()]:
        config = getattr(module, "config", None)
        if config is not None and isinstance(getattr(config, "hidden_size", None), int):
            return int(config.hidden_size)
    norms = [m for p, m in modules.items() if p and _is_norm(m) and getattr(m, "weight", None) is not None]
    if norms:
        return int(norms[0].weight.shape[-1])
    raise EngramError(f"cannot tell the hidden size of {type(layer).__name__} (no config, no norm).")


def _dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) of a linear-like module, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D: weight [in, out]
        return int(module.weight.shape[0]), int(module.nf), True
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features), False
    return None


def _param3(module: nn.Module, name: str) -> torch.Tensor | None:
    param = module._parameters.get(name) if hasattr(module, "_parameters") else None
    return param if param is not None and param.dim() == 3 else None


def _find_attn_out(modules, attn_paths: list[str], hidden: int, family: str, index: int) -> str | None:
    if not attn_paths:
        return None
    found = []
    for attn in attn_paths:
        for path, module in modules.items():
            if not path.startswith(attn + "."):
                continue
            rel = path[len(attn) + 1 :]
            if any(rel == n or rel.endswith("." + n) for n in ATTN_OUT_NAMES) and _writes_hidden(module, hidden):
                found.append(path)
    if len(found) > 1:  # prefer the shallowest (bert: attention.output.dense over deeper helpers)
        depth = min(p.count(".") for p in found)
        found = [p for p in found if p.count(".") == depth]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} candidate"
        raise EngramError(f"{family}: {what} attention output projection found in layer {index} ({', '.join(found)}).")
    return found[0]


def _writes_hidden(module: nn.Module, hidden: int) -> bool:
    """A linear map to the hidden size, or a wrapper whose last linear-like descendant is one (Moshi, Inkling)."""
    dims = _dims(module)
    if dims is not None:
        return dims[1] == hidden
    inner = [d for d in (_dims(m) for m in module.modules()) if d is not None]
    return bool(inner) and inner[-1][1] == hidden


def _dense_mlps(layer, modules, hidden, excluded, family, index, probes, within: str | None = None) -> list[DenseMlp]:
    """Every dense MLP (by name set + shape) in a layer, outside attention/norm subtrees (or inside `within`)."""

    def usable(path: str) -> bool:
        if within is not None and not path.startswith(within + "."):
            return False
        return not (_skipped(path, modules) or any(path == q or path.startswith(q + ".") for q in excluded))

    found: dict[str, DenseMlp] = {}
    parents = [""] + [p for p in modules if p]
    for parent in parents:
        prefix = parent + "." if parent else ""
        if parent in found:
            continue
        for gate_name, up_name, down_name in GATED_NAMES:
            paths = [prefix + n for n in (gate_name, up_name, down_name)]
            if all(p in modules and usable(p) for p in paths):
                mlp = _gated(modules, *paths, hidden)
                if mlp is not None:
                    found[parent] = _with_act(mlp, modules, parent)
                    break
        if parent in found:
            continue
        for up_name, down_name in PAIR_NAMES:
            up_path, down_path = prefix + up_name, prefix + down_name
            if up_path in modules and down_path in modules and usable(up_path) and usable(down_path):
                mlp = _paired(modules, up_path, down_path, hidden)
                if mlp is not None:
                    mlp = _with_act(mlp, modules, parent)
                    if mlp.fused:
                        mlp = _resolve_fused(layer, mlp, parent, family, index, probes)
                    found[parent] = mlp
                    break
    return list(found.values())


def _gated(modules, gate_path, up_path, down_path, hidden) -> DenseMlp | None:
    gate, up, down = (_dims(modules[p]) for p in (gate_path, up_path, down_path))
    if not (gate and up and down):
        return None
    width = up[1]
    if gate[0] != hidden or up[0] != hidden or gate[1] != width or down != (width, hidden, down[2]):
        return None
    return DenseMlp(
        gate=Projection(gate_path, gate[2]),
        up=Projection(up_path, up[2]),
        down=Projection(down_path, down[2]),
        width=width,
    )


def _paired(modules, up_path, down_path, hidden) -> DenseMlp | None:
    up, down = _dims(modules[up_path]), _dims(modules[down_path])
    if not (up and down) or up[0] != hidden or down[1] != hidden:
        return None
    width = down[0]
    if up[1] == width:
        return DenseMlp(up=Projection(up_path, up[2]), down=Projection(down_path, down[2]), width=width)
    if up[1] == 2 * width:  # fused gate+up: which half is which is measured by `_resolve_fused`
        return DenseMlp(
            up=Projection(up_path, up[2]), down=Projection(down_path, down[2]), width=width, fused="gate_up"
        )
    return None


def _with_act(mlp: DenseMlp, modules, parent: str) -> DenseMlp:
    prefix = parent + "." if parent else ""
    for name in ACT_NAMES:
        if prefix + name in modules:
            return DenseMlp(mlp.up, mlp.down, mlp.width, mlp.gate, prefix + name, mlp.fused)
    if parent == "" and "intermediate.intermediate_act_fn" in modules:  # BERT's intermediate block
        return DenseMlp(mlp.up, mlp.down, mlp.width, mlp.gate, "intermediate.intermediate_act_fn", mlp.fused)
    return mlp


def _split(z: torch.Tensor, rows: tuple[int, int, int]) -> torch.Tensor:
    start, stop, step = rows
    return z[..., start:stop:step]


def _resolve_fused(layer, mlp: DenseMlp, parent: str, family: str, index: int, probes: dict) -> DenseMlp:
    """Which half of the fused projection is the gate: the one order for which down's input equals act(g)·u on a
    probe forward of the MLP module. Refused when no order (or more than one) reproduces it."""
    mlp_module = layer.get_submodule(parent) if parent else layer
    key = (type(mlp_module), "fused")
    if key not in probes:
        probes[key] = _probe_fused(layer, mlp, mlp_module, family, index)
    order = probes[key]
    gate_rows, up_rows = fused_rows(order, mlp.width)  # type: ignore[arg-type]
    return DenseMlp(
        gate=Projection(mlp.up.path, mlp.up.transposed, gate_rows),
        up=Projection(mlp.up.path, mlp.up.transposed, up_rows),
        down=mlp.down,
        width=mlp.width,
        act=mlp.act,
        fused=order,  # type: ignore[arg-type]
    )


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _probe_fused(layer, mlp: DenseMlp, mlp_module: nn.Module, family: str, index: int) -> FusedOrder:
    weight = _first_param(mlp_module)
    if weight.device.type == "meta":
        return "gate_up"  # placeholder: a meta model cannot run; `ModelLayout` refuses to hook unverified halves
    if mlp.act is None:
        raise EngramError(f"{family}: fused gate_up projection in layer {index} has no activation module to check.")
    act = layer.get_submodule(mlp.act)
    captured: dict[str, torch.Tensor] = {}
    fused_module, down_module = layer.get_submodule(mlp.up.path), layer.get_submodule(mlp.down.path)
    hidden = _dims(fused_module)[0]  # type: ignore[index]
    handles = [
        fused_module.register_forward_hook(lambda m, a, out: captured.setdefault("z", out)),
        down_module.register_forward_pre_hook(lambda m, a: captured.setdefault("a", a[0])),
    ]
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 5, hidden, generator=generator).to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            mlp_module(x)
    except Exception as err:  # a module that needs more than hidden states: cannot be checked, so not supported
        raise EngramError(f"{family}: cannot probe the fused MLP of layer {index}: {type(err).__name__}.") from err
    finally:
        for handle in handles:
            handle.remove()
    z, a = captured["z"], captured["a"]
    matches = []
    with torch.no_grad():
        for order in ("gate_up", "up_gate", "interleaved"):
            gate_rows, up_rows = fused_rows(order, mlp.width)  # type: ignore[arg-type]
            expected = act(_split(z, gate_rows)) * _split(z, up_rows)
            if outputs_match(expected, a):
                matches.append(order)
    if len(matches) != 1:
        raise EngramError(
            f"{family}: the down projection's input in layer {index} is not act(gate)·up for exactly one split of "
            f"the fused {mlp.up.path} ({len(matches)} splits match)."
        )
    return matches[0]  # type: ignore[return-value]


def _experts_mlp(layer, modules, path: str, hidden: int, excluded, family: str, index: int, probes) -> ExpertsMlp:
    module = modules[path]
    block = path.rsplit(".", 1)[0] if "." in path else ""
    if not block:
        raise EngramError(f"{family}: the batched experts of layer {index} sit directly in the layer (no MoE block).")
    gate_up = _param3(module, "gate_up_proj")
    down = _param3(module, "down_proj")
    decorated = hasattr(module, "has_gate") and hasattr(module, "is_transposed")
    n_params = len(inspect.signature(module.forward).parameters)
    if decorated:
        gated, transposed = bool(module.has_gate), bool(module.is_transposed)
        fused: FusedOrder = "gate_up" if getattr(module, "is_concatenated", True) else "interleaved"
        routing = "top_k"
        if getattr(module, "_is_expert_parallel", False):
            raise EngramError(f"{family}: expert-parallel experts (layer {index}) are not supported.")
    elif n_params == 1 and gate_up is not None:  # Llama 4: every expert sees every (router-scaled) token
        gated, fused, routing = True, "gate_up", "all"
        transposed = down.shape[1] != hidden  # type: ignore[union-attr]  # [E, I, H] when transposed
    else:
        raise EngramError(
            f"{family}: the experts module {type(module).__name__} of layer {index} is not in transformers' "
            f"batched-experts format (use_experts_implementation); its neurons cannot be addressed."
        )
    n_experts = int(down.shape[0])  # type: ignore[union-attr]
    width = int(down.shape[1] if transposed else down.shape[2])  # type: ignore[union-attr]
    first = gate_up if gated else _param3(module, "up_proj")
    expected_out = 2 * width if gated else width
    out_dim = first.shape[2] if transposed else first.shape[1]  # type: ignore[union-attr]
    if first.shape[0] != n_experts or out_dim != expected_out:  # type: ignore[union-attr]
        raise EngramError(
            f"{family}: the experts of layer {index} disagree on their shapes (up {list(first.shape)}, "  # type: ignore[union-attr]
            f"down {list(down.shape)}): some experts are not MLPs."  # type: ignore[union-attr]
        )
    router, shared = _router_and_shared(layer, modules, path, block, n_experts, hidden, excluded, family, index, probes)
    spec = ExpertsMlp(
        experts=path,
        block=block,
        n_experts=n_experts,
        width=width,
        gated=gated,
        transposed=transposed,
        fused=fused,
        routing=routing,  # type: ignore[arg-type]
        router=router,
        shared=shared,
    )
    key = (type(module), "experts")
    if key not in probes:
        probes[key] = probe_experts(module, spec, hidden)
    if probes[key] is not None:
        raise EngramError(
            f"{family}: engramlab's expert loop does not reproduce layer {index}'s experts: {probes[key]}"
        )
    return spec


def _listed_experts_mlp(layer, modules, path: str, hidden: int, excluded, family, index: int, probes) -> ExpertsMlp:
    """Experts kept as a `ModuleList` of identical MLP modules inside a MoE block (transformers 4, remote code)."""
    experts: nn.ModuleList = modules[path]
    block = path.rsplit(".", 1)[0] if "." in path else ""
    if not block or not len(experts):
        raise EngramError(f"{family}: the experts list of layer {index} sits directly in the layer or is empty.")
    first = experts[0]
    shapes = [tuple(p.shape) for p in first.parameters()]
    if any(type(e) is not type(first) or [tuple(p.shape) for p in e.parameters()] != shapes for e in experts):
        raise EngramError(f"{family}: the experts of layer {index} are not all the same module with the same shapes.")
    found = _dense_mlps(first, dict(first.named_modules()), hidden, [], family, index, probes)
    if len(found) != 1:
        raise EngramError(f"{family}: expert 0 of layer {index} is not one MLP ({len(found)} found in it).")
    mlp = found[0]
    if mlp.act is None:
        raise EngramError(
            f"{family}: the experts of layer {index} apply their activation as a function, not a module; engramlab "
            f"computes expert neurons with the expert's own activation module."
        )
    n_experts = len(experts)
    if n_experts > hidden:
        raise EngramError(f"{family}: layer {index} has more experts ({n_experts}) than hidden units ({hidden}).")
    router, shared = _router_and_shared(layer, modules, path, block, n_experts, hidden, excluded, family, index, probes)
    spec = ExpertsMlp(
        experts=path,
        block=block,
        n_experts=n_experts,
        width=mlp.width,
        gated=mlp.gated,
        transposed=False,
        fused=mlp.fused or "gate_up",
        router=router,
        shared=shared,
        listed=mlp,
    )
    block_module = layer.get_submodule(block)
    key = (type(block_module), "listed")
    if key not in probes:
        probes[key] = probe_expert_list(block_module, spec, hidden)
    if probes[key] is not None:
        raise EngramError(f"{family}: engramlab cannot tap the experts list of layer {index}: {probes[key]}")
    return spec


def _router_and_shared(layer, modules, path, block, n_experts, hidden, excluded, family, index, probes):
    """The router and the shared expert of a MoE block; refused when an MLP outside the experts is not one of them
    (its neurons would be missed)."""
    router = _find_router(modules, block, n_experts, hidden)
    shared = _find_shared(layer, modules, block, hidden, excluded, family, index, probes)
    others = _dense_mlps(layer, modules, hidden, [*excluded, block], family, index, probes)
    if others:
        raise EngramError(
            f"{family}: layer {index} has a dense MLP outside its MoE block ({others[0].down.path}); mlp.down would "
            f"miss it."
        )
    routers = [f"{block}.{n}" for n in ROUTER_NAMES]
    known = [path, *routers, *[f"{block}.{n}" for n in SHARED_NAMES]]
    unknown = _dense_mlps(layer, modules, hidden, [*excluded, *known], family, index, probes, within=block)
    if unknown:  # an MLP in the block that is neither an expert nor a shared expert: its neurons would be missed
        raise EngramError(
            f"{family}: the MoE block of layer {index} holds an MLP that is not a known shared expert "
            f"({unknown[0].down.path}); its neurons would be missed."
        )
    return router, shared


def _find_router(modules, block: str, n_experts: int, hidden: int) -> str | None:
    """The module inside the MoE block that holds the router's [experts, hidden] weight."""
    found = []
    for path, module in modules.items():
        if not path.startswith(block + "."):
            continue
        rel = path[len(block) + 1 :]
        if rel.split(".")[0] not in ROUTER_NAMES:
            continue
        weight = module._parameters.get("weight")
        if weight is not None and tuple(weight.shape) == (n_experts, hidden):
            found.append(path)
    return found[0] if len(found) == 1 else None


def _find_shared(layer, modules, block, hidden, excluded, family, index, probes) -> DenseMlp | None:
    shared_paths = [f"{block}.{n}" for n in SHARED_NAMES if f"{block}.{n}" in modules]
    if not shared_paths:
        return None
    found = _dense_mlps(layer, modules, hidden, excluded, family, index, probes, within=shared_paths[0])
    if len(found) != 1:
        raise EngramError(f"{family}: the shared expert {shared_paths[0]} of layer {index} is not a plain MLP.")
    return found[0]


# ----------------------------------------------------------------------------------------------------------------
# A spec bound to one model instance.


@dataclass(frozen=True, eq=False)
class Part:
    """One place where (a piece of) a site's tensor lives, for the hook engine.

    The piece covers units `offset .. offset + width` of the site's axis. `source` says how to read it:
    "tensor": the module's output (or its first input when `on_input`), optionally its `rows` slice (a fused half);
    "experts": the routed-expert rows inside `ExpertsTap` (width = experts x neurons per expert), or inside
    `ExpertListTap` for experts kept as a list (module = the MoE block; for moe.routing, its captured weights);
    "router": the router scores computed from the module's input and its weight;
    "routing": the routing weights, from the experts module's arguments (top-k) or the router's output (Llama 4).
    """

    module: nn.Module
    layer: int
    offset: int
    width: int
    on_input: bool = False
    rows: tuple[int, int, int] | None = None
    source: str = "tensor"
    experts: ExpertsMlp | None = None

    @property
    def flat_ok(self) -> bool:
        """The piece is a plain [B, T, D] tensor covering the whole site axis (needed by ablation and patching)."""
        return self.source == "tensor" and self.offset == 0


def get_module(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)` with an error that names the path and the model class."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise EngramError(f"module '{path}' not found in this {type(model).__name__}.") from err


class ModelLayout:
    """An `ArchSpec` bound to one model instance: layer modules, site availability, widths and neuron weights."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec if spec is not None else discover(model)
        self.layers: nn.ModuleList = get_module(model, self.spec.layers)  # type: ignore[assignment]
        self.hidden_size = _hidden_size(self.layers[0], dict(self.layers[0].named_modules()))
        self._parts: dict[tuple[str, int], list[Part]] = {}
        self._final_norm_checked: bool | None = None

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def mlp_layers(self) -> list[int]:
        """The layers that have an MLP (all of them but a hybrid's Mamba and attention layers)."""
        return [i for i, spec in enumerate(self.spec.layer_specs) if spec.mlp is not None]

    def layer_spec(self, layer: int) -> LayerSpec:
        return self.spec.layer_specs[self.check_layer(layer)]

    def mlp(self, layer: int) -> DenseMlp | ExpertsMlp:
        return self.layer_spec(layer).mlp

    def layer_module(self, layer: int, rel: str) -> nn.Module:
        return get_module(self.layers[layer], rel) if rel else self.layers[layer]

    def module(self, path: str) -> nn.Module:
        return get_module(self.model, path)

    @property
    def lm_head(self) -> nn.Module:
        return self.module(self.spec.lm_head)

    @property
    def final_norm(self) -> nn.Module:
        """The norm whose output the LM head reads, checked once on a 2-token forward (up to a positive scale, as
        MiniCPM divides by a constant): a family with a head transform in between (BERT-style prediction heads)
        has no such norm, and the studies that fold it in refuse it."""
        if self.spec.final_norm is None:
            raise EngramError(f"{self.family} has no final norm module beside its decoder layers.")
        module = self.module(self.spec.final_norm)
        if self._final_norm_checked is None:
            self._final_norm_checked = _head_reads(self.model, module, self.lm_head)
        if not self._final_norm_checked:
            raise EngramError(
                f"{self.family}: the LM head does not read {self.spec.final_norm}'s output directly (a head "
                f"transform sits in between), so there is no final norm to fold in."
            )
        return module

    @property
    def embed(self) -> nn.Module:
        return self.module(self.spec.embed)

    def check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
            raise EngramError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}.")
        return layer % self.n_layers

    def has_site(self, site: str, layer: int) -> bool:
        spec = self.layer_spec(layer)
        if site == "attn.out":
            return spec.attn_out is not None
        if spec.mlp is None and site not in ("resid_pre", "resid_post"):  # no MLP: only the residual stream
            return False
        if site == "mlp.gate":
            return spec.gated and (
                not isinstance(spec.mlp, ExpertsMlp) or spec.mlp.shared is None or spec.mlp.shared.gated
            )
        if site == "moe.router":
            return isinstance(spec.mlp, ExpertsMlp) and spec.mlp.router is not None
        if site == "moe.routing":
            return isinstance(spec.mlp, ExpertsMlp)
        return site in SITES

    def check_site(self, site: str, layer: int | None = None) -> str:
        if site not in SITES:
            raise EngramError(f"unknown site '{site}'; choose one of: {', '.join(SITES)}.")
        layers = range(self.n_layers) if layer is None else [self.check_layer(layer)]
        missing = [i for i in layers if not self.has_site(site, i)]
        if missing:
            why = self._why(site, missing[0])
            raise EngramError(f"site '{site}' does not exist in {self.family} layer {missing[0]}: {why}.")
        return site

    def _why(self, site: str, layer: int) -> str:
        if self.layer_spec(layer).mlp is None and site != "attn.out":
            return "that layer has no MLP (a recurrent or attention layer of a hybrid model)"
        return {
            "attn.out": "that layer has no attention (a recurrent or state-space mixer)",
            "mlp.gate": "its MLP is not gated",
            "moe.router": "it is not a MoE layer with a linear router",
            "moe.routing": "it is not a MoE layer",
        }.get(site, "not available")

    def site_width(self, site: str, layer: int | None = None) -> int:
        """Units at a site: hidden size, neurons of the layer's MLP, or its number of experts. Without `layer` the
        width must be the same in every layer (otherwise a one-line error asks for the layer)."""
        self.check_site(site, layer)
        if site in HIDDEN_SITES:
            return self.hidden_size
        layers = range(self.n_layers) if layer is None else [self.check_layer(layer)]
        widths = {self._width(site, i) for i in layers}
        if len(widths) != 1:
            raise EngramError(
                f"site '{site}' has a different width in different layers of {self.family} ({sorted(widths)}); "
                f"name the layer."
            )
        return widths.pop()

    def _width(self, site: str, layer: int) -> int:
        spec = self.layer_spec(layer)
        if site in ROUTER_SITES:
            return spec.mlp.n_experts  # type: ignore[union-attr]
        return spec.neurons

    def is_uniform(self, site: str) -> bool:
        return len({self._width(site, i) for i in range(self.n_layers)}) == 1

    def neuron_vectors(self, layer: int, part: str) -> torch.Tensor:
        """One vector per neuron of the layer, `[neurons, hidden]`, in unit order (experts then shared expert):
        rows of the gate or up projection (`part="gate"/"up"`, what the neuron reads) or columns of the down
        projection (`part="down"`, what it writes into the residual stream). Views of the weights where possible."""
        spec = self.layer_spec(layer)
        if part not in ("gate", "up", "down"):
            raise EngramError(f"part {part!r} is not one of gate, up, down.")
        if part == "gate" and not self.has_site("mlp.gate", layer):
            raise EngramError(f"{self.family} layer {layer} has no gate: its MLP is not gated.")
        block = self.layers[self.check_layer(layer)]
        mlp = spec.mlp
        if mlp is None:
            raise EngramError(f"{self.family} layer {layer} has no MLP (a recurrent or attention layer).")
        if isinstance(mlp, DenseMlp):
            return _dense_vectors(block, mlp, part)
        experts = get_module(block, mlp.experts)
        if mlp.listed is not None:
            vectors = [_dense_vectors(expert, mlp.listed, part) for expert in experts]  # type: ignore[union-attr]
        else:
            vectors = [expert_vectors(experts, mlp, part)]
        if mlp.shared is not None:
            vectors.append(_dense_vectors(block, mlp.shared, part))
        return torch.cat(vectors) if len(vectors) > 1 else vectors[0]

    def parts(self, site: str, layer: int) -> list[Part]:
        """Where the hook engine reads and writes `site` in `layer` (cached)."""
        layer = self.check_layer(layer)
        key = (site, layer)
        if key not in self._parts:
            self.check_site(site, layer)
            self._parts[key] = self._make_parts(site, layer)
        return self._parts[key]

    def _make_parts(self, site: str, layer: int) -> list[Part]:
        block, spec, hidden = self.layers[layer], self.spec.layer_specs[layer], self.hidden_size
        if site in ("resid_pre", "resid_post"):
            return [Part(block, layer, 0, hidden, on_input=site == "resid_pre")]
        if site == "attn.out":
            return [Part(get_module(block, spec.attn_out), layer, 0, hidden)]  # type: ignore[arg-type]
        mlp = spec.mlp
        if site == "mlp.down":
            path = mlp.down.path if isinstance(mlp, DenseMlp) else mlp.block
            return [Part(get_module(block, path), layer, 0, hidden)]
        if isinstance(mlp, ExpertsMlp) and site in ROUTER_SITES:
            if site == "moe.routing" and mlp.listed is not None:  # weights captured by the list tap
                return [Part(get_module(block, mlp.block), layer, 0, mlp.n_experts, source="experts", experts=mlp)]
            if site == "moe.routing" and mlp.routing == "top_k":
                return [Part(get_module(block, mlp.experts), layer, 0, mlp.n_experts, True, source="routing")]
            if mlp.router is None:
                raise EngramError(f"{self.family} layer {layer}: the router's routing weights cannot be read.")
            router = get_module(block, mlp.router)
            if site == "moe.routing":  # Llama 4: the router returns (scores [N, E], logits)
                return [Part(router, layer, 0, mlp.n_experts, source="routing", experts=mlp)]
            return [Part(router, layer, 0, mlp.n_experts, True, source="router")]
        parts = []
        if isinstance(mlp, ExpertsMlp):
            tapped = get_module(block, mlp.block if mlp.listed is not None else mlp.experts)
            parts.append(Part(tapped, layer, 0, mlp.routed_width, source="experts", experts=mlp))
        for dense, offset in iter_dense(spec):
            proj = {"mlp.gate": dense.gate, "mlp.up": dense.up, "mlp.act": dense.down}[site]
            on_input = site == "mlp.act"
            rows = None if on_input else proj.rows  # type: ignore[union-attr]
            parts.append(Part(get_module(block, proj.path), layer, offset, dense.width, on_input, rows))  # type: ignore[union-attr]
        return parts


@torch.no_grad()
def _head_reads(model: nn.Module, norm: nn.Module, head: nn.Module) -> bool:
    """Whether the LM head's input is the norm's output times a positive scalar, on a plain 2-token forward."""
    weight = head.weight
    if weight.device.type == "meta":
        return True  # cannot run; nothing reads a meta model's norm anyway
    captured: dict[str, torch.Tensor] = {}
    handles = [
        norm.register_forward_hook(
            lambda m, a, out: captured.setdefault("norm", out[0] if isinstance(out, tuple) else out)
        ),
        head.register_forward_pre_hook(lambda m, a: captured.setdefault("head", a[0])),
    ]
    ids = torch.tensor([[1, 2]], device=weight.device)
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    out, seen = captured.get("norm"), captured.get("head")
    if out is None or seen is None or out.shape != seen.shape:
        return False
    out, seen = out.float(), seen.float()
    scale = float((seen * out).sum() / (out * out).sum().clamp_min(1e-30))
    return scale > 0 and outputs_match(seen, scale * out)


def _dense_vectors(block: nn.Module, mlp: DenseMlp, part: str) -> torch.Tensor:
    proj = {"gate": mlp.gate, "up": mlp.up, "down": mlp.down}[part]
    weight = get_module(block, proj.path).weight  # type: ignore[union-attr]
    weight = weight.T if proj.transposed else weight  # [out, in]
    if part == "down":
        return weight.T  # [H, N] -> [N, H]
    return _split(weight.T, proj.rows).T if proj.rows else weight  # rows of [out, in] -> [N, H]


def iter_dense(spec: LayerSpec) -> Iterator[tuple[DenseMlp, int]]:
    """The dense MLPs of a layer with their offset on its neuron axis (the shared expert follows the experts)."""
    mlp = spec.mlp
    if isinstance(mlp, DenseMlp):
        yield mlp, 0
    elif mlp is not None and mlp.shared is not None:
        yield mlp.shared, mlp.routed_width


__all__ = ["MLP_NEURON_SITES", "ModelLayout", "Part", "discover", "get_module", "iter_dense"]
