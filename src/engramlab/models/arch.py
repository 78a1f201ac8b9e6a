"""The architecture table: where each model family keeps the modules a study needs.

One row per family, keyed by `config.model_type`. Paths are dotted `named_modules` names; `{i}` is the decoder
layer index. Sub-module paths (MLP, attention) are relative to a decoder layer. Adding a family is one entry;
`resolve_arch` checks every path against the loaded model so a renamed module in a new transformers release
gives a clear error instead of a silent no-op hook.

Site names used by the hook engine (TransformerLens-style, see `engramlab.models.hooks`):

| site         | tensor                                               | where it is read                      |
|--------------|------------------------------------------------------|---------------------------------------|
| `resid_pre`  | residual stream entering layer i                     | input of the decoder layer            |
| `resid_post` | residual stream leaving layer i                      | output of the decoder layer           |
| `attn.out`   | attention output projection (o_proj / c_proj / dense)| output of that projection             |
| `mlp.gate`   | gate pre-activation, gated MLPs only                 | output of gate_proj                   |
| `mlp.up`     | up projection (fc_in for non-gated MLPs)             | output of up_proj / c_fc / dense_h_to_4h |
| `mlp.act`    | the neuron value act(gate)*up (act(fc_in) if not gated) | input of down_proj                    |
| `mlp.down`   | MLP output                                           | output of down_proj / c_proj / dense_4h_to_h |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engramlab.errors import EngramError

SITES = ("resid_pre", "resid_post", "attn.out", "mlp.gate", "mlp.up", "mlp.act", "mlp.down")
MLP_NEURON_SITES = ("mlp.gate", "mlp.up", "mlp.act")  # width = intermediate size
HIDDEN_SITES = ("resid_pre", "resid_post", "attn.out", "mlp.down")  # width = hidden size


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family."""

    family: str
    layers: str  # ModuleList of decoder layers
    attn_out: str  # relative to a layer
    up: str  # relative to a layer; fc_in for non-gated MLPs
    down: str  # relative to a layer; fc_out for non-gated MLPs
    act: str  # activation module, relative to a layer
    final_norm: str
    lm_head: str
    embed: str
    gate: str | None = None  # None for non-gated MLPs
    transposed_linear: bool = False  # GPT-2's Conv1D stores weight as [in, out]

    @property
    def gated(self) -> bool:
        return self.gate is not None


_LLAMA_LIKE = {
    "layers": "model.layers",
    "attn_out": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
    "act": "mlp.act_fn",
    "final_norm": "model.norm",
    "lm_head": "lm_head",
    "embed": "model.embed_tokens",
}

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(family="llama", **_LLAMA_LIKE),
    "mistral": ArchSpec(family="mistral", **_LLAMA_LIKE),
    "qwen2": ArchSpec(family="qwen2", **_LLAMA_LIKE),
    "gemma": ArchSpec(family="gemma", **_LLAMA_LIKE),
    "gemma2": ArchSpec(family="gemma2", **_LLAMA_LIKE),
    "gpt2": ArchSpec(
        family="gpt2",
        layers="transformer.h",
        attn_out="attn.c_proj",
        up="mlp.c_fc",
        down="mlp.c_proj",
        act="mlp.act",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        transposed_linear=True,
    ),
    "gpt_neox": ArchSpec(
        family="gpt_neox",
        layers="gpt_neox.layers",
        attn_out="attention.dense",
        up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h",
        act="mlp.act",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        embed="gpt_neox.embed_in",
    ),
}


def arch_for_config(config) -> ArchSpec:
    """The table entry for a transformers config, or a clear error listing the supported families."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise EngramError(
            f"architecture '{model_type}' has no entry in engramlab's architecture table (supported: {supported}); "
            f"add one row to engramlab/models/arch.py."
        )
    return spec


def get_module(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule(path)` with an error that names the path and the family."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise EngramError(
            f"module '{path}' not found in this {type(model).__name__}; the architecture table entry in "
            f"engramlab/models/arch.py does not match this transformers version."
        ) from err


class ModelLayout:
    """An `ArchSpec` bound to one model instance: layer modules, site modules and widths."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.spec = spec or arch_for_config(model.config)
        self.layers: nn.ModuleList = get_module(model, self.spec.layers)  # type: ignore[assignment]
        for rel in (self.spec.attn_out, self.spec.up, self.spec.down, self.spec.act, self.spec.gate):
            if rel is not None:
                get_module(self.layers[0], rel)
        for path in (self.spec.final_norm, self.spec.lm_head, self.spec.embed):
            get_module(model, path)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_module(self, layer: int, rel: str) -> nn.Module:
        return get_module(self.layers[layer], rel)

    def module(self, path: str) -> nn.Module:
        return get_module(self.model, path)

    @property
    def lm_head(self) -> nn.Module:
        return self.module(self.spec.lm_head)

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.spec.final_norm)

    @property
    def embed(self) -> nn.Module:
        return self.module(self.spec.embed)

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
            raise EngramError(f"layer {layer} is out of range: this model has layers 0..{self.n_layers - 1}.")
        return layer % self.n_layers

    def check_site(self, site: str) -> str:
        if site not in SITES:
            raise EngramError(f"unknown site '{site}'; choose one of: {', '.join(SITES)}.")
        if site == "mlp.gate" and not self.spec.gated:
            raise EngramError(f"site 'mlp.gate' does not exist in {self.spec.family}: its MLP is not gated.")
        return site

    def site_width(self, site: str) -> int:
        """Number of units (neurons or hidden dims) at a site."""
        self.check_site(site)
        if site in HIDDEN_SITES:
            return int(self.model.config.get_text_config().hidden_size)
        return _out_features(self.layer_module(0, self.spec.up))

    def linear_weight(self, layer: int, rel: str) -> torch.Tensor:
        """A projection's weight as [out_features, in_features], whatever the module type (Linear or Conv1D)."""
        weight = self.layer_module(layer, rel).weight
        return weight.T if self.spec.transposed_linear else weight


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' Conv1D
        return int(module.nf)
    return int(module.weight.shape[0])
