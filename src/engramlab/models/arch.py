"""Site names and the description of where a model keeps them: one `LayerSpec` per decoder layer.

`engramlab.models.layout.discover` fills these in from the module tree and the config; `OVERRIDES` below holds
the exceptions a human had to write by hand (none are needed for the families transformers 5 ships). Paths are
dotted `named_modules` names; sub-module paths (MLP, attention) are relative to a decoder layer.

Site names used by the hook engine (TransformerLens-style, see `engramlab.models.hooks`):

| site          | tensor                                                   | width            |
|---------------|----------------------------------------------------------|------------------|
| `resid_pre`   | residual stream entering layer i (input of the layer)    | hidden           |
| `resid_post`  | residual stream leaving layer i (output of the layer)    | hidden           |
| `attn.out`    | output of the attention output projection                | hidden           |
| `mlp.gate`    | gate pre-activation, gated MLPs only                     | neurons          |
| `mlp.up`      | up projection (fc_in for non-gated MLPs)                 | neurons          |
| `mlp.act`     | neuron value act(gate)*up (act(up) if not gated): the down projection's input | neurons |
| `mlp.down`    | MLP output: the down projection's output (a MoE block's output in MoE layers) | hidden |
| `moe.router`  | router scores x·W_r (+ b), MoE layers only, record-only  | experts          |
| `moe.routing` | routing weight of each expert (0 = not chosen), MoE layers only, record-only | experts |

Neurons of a MoE layer lie on one axis: expert e's neuron j is unit `e * width + j`, then the shared expert's
neurons (if any) follow the routed ones. `LayerSpec.neurons` is the total, `ExpertsMlp.unit(e, j)` the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

SITES = (
    "resid_pre",
    "resid_post",
    "attn.out",
    "mlp.gate",
    "mlp.up",
    "mlp.act",
    "mlp.down",
    "moe.router",
    "moe.routing",
)
MLP_NEURON_SITES = ("mlp.gate", "mlp.up", "mlp.act")  # width = neurons of the layer
HIDDEN_SITES = ("resid_pre", "resid_post", "attn.out", "mlp.down")  # width = hidden size
ROUTER_SITES = ("moe.router", "moe.routing")  # width = number of routed experts; record-only

FusedOrder = Literal["gate_up", "up_gate", "interleaved"]


def fused_rows(order: FusedOrder, width: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(gate rows, up rows) of a fused projection's 2·width outputs as (start, stop, step)."""
    if order == "gate_up":
        return (0, width, 1), (width, 2 * width, 1)
    if order == "up_gate":
        return (width, 2 * width, 1), (0, width, 1)
    return (0, 2 * width, 2), (1, 2 * width, 2)


@dataclass(frozen=True)
class Projection:
    """One linear map of an MLP, relative to the decoder layer.

    `rows` is set for one half of a fused gate+up projection: (start, stop, step) of the module's output features
    that hold this half (e.g. (0, I, 1) for the gate of a [gate; up] layout, (1, 2I, 2) for the up of an
    interleaved one)."""

    path: str
    transposed: bool = False  # weight stored as [in, out] (GPT-2's Conv1D)
    rows: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class DenseMlp:
    """A dense MLP (or a MoE layer's shared expert): neuron i is act(gate_i)·up_i, or act(up_i) if not gated."""

    up: Projection
    down: Projection
    width: int
    gate: Projection | None = None
    act: str | None = None  # activation module, relative to the layer (None: applied as a function)
    fused: FusedOrder | None = None  # gate and up are halves of one projection's output

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def kind(self) -> str:
        if self.fused:
            return "fused"
        return "gated" if self.gated else "non-gated"


@dataclass(frozen=True)
class ExpertsMlp:
    """A mixture-of-experts MLP: experts stored as batched parameter tensors (as transformers 5 does) or as a list
    of expert modules (`listed`, as transformers 4 and remote-code models do).

    `routing="top_k"`: the experts module is called as experts(x [N, H], top_k_index [N, k], top_k_weights [N, k])
    (every family decorated with transformers' `use_experts_implementation`); for listed experts, the block calls
    each expert on the rows routed to it. `routing="all"`: every expert sees every token, scaled by its router score
    (Llama 4). A token counts as routed to e when its routing weight for e is non-zero.
    """

    experts: str  # the batched experts module (or the ModuleList of experts), relative to the layer
    block: str  # the MoE block holding router, experts and shared expert; its output is `mlp.down`
    n_experts: int
    width: int  # neurons per expert
    gated: bool
    transposed: bool  # weights stored [E, in, out]
    fused: FusedOrder  # gate/up layout of gate_up_proj (gated experts)
    routing: Literal["top_k", "all"] = "top_k"
    router: str | None = None  # module whose input and linear weight give the router scores
    shared: DenseMlp | None = None  # shared expert, paths relative to the layer
    listed: DenseMlp | None = None  # experts kept as a list: each expert's MLP, paths relative to the expert

    def unit(self, expert: int, neuron: int) -> int:
        """Index of neuron j of expert e on the layer's neuron axis."""
        return expert * self.width + neuron

    @property
    def routed_width(self) -> int:
        return self.n_experts * self.width

    @property
    def kind(self) -> str:
        return "moe+shared" if self.shared is not None else "moe"


def routed_experts(mlp: DenseMlp | ExpertsMlp | None) -> tuple[int, int]:
    """(routed experts, neurons per expert) of a layer's MLP; (0, 0) for a dense layer or a layer without an MLP."""
    return (mlp.n_experts, mlp.width) if isinstance(mlp, ExpertsMlp) else (0, 0)


def expert_of_neuron(neuron: np.ndarray, n_experts, width) -> np.ndarray:
    """The routed expert holding each neuron index on a layer's neuron axis (expert e holds units e*width ..
    (e+1)*width - 1), -1 past the routed experts' units (a shared expert's) or in a layer without experts.
    `n_experts` and `width` are numbers or arrays aligned with `neuron`."""
    return np.where(neuron < np.multiply(n_experts, width), neuron // np.maximum(width, 1), -1)


@dataclass(frozen=True)
class LayerSpec:
    """Where one decoder layer keeps its attention output and its MLP."""

    attn_out: str | None  # None: the layer has no attention (a state-space or recurrent mixer)
    mlp: DenseMlp | ExpertsMlp | None  # None: a hybrid model's layer without an MLP (Nemotron-H's Mamba layers)

    @property
    def gated(self) -> bool:
        return self.mlp is not None and self.mlp.gated

    @property
    def kind(self) -> str:
        return self.mlp.kind if self.mlp is not None else "none"

    @property
    def neurons(self) -> int:
        if self.mlp is None:
            return 0
        if isinstance(self.mlp, ExpertsMlp):
            return self.mlp.routed_width + (self.mlp.shared.width if self.mlp.shared else 0)
        return self.mlp.width


@dataclass(frozen=True)
class ArchSpec:
    """Where a model keeps the modules a study needs: found by `discover`, or written in `OVERRIDES`."""

    family: str
    layers: str  # ModuleList of decoder layers
    embed: str
    lm_head: str
    final_norm: str | None  # None: the family has no final norm module
    layer_specs: tuple[LayerSpec, ...]

    @property
    def gated(self) -> bool:
        """Every layer's MLP is gated (mlp.gate exists everywhere)."""
        return all(spec.gated for spec in self.layer_specs)

    @property
    def mlp_kinds(self) -> tuple[str, ...]:
        """The distinct MLP kinds of the layers, in layer order: gated, non-gated, fused, moe, moe+shared, and none
        (a layer without an MLP)."""
        return tuple(dict.fromkeys(spec.kind for spec in self.layer_specs))


# Families whose layout discovery cannot find on its own, keyed by `config.model_type`. Each value is a function of
# the model returning an `ArchSpec`. transformers 5.24 needs none; the table exists so that a checkpoint with a
# custom module tree (trust_remote_code) can be described in one place instead of by editing the discovery.
OVERRIDES: dict[str, object] = {}
