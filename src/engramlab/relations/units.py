"""Paper 1's neurons as one global index, and the masks that deactivate a set of them.

Paper 1 §2.2 (and Table 1's counts): a neuron is one output coordinate of an FFN projection — gate_proj
(pre-activation), up_proj and down_proj in every layer (fc_in and fc_out for non-gated MLPs) — and all of them
are ranked together. `UnitSpace` numbers those outputs 0..N-1, layer by layer, site by site. In a MoE layer the
gate and up units are every expert's neurons (expert e's neuron j is unit e·width + j of the layer's block, then
the shared expert's), and the down units are the MoE block's output (`engramlab.models.arch`).

`units="channels"` is engramlab's variant: zeroing gate_i or up_i silences the same intermediate unit i, so a
top set of neurons often holds both halves of a pair. A channel is that unit (deactivated at `mlp.act`, the
input of down_proj) plus the down_proj outputs; a channel's score is the better of its gate and up scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engramlab.errors import EngramError
from engramlab.models.arch import MLP_NEURON_SITES, expert_of_neuron, routed_experts
from engramlab.models.layout import ModelLayout

UNIT_KINDS = ("neurons", "channels")


@dataclass(frozen=True)
class Block:
    """A contiguous run of unit ids: the outputs of one site in one layer. In a MoE layer's neuron sites the first
    `experts * per_expert` units are the routed experts' neurons, expert by expert (then the shared expert's)."""

    layer: int
    site: str
    width: int
    offset: int
    experts: int = 0
    per_expert: int = 0


class UnitSpace:
    """Global unit ids over (layer, site, index)."""

    def __init__(self, layout: ModelLayout, units: str = "neurons", layers: Sequence[int] | None = None):
        """Every layer's units, or only those of `layers` (`--layers`: a big model's or a MoE model's unit space
        grows with its experts; a study can keep to the layers it asks about)."""
        if units not in UNIT_KINDS:
            raise EngramError(f"--units {units!r} is not supported; choose one of: {', '.join(UNIT_KINDS)}.")
        self.units = units
        self.layers = None if layers is None else tuple(sorted({layout.check_layer(layer) for layer in layers}))
        for layer in self.layers or ():
            if layer not in layout.mlp_layers:
                raise EngramError(f"--layers: {layout.family} layer {layer} has no MLP (a recurrent or attention one).")
        self.blocks: list[Block] = []
        offset = 0
        for layer in range(layout.n_layers) if self.layers is None else self.layers:
            routed = routed_experts(layout.mlp(layer))
            for site in _layer_sites(layout, layer, units):
                width = layout.site_width(site, layer)
                experts = routed if site in MLP_NEURON_SITES else (0, 0)
                self.blocks.append(Block(layer, site, width, offset, *experts))
                offset += width
        if not self.blocks:
            raise EngramError(
                f"{layout.family} has no MLP in any layer (an attention-free recurrent model); paper 1's units are "
                f"MLP neurons."
            )
        self.sites = tuple(dict.fromkeys(b.site for b in self.blocks))
        self.size = offset
        self.n_layers = layout.n_layers
        self._starts = np.array([b.offset for b in self.blocks])

    def keys(self) -> list[tuple[str, int]]:
        """(site, layer) of every block, in id order (what a recording of responses must hold)."""
        return [(b.site, b.layer) for b in self.blocks]

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(layer, site, index-within-site) arrays for global ids."""
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self._starts, ids, side="right") - 1
        layer = np.array([self.blocks[w].layer for w in which], dtype=np.int64)
        site = np.array([self.blocks[w].site for w in which], dtype=object)
        index = ids - self._starts[which]
        return layer, site, index

    @property
    def has_experts(self) -> bool:
        return any(b.experts for b in self.blocks)

    def experts_of(self, ids: np.ndarray) -> np.ndarray:
        """The routed expert each unit belongs to, -1 for a unit of no routed expert (a dense layer, a shared
        expert, or a MoE block's output channel)."""
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self._starts, ids, side="right") - 1
        index = ids - self._starts[which]
        experts = np.array([self.blocks[w].experts for w in which], dtype=np.int64)
        per_expert = np.array([self.blocks[w].per_expert for w in which], dtype=np.int64)
        return expert_of_neuron(index, experts, per_expert)

    def site_of(self, ids: np.ndarray) -> np.ndarray:
        return self.locate(ids)[1]

    def ids_of_site(self, site: str) -> np.ndarray:
        """Every unit id at one site, across layers."""
        return np.concatenate([np.arange(b.offset, b.offset + b.width) for b in self.blocks if b.site == site])

    def flatten(self, recording) -> torch.Tensor:
        """Concatenate a recording's `[B, width]` blocks into `[B, N]` in id order (on the first block's device:
        with a device_map the layers' blocks may sit on different GPUs)."""
        blocks = [recording[site, layer] for site, layer in self.keys()]
        return torch.cat([b.to(blocks[0].device) for b in blocks], dim=1)

    def masks(self, unit_sets: Sequence[np.ndarray]) -> dict[tuple[str, int], torch.Tensor]:
        """Per-row deactivation masks: row i switches off `unit_sets[i]`. Returns {(site, layer): bool [B, D]},
        only for the blocks that some row touches."""
        out: dict[tuple[str, int], torch.Tensor] = {}
        for row, ids in enumerate(unit_sets):
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size == 0:
                continue
            which = np.searchsorted(self._starts, ids, side="right") - 1
            for w in np.unique(which):
                block = self.blocks[w]
                key = (block.site, block.layer)
                if key not in out:
                    out[key] = torch.zeros(len(unit_sets), block.width, dtype=torch.bool)
                out[key][row, torch.as_tensor(ids[which == w] - block.offset)] = True
        return out


def _layer_sites(layout: ModelLayout, layer: int, units: str) -> tuple[str, ...]:
    """Paper 1's neuron sites of one layer (gate only where the MLP is gated), or the channel sites; none in a
    hybrid model's layer without an MLP."""
    sites = ("mlp.act", "mlp.down") if units == "channels" else ("mlp.gate", "mlp.up", "mlp.down")
    return tuple(site for site in sites if layout.has_site(site, layer))


def channel_scores(neuron_space: UnitSpace, channel_space: UnitSpace, scores: np.ndarray) -> np.ndarray:
    """Map neuron scores [..., N_neurons] to channel scores [..., N_channels]: max(gate, up) per channel."""
    out = np.empty((*scores.shape[:-1], channel_space.size), dtype=scores.dtype)
    by_key = {(b.site, b.layer): b for b in neuron_space.blocks}
    for block in channel_space.blocks:
        target = out[..., block.offset : block.offset + block.width]
        if block.site == "mlp.down":
            src = by_key[("mlp.down", block.layer)]
            target[...] = scores[..., src.offset : src.offset + src.width]
            continue
        parts = [by_key[(s, block.layer)] for s in ("mlp.gate", "mlp.up") if (s, block.layer) in by_key]
        stacked = np.stack([scores[..., p.offset : p.offset + p.width] for p in parts])
        target[...] = np.nanmax(stacked, axis=0) if len(parts) > 1 else stacked[0]
    return out


def source_neurons(neuron_space: UnitSpace, space: UnitSpace, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The neurons each unit of `space` is scored from (itself; for a channel its gate and up, as in
    `channel_scores`, or its down output). Returns (neuron ids, owner): neuron i serves unit `ids[owner[i]]`."""
    ids = np.asarray(ids, dtype=np.int64)
    if space.units == "neurons":
        return ids, np.arange(ids.size)
    by_key = {(b.site, b.layer): b for b in neuron_space.blocks}
    neurons, owner = [], []
    for i, (layer, site, index) in enumerate(zip(*space.locate(ids), strict=True)):
        sources = ("mlp.down",) if site == "mlp.down" else ("mlp.gate", "mlp.up")
        for source in sources:
            if (source, int(layer)) in by_key:
                neurons.append(by_key[(source, int(layer))].offset + int(index))
                owner.append(i)
    return np.array(neurons, dtype=np.int64), np.array(owner, dtype=np.int64)


def random_like(space: UnitSpace, target: np.ndarray, seed: int) -> np.ndarray:
    """A random control set: as many units per site as `target` has (paper 1 §4.2.1, 10 seeds by default),
    drawn uniformly over all layers of that site, never from `target` itself."""
    rng = np.random.default_rng(seed)
    sites = space.site_of(target)
    chosen = []
    for site in space.sites:
        n = int((sites == site).sum())
        if n == 0:
            continue
        pool = np.setdiff1d(space.ids_of_site(site), target, assume_unique=False)
        chosen.append(rng.choice(pool, size=min(n, pool.size), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
