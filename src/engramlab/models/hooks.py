"""The hook engine: record, zero, clamp, scale, add or ablate a direction, and patch — on unmodified HF modules.

This is the only place in engramlab that touches PyTorch hooks. Its design follows baukit's `Trace`/`TraceDict`
(context managers over dotted module paths that always remove their handles, an early-stop exception) with
TransformerLens-style site names whose modules `engramlab.models.layout` discovers per model.

Every method returns a `HookContext`; hooks exist only inside its `with` block and are removed on exit, also on
an exception. Nothing in the model is rewritten, so a context with no edit leaves the logits bit-identical, and
edits keep working inside `model.generate` (KV cache, batching and dtype are HF's own). The one exception is a MoE
layer's routed experts: transformers computes their neurons inside one fused function, so while a context touches
them `engramlab.models.experts.ExpertsTap` runs an equivalent expert loop in place of the experts module's forward
(for experts kept as a list of modules, `engramlab.models.expert_list.ExpertListTap` does the same for the block).

A site may live in several places ("parts"): one module output for most sites, the two halves of a fused gate+up
projection's output, or the routed-expert rows and the shared expert of a MoE layer, each covering its own units
of the site's axis. Every edit and recording below works per part, so a mask or vector over the whole axis lands
on the right neurons.

Positions (`positions=`) are resolved per forward call from the attention mask the model was called with:
- `"all"`: every position, padding included (the default for edits: prompt and generated tokens alike);
- `"nonpad"`: positions whose attention mask is 1;
- `"last"`: the last non-pad position of each row in this call (during cached generation: the new token);
- a list of ints: absolute token positions (0 = first token of the sequence, counted across generation steps),
  negative ints count from the end of the current call's input (-1 = its last column);
- a bool tensor `[B, L]`: absolute positions per row.

Per-row edits: neuron masks of shape `[B, D]`, directions `[B, D]` and coefficients `[B]` give each batch row its
own intervention, so a k-sweep or a set of random controls runs as one batched forward.

Expert neurons: an edit acts on the tokens routed to that expert (an expert's neuron does not exist for the other
tokens); a mean recording averages over the tokens routed to each expert (`Recording.expert_counts`), 0 where
none was. Directional ablation and patching need the whole axis as one tensor, so they are refused on the neuron
sites of MoE layers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.arch import ROUTER_SITES, SITES, ArchSpec
from engramlab.models.expert_list import ExpertListTap
from engramlab.models.experts import ExpertRows, ExpertsTap
from engramlab.models.layout import ModelLayout, Part

Positions = Literal["all", "nonpad", "last"] | Sequence[int] | torch.Tensor
Reduce = Literal["mean", "sum"] | None
SiteKey = tuple[str, int]  # (site, layer)


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; swallowed by the recording context that raised it."""


@dataclass
class _CallState:
    """What the engine knows about the forward call in flight."""

    attention_mask: torch.Tensor | None = None  # [B, L] over the whole sequence so far (cache included)
    offset: int = 0  # absolute position of this call's first input token
    n_calls: int = 0
    shape: tuple[int, int] | None = None  # [B, T] of this call's input (to unflatten [B*T, D] tensors)


class _Dense:
    """A part that is a `[B, T, width]` tensor: units `offset .. offset + width` of the site's axis."""

    def __init__(self, part: Part, batch: int, length: int):
        self.part, self.batch, self.length = part, batch, length

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """`[rows, D]` over the site axis -> this part's units, `[rows, 1, width]`."""
        return t[:, None, self.part.offset : self.part.offset + self.part.width]

    def select(self, sel: torch.Tensor) -> torch.Tensor:
        return sel[:, :, None]  # [B, T, 1]


class _Rows:
    """A part that is `[S, I]` routed-expert rows: row r is (token, expert); units `offset + e*I .. + I`."""

    def __init__(self, part: Part, rows: ExpertRows, batch: int, length: int):
        self.part, self.rows, self.batch, self.length = part, rows, batch, length
        self.per_expert = part.experts.width  # type: ignore[union-attr]
        self.row_batch = rows.token // length  # [S]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        block = t[:, self.part.offset : self.part.offset + self.part.width]
        block = block.reshape(t.shape[0], -1, self.per_expert)  # [rows, E, I]
        batch = self.row_batch if t.shape[0] > 1 else torch.zeros_like(self.row_batch)
        return block[batch.to(block.device), self.rows.expert.to(block.device)]  # [S, I]

    def select(self, sel: torch.Tensor) -> torch.Tensor:
        return sel.reshape(-1)[self.rows.token][:, None]  # [S, 1]

    def routed(self) -> torch.Tensor | None:
        return None if self.rows.routed is None else self.rows.routed[:, None]


Where = _Dense | _Rows
HookFn = Callable[[torch.Tensor, Where], torch.Tensor | None]


class HookEngine:
    """Interventions and recordings on one HF causal LM, addressed by (site, layer).

    >>> engine = HookEngine(model)
    >>> with engine.record(["mlp.act"], positions="nonpad", reduce="mean") as rec:
    ...     model(**batch)
    >>> rec["mlp.act", 3]            # [B, neurons], mean over each row's real tokens
    >>> with engine.zero("mlp.act", 3, neurons=[17, 42]):
    ...     model.generate(**batch, max_new_tokens=5)
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None, layout: ModelLayout | None = None):
        self.model = model
        self.layout = layout if layout is not None else ModelLayout(model, spec)
        self.call = _CallState()
        self._tracker_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._open_contexts = 0
        self._taps: dict[int, ExpertsTap | ExpertListTap] = {}

    # ----------------------------------------------------------------------------------------------------------
    # Public API: each returns a context manager.

    def record(
        self,
        sites: str | Iterable[str] | Iterable[SiteKey],
        layers: int | Iterable[int] | None = None,
        positions: Positions = "all",
        reduce: Reduce = None,
        dtype: torch.dtype = torch.float32,
        stop: bool = False,
    ) -> Recording:
        """Record activations at `sites` x `layers` (None = all layers), or at exactly the `(site, layer)` pairs
        given as `sites` (for sites that exist in some layers only: a hybrid model's MLP sites).

        `reduce=None` keeps `[B, T, D]` for `positions="all"` (concatenated across calls, so a cached `generate`
        yields the whole sequence), `[B, D]` for `"last"` (the latest call) and `[B, n, D]` for a list of ints.
        `reduce="mean"`/`"sum"` accumulates `[B, D]` over the selected positions of every call in `dtype`, so
        memory is O(batch x neurons) whatever the sequence length. `stop=True` ends the forward right after the
        last recorded layer (no logits are computed; only for plain forwards, not `generate`).
        """
        keys = self._keys(sites, layers)
        if reduce not in (None, "mean", "sum"):
            raise EngramError(f"reduce={reduce!r} is not supported; use None, 'mean' or 'sum'.")
        if reduce is None and not _is_int_list(positions) and positions not in ("all", "last"):
            raise EngramError("positions='nonpad' or a bool mask needs reduce='mean' or 'sum' (rows are ragged).")
        return Recording(self, keys, positions, reduce, dtype, stop)

    def edit_neurons(
        self,
        masks: Mapping[SiteKey, torch.Tensor | Sequence[int]],
        mode: Literal["zero", "clamp", "scale"] = "zero",
        value: float | torch.Tensor = 0.0,
        positions: Positions = "all",
    ) -> HookContext:
        """Zero, clamp to `value`, or scale by `value` chosen neurons at several (site, layer)s at once.

        Each mask is a list of neuron indices, a bool `[D]` (same neurons for every row) or a bool `[B, D]`
        (row i edits its own set S_i). `value` is a scalar, a `[D]` or a `[B, D]` tensor.
        """
        if mode not in ("zero", "clamp", "scale"):
            raise EngramError(f"mode={mode!r} is not supported; use 'zero', 'clamp' or 'scale'.")
        hooks = []
        for (site, layer), neurons in masks.items():
            layer = self._check(site, layer, edit=True)
            mask = self._neuron_mask(site, layer, neurons)
            hooks.append((site, layer, _neuron_edit(self, mask, mode, value, positions)))
        return HookContext(self, hooks)

    def zero(self, site: str, layer: int, neurons) -> HookContext:
        """Set `neurons` at (site, layer) to 0 at every position (prompt and generated tokens)."""
        return self.edit_neurons({(site, layer): neurons}, "zero")

    def clamp(self, site: str, layer: int, neurons, value: float | torch.Tensor) -> HookContext:
        """Clamp `neurons` at (site, layer) to `value` at every position."""
        return self.edit_neurons({(site, layer): neurons}, "clamp", value)

    def scale(self, site: str, layer: int, neurons, factor: float | torch.Tensor) -> HookContext:
        """Multiply `neurons` at (site, layer) by `factor` at every position."""
        return self.edit_neurons({(site, layer): neurons}, "scale", factor)

    def add_direction(
        self,
        site: str,
        layers: int | Iterable[int] | None,
        vector: torch.Tensor,
        coeff: float | torch.Tensor = 1.0,
        positions: Positions = "all",
    ) -> HookContext:
        """Activation addition x <- x + c*v at the chosen positions. `vector` is `[D]` or `[B, D]`, `coeff` a
        scalar or `[B]`. The vector is used as given (not normalised)."""
        keys = self._keys(site, layers, edit=True)
        vector = self._direction(site, keys, vector)

        def edit(x: torch.Tensor, where: Where) -> torch.Tensor:
            v = _per_row(vector, x, "vector", where.batch).to(x.dtype)  # [B or 1, D]
            c = _coeff(coeff, x, where.batch)  # [B or 1, 1]
            delta = where.take(c * v)  # [B or 1, 1, w] or [S, I]
            sel = self._positions(positions, where.batch, where.length, x.device)
            if sel is not None:
                delta = delta * where.select(sel).to(x.dtype)
            if isinstance(where, _Rows) and where.routed() is not None:
                delta = delta * where.routed().to(x.dtype)
            return x + delta

        return HookContext(self, [(s, layer, edit) for s, layer in keys])

    def ablate_direction(
        self,
        site: str,
        layers: int | Iterable[int] | None,
        vector: torch.Tensor,
        positions: Positions = "all",
    ) -> HookContext:
        """Directional ablation x <- x - (x . v_hat) v_hat (Arditi et al. 2024) at the chosen positions."""
        keys = self._keys(site, layers, edit=True)
        self._require_flat("ablate_direction", keys)
        vector = self._direction(site, keys, vector)
        unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

        def edit(x: torch.Tensor, where: Where) -> torch.Tensor:
            u = _per_row(unit, x, "vector").float()  # [B or 1, D]
            xf = x.float()
            proj = torch.einsum("btd,bd->bt", xf, u.expand(x.shape[0], -1))  # [B, T]
            sel = self._positions(positions, where.batch, where.length, x.device)
            if sel is not None:
                proj = proj * sel.to(proj.dtype)
            return (xf - proj[:, :, None] * u[:, None, :]).to(x.dtype)

        return HookContext(self, [(s, layer, edit) for s, layer in keys])

    def patch(
        self,
        site: str,
        layer: int,
        source: torch.Tensor,
        positions: Positions = "all",
    ) -> HookContext:
        """Activation patching: replace the activation at (site, layer) with `source` at the chosen positions.

        `source` is `[B or 1, L, D]` recorded on another input with `record(..., positions="all")`; position p of
        this run takes `source[:, p]`. Positions past L are left alone. With a bool `[B, L]` mask each row patches
        its own positions, so a whole (layer x position) patching map runs in a few batched forwards.
        """
        layer = self._check(site, layer, edit=True)
        self._require_flat("patch", [(site, layer)])
        width = self.layout.site_width(site, layer)
        if source.dim() != 3 or source.shape[-1] != width:
            raise EngramError(f"patch source must be [B, L, {width}] for site '{site}', got {list(source.shape)}.")

        def edit(x: torch.Tensor, where: Where) -> torch.Tensor:
            batch, length = x.shape[:2]
            start = self.call.offset
            src = source[:, start : start + length].to(device=x.device, dtype=x.dtype)  # [B or 1, <=T, D]
            src = _per_row(src, x, "patch source")
            if src.shape[1] < length:  # this call runs past the recorded sequence: keep those positions
                src = torch.cat([src.expand(batch, -1, -1), x[:, src.shape[1] :]], dim=1)
            sel = self._positions(positions, batch, length, x.device)
            if sel is None:
                return src.expand(batch, -1, -1).clone()
            return torch.where(sel[:, :, None], src, x)

        return HookContext(self, [(site, layer, edit)])

    # ----------------------------------------------------------------------------------------------------------
    # Argument checks.

    def _check(self, site: str, layer: int, edit: bool = False) -> int:
        if site not in SITES:
            self.layout.check_site(site)  # raises naming the valid sites
        layer = self.layout.check_layer(layer)
        self.layout.check_site(site, layer)
        if edit and site in ROUTER_SITES:
            raise EngramError(f"site '{site}' is record-only (the router's scores and routing weights).")
        return layer

    def _keys(self, sites, layers, edit: bool = False) -> list[SiteKey]:
        site_list = [sites] if isinstance(sites, str) else list(sites)
        if site_list and all(isinstance(key, tuple) for key in site_list):  # explicit (site, layer) pairs
            if layers is not None:
                raise EngramError("give either (site, layer) pairs or sites and layers, not both.")
            return [(site, self._check(site, layer, edit)) for site, layer in site_list]
        if layers is None:
            layer_list = list(range(self.layout.n_layers))
        elif isinstance(layers, int):
            layer_list = [layers]
        else:
            layer_list = list(layers)
        if not site_list or not layer_list:
            raise EngramError("choose at least one site and one layer.")
        return [(site, self._check(site, layer, edit)) for site in site_list for layer in layer_list]

    def _require_flat(self, what: str, keys: list[SiteKey]) -> None:
        for site, layer in keys:
            parts = self.layout.parts(site, layer)
            if len(parts) != 1 or not parts[0].flat_ok:
                raise EngramError(
                    f"{what} on '{site}' in layer {layer} is not supported: that site is split over routed experts "
                    f"(an expert's neurons exist only for the tokens routed to it); use edit_neurons or add_direction."
                )

    def _neuron_mask(self, site: str, layer: int, neurons) -> torch.Tensor:
        """Neuron indices or a bool mask -> bool mask `[D]` or `[B, D]`."""
        width = self.layout.site_width(site, layer)
        if isinstance(neurons, torch.Tensor) and neurons.dtype == torch.bool:
            if neurons.shape[-1] != width or neurons.dim() not in (1, 2):
                raise EngramError(
                    f"neuron mask for '{site}' must be [{width}] or [B, {width}], got {list(neurons.shape)}."
                )
            return neurons
        index = torch.as_tensor(neurons, dtype=torch.long).reshape(-1)
        if index.numel() and (index.min() < 0 or index.max() >= width):
            raise EngramError(f"neuron index out of range for '{site}': valid indices are 0..{width - 1}.")
        mask = torch.zeros(width, dtype=torch.bool)
        mask[index] = True
        return mask

    def _direction(self, site: str, keys: list[SiteKey], vector: torch.Tensor) -> torch.Tensor:
        widths = {self.layout.site_width(site, layer) for _, layer in keys}
        if len(widths) != 1:
            raise EngramError(f"site '{site}' has different widths in the chosen layers ({sorted(widths)}).")
        width = widths.pop()
        vector = torch.as_tensor(vector)
        if vector.dim() not in (1, 2) or vector.shape[-1] != width:
            raise EngramError(f"direction for '{site}' must be [{width}] or [B, {width}], got {list(vector.shape)}.")
        return vector.detach()

    # ----------------------------------------------------------------------------------------------------------
    # Position resolution for the call in flight.

    def _positions(self, positions: Positions, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        """Bool `[B, T]` of the positions selected in this call, or None for all of them."""
        mask = self._window_mask(batch, length, device)  # [B, T] bool or None
        if isinstance(positions, str):
            if positions == "all":
                return None
            if positions == "nonpad":
                return mask
            if positions == "last":
                if mask is None:
                    last = torch.full((batch,), length - 1, device=device)
                else:  # index of the last True in each row
                    ar = torch.arange(length, device=device)
                    last = torch.where(mask, ar, -1).amax(dim=1).clamp_min(0)
                return torch.nn.functional.one_hot(last, length).bool()
            raise EngramError(f"positions={positions!r} is not supported; use 'all', 'nonpad', 'last', ints or a mask.")
        if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
            if positions.dim() != 2:
                raise EngramError(f"a positions mask must be bool [B, L], got {list(positions.shape)}.")
            start = self.call.offset
            window = positions[:, start : start + length].to(device)
            if window.shape[1] < length:
                window = torch.nn.functional.pad(window, (0, length - window.shape[1]), value=False)
            return _rows_for(window, batch, "positions mask").expand(batch, -1)
        sel = torch.zeros(batch, length, dtype=torch.bool, device=device)
        cols = self._columns(positions, length)
        sel[:, cols] = True
        return sel

    def _columns(self, positions: Sequence[int], length: int) -> list[int]:
        """Columns of this call that hold the requested absolute (>= 0) or from-the-end (< 0) positions."""
        start = self.call.offset
        cols = []
        for p in positions:
            col = length + int(p) if p < 0 else int(p) - start
            if 0 <= col < length:
                cols.append(col)
        return cols

    def _window_mask(self, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        am = self.call.attention_mask
        if am is None or am.dim() != 2 or am.shape[0] != batch:
            return None
        start = self.call.offset
        return am[:, start : start + length].to(device=device, dtype=torch.bool)

    # ----------------------------------------------------------------------------------------------------------
    # Hook plumbing.

    def _open(self) -> None:
        if self._open_contexts == 0:
            self._tracker_handles = [
                self.model.register_forward_pre_hook(self._track_call, with_kwargs=True),
                self.model.register_forward_hook(self._end_call, always_call=True),
            ]
        self._open_contexts += 1

    def _close(self) -> None:
        self._open_contexts -= 1
        if self._open_contexts == 0:
            for handle in self._tracker_handles:
                handle.remove()
            self._tracker_handles = []
            self.call = _CallState()

    def _track_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")  # by keyword only: the positional order differs between families
        length = input_ids.shape[-1] if input_ids is not None else (embeds.shape[1] if embeds is not None else 0)
        batch = input_ids.shape[0] if input_ids is not None and input_ids.dim() == 2 else None
        if embeds is not None and embeds.dim() == 3:
            batch = embeds.shape[0]
        self.call.shape = (batch, length) if batch is not None else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.call.attention_mask = mask
            self.call.offset = mask.shape[1] - length
        else:
            self.call.attention_mask = None
            self.call.offset = 0
        self.call.n_calls += 1

    def _end_call(self, module: nn.Module, args: tuple, output) -> None:
        self.call.attention_mask = None
        self.call.offset = 0

    def _batch_shape(self, x: torch.Tensor, n_tokens: int) -> tuple[int, int]:
        """[B, T] of a flattened [B*T, ...] tensor (MoE blocks and some MLPs flatten the tokens), from the call."""
        shape = self.call.shape
        if shape is None or shape[0] * shape[1] != n_tokens:
            raise EngramError(
                f"a module received {n_tokens} flattened tokens but the forward call holds "
                f"{'an unknown number' if shape is None else shape[0] * shape[1]}; positions cannot be attributed."
            )
        return shape

    def _register(self, part: Part, site: str, fn: HookFn) -> list:
        """Attach `fn(x, where) -> new x or None` to one part of a site; returns removable handles."""
        handles = []
        if part.source == "experts":
            tap = self._taps.get(id(part.module))
            if tap is None:
                listed = part.experts.listed is not None  # type: ignore[union-attr]
                tap = (ExpertListTap if listed else ExpertsTap)(part.module, part.experts)  # type: ignore[arg-type]
                self._taps[id(part.module)] = tap

            def on_rows(values: torch.Tensor, rows: ExpertRows):
                batch, length = self._batch_shape(values, rows.n_tokens)
                if site in ROUTER_SITES:  # routing weights [N, E] of a list-of-experts block
                    return fn(values.view(batch, length, -1), _Dense(part, batch, length))
                return fn(values, _Rows(part, rows, batch, length))

            handles.append(_Remover(tap.add(site, on_rows)))
            return handles
        if part.source in ("router", "routing"):
            handles.append(self._register_router(part, fn))
            return handles

        def apply(x: torch.Tensor) -> torch.Tensor | None:
            flat = x.dim() == 2
            if flat:
                batch, length = self._batch_shape(x, x.shape[0])
                x = x.view(batch, length, x.shape[-1])
            new = fn(x, _Dense(part, x.shape[0], x.shape[1]))
            if new is None or not flat:
                return new
            return new.reshape(-1, new.shape[-1])

        if part.on_input:

            def pre_hook(mod, args, kwargs):
                if args:
                    new = apply(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = apply(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            handles.append(part.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            return handles

        rows = part.rows

        def on_output(y: torch.Tensor) -> torch.Tensor | None:
            if rows is None:
                return apply(y)
            start, stop, step = rows
            new = apply(y[..., start:stop:step])
            if new is None:
                return None
            y = y.clone()
            y[..., start:stop:step] = new
            return y

        def hook(mod, args, output):
            if isinstance(output, (tuple, list)):  # (hidden, extras...); a few families return a list
                new = on_output(output[0])
                return None if new is None else type(output)([new, *output[1:]])
            return on_output(output)

        handles.append(part.module.register_forward_hook(hook))
        return handles

    def _register_router(self, part: Part, fn: HookFn):
        """Record-only router sites: scores x·W_r (+ b) from the router's input, routing weights from the experts
        module's (top_k_index, top_k_weights) arguments or from Llama 4's router output."""
        n_experts = part.width

        def emit(values: torch.Tensor) -> None:  # [N, E] or [B, T, E]
            if values.dim() == 2:
                batch, length = self._batch_shape(values, values.shape[0])
                values = values.view(batch, length, n_experts)
            fn(values, _Dense(part, values.shape[0], values.shape[1]))

        if part.source == "router":

            def scores(mod, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                emit(torch.nn.functional.linear(x.to(mod.weight.dtype), mod.weight, getattr(mod, "bias", None)))

            return part.module.register_forward_pre_hook(scores, with_kwargs=True)
        if part.on_input:  # top-k: experts(hidden_states, top_k_index, top_k_weights)

            def routing(mod, args, kwargs):
                index, weights = [*args[1:], *kwargs.values()][:2]
                dense = torch.zeros(index.shape[0], n_experts, dtype=weights.dtype, device=weights.device)
                emit(dense.scatter_add(1, index.reshape(index.shape[0], -1), weights.reshape(index.shape[0], -1)))

            return part.module.register_forward_pre_hook(routing, with_kwargs=True)

        def router_output(mod, args, output):
            emit(output[0] if isinstance(output, (tuple, list)) else output)

        return part.module.register_forward_hook(router_output)


class _Remover:
    """Gives a plain remove() function the interface of a torch hook handle."""

    def __init__(self, remove: Callable[[], None]):
        self.remove = remove


HookSpec = tuple[str, int, HookFn]


class HookContext:
    """A set of hooks that exist only inside a `with` block. `fired[(site, layer)]` counts calls per hook."""

    def __init__(self, engine: HookEngine, hooks: list[HookSpec]):
        self.engine = engine
        self.hooks = hooks
        self.fired: dict[SiteKey, int] = {}
        self._handles: list = []

    def __enter__(self) -> HookContext:
        self.engine._open()
        try:
            for site, layer, fn in self.hooks:
                self.fired[(site, layer)] = 0
                for i, part in enumerate(self.engine.layout.parts(site, layer)):
                    counted = self._counting(site, layer, fn) if i == 0 else fn
                    self._handles.extend(self.engine._register(part, site, counted))
            self._after_register()
        except BaseException:
            self._remove()
            raise
        return self

    def _after_register(self) -> None:
        """Extra hooks registered after every site hook (a recording's early stop)."""

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return False

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.engine._close()

    def _counting(self, site: str, layer: int, fn: HookFn) -> HookFn:
        def wrapped(x: torch.Tensor, where: Where):
            self.fired[(site, layer)] += 1
            return fn(x, where)

        return wrapped


@dataclass
class _Accumulator:
    total: torch.Tensor | None = None  # [B, D] running sum over selected positions (expert parts filled per expert)
    count: torch.Tensor | None = None  # [B] selected positions
    expert_count: dict[int, torch.Tensor] = field(default_factory=dict)  # part offset -> [B, E] routed tokens
    chunks: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # part offset -> unreduced per-call pieces


class Recording(HookContext):
    """Recorded activations, indexed by `(site, layer)` once the block has run.

    Memory: the hook functions hold the accumulators and a weak reference to the recording, never the recording
    itself, so nothing refers back to it: its tensors are freed as soon as the last reference to the recording (or to
    a tensor read from it) goes, without waiting for Python's cycle collector.
    """

    def __init__(
        self,
        engine: HookEngine,
        keys: list[SiteKey],
        positions: Positions,
        reduce: Reduce,
        dtype: torch.dtype,
        stop: bool,
    ):
        self.positions = positions
        self.reduce = reduce
        self.dtype = dtype
        self._engine = engine
        self._acc: dict[SiteKey, _Accumulator] = {key: _Accumulator() for key in keys}
        self._widths = {key: engine.layout.site_width(*key) for key in keys}
        self._stop_layer = max(layer for _, layer in keys) if stop else None
        super().__init__(engine, [(site, layer, self._recorder((site, layer))) for site, layer in keys])

    def _after_register(self) -> None:
        if self._stop_layer is None:
            return

        source, layer = weakref.ref(self), self._stop_layer

        def stop(mod, args, output):
            # Raised without binding it to a local: a local would tie the exception to this frame through its
            # traceback (a cycle), keeping every frame of the forward and their tensors (HF's KV cache included)
            # alive until the cycle collector ran.
            raise _stop_signal(source, layer)

        self._handles.append(self.engine.layout.layers[self._stop_layer].register_forward_hook(stop))

    def __exit__(self, exc_type, exc, tb) -> bool:
        super().__exit__(exc_type, exc, tb)
        return exc_type is StopForward and getattr(exc, "source", lambda: None)() is self

    def __getitem__(self, key: SiteKey) -> torch.Tensor:
        """The recording at (site, layer). A single forward's recording of one part is returned as stored (no copy);
        several calls (a cached `generate`) are concatenated along positions, several parts along units."""
        site, layer = key
        layer = layer % self.engine.layout.n_layers
        if (site, layer) not in self._acc:
            raise KeyError(f"({site!r}, {layer}) was not recorded; recorded: {sorted(self._acc)}")
        acc = self._acc[(site, layer)]
        if self.reduce is not None:
            if acc.total is None:
                raise EngramError(f"nothing was recorded at ({site}, {layer}): did the forward run inside the block?")
            if self.reduce == "sum":
                return acc.total
            out = acc.total / acc.count[:, None]
            for offset, per_expert in acc.expert_count.items():  # expert neurons: mean over routed tokens
                per = self.engine.layout.mlp(layer).width  # neurons per expert
                stop = offset + per_expert.shape[1] * per
                denom = per_expert.clamp_min(1).repeat_interleave(per, dim=1)  # [B, E*I]
                out[:, offset:stop] = acc.total[:, offset:stop] / denom
            return out
        if not acc.chunks:
            raise EngramError(f"nothing was recorded at ({site}, {layer}): did the forward run inside the block?")
        pieces = [acc.chunks[offset] for offset in sorted(acc.chunks)]
        if len(pieces) == 1 and (self.positions == "last" or len(pieces[0]) == 1):
            return pieces[0][-1]
        if self.positions == "last":
            return torch.cat([p[-1] for p in pieces], dim=-1)
        return torch.cat([torch.cat(p, dim=1) for p in pieces], dim=-1)

    def keys(self) -> list[SiteKey]:
        return list(self._acc)

    def counts(self, key: SiteKey) -> torch.Tensor:
        """Number of positions accumulated per row (`reduce` mode), `[B]`."""
        return self._acc[key].count

    def expert_counts(self, key: SiteKey) -> torch.Tensor:
        """Tokens routed to each expert per row (`reduce` mode, neuron sites of MoE layers), `[B, experts]`."""
        acc = self._acc[key]
        if not acc.expert_count:
            raise EngramError(f"{key} holds no expert neurons.")
        return next(iter(acc.expert_count.values()))

    def _recorder(self, key: SiteKey):
        """The hook body for one site. It closes over the accumulator and the settings, never the recording, so the
        recording and its hooks form no reference cycle."""
        engine, acc, width = self._engine, self._acc[key], self._widths[key]
        positions, reduce, dtype = self.positions, self.reduce, self.dtype

        def record(x: torch.Tensor, where: Where) -> None:
            x = x.detach()
            if isinstance(where, _Rows):
                if reduce is not None:
                    _add_rows(engine, acc, x, where, width, positions, dtype)
                    return None
                x, where = _scatter_rows(x, where)  # [B, T, E*I], zeros where not routed
            offset = where.part.offset
            if reduce is None:
                chunks = acc.chunks.setdefault(offset, [])
                if positions == "all":  # a copy: some families add into their MLP output in place
                    chunks.append(x.to(dtype, copy=True))
                elif positions == "last":
                    sel = engine._positions("last", where.batch, where.length, x.device)  # [B, T] one-hot
                    acc.chunks[offset] = [x[sel].to(dtype)]  # [B, w]
                else:
                    cols = engine._columns(positions, x.shape[1])
                    if cols:
                        chunks.append(x[:, cols].to(dtype))
                return None
            sel = engine._positions(positions, where.batch, where.length, x.device)
            if sel is None:
                total = x.sum(dim=1, dtype=dtype)  # [B, w]
                count = torch.full((x.shape[0],), x.shape[1], dtype=dtype, device=x.device)
            else:
                weights = sel.to(dtype)  # [B, T]
                total = torch.einsum("btd,bt->bd", x.to(dtype), weights)
                count = weights.sum(dim=1)
            _add(acc, total, offset, width, count if offset == 0 else None, dtype)
            return None

        return record


def _add(acc: _Accumulator, total: torch.Tensor, offset: int, width: int, count, dtype: torch.dtype) -> None:
    """Add one part's `[B, w]` sums at `offset` of the site's `[B, width]` total (and the positions counted)."""
    if acc.total is None:
        acc.total = torch.zeros(total.shape[0], width, dtype=dtype, device=total.device)
    acc.total[:, offset : offset + total.shape[1]] += total
    if count is not None:
        acc.count = count if acc.count is None else acc.count + count


def _add_rows(
    engine: HookEngine, acc: _Accumulator, x: torch.Tensor, where: _Rows, width: int, positions, dtype: torch.dtype
) -> None:
    """Sum each expert's neurons over the selected tokens routed to it: `[B, E*I]` plus `[B, E]` counts."""
    n_experts, per = where.part.experts.n_experts, where.per_expert  # type: ignore[union-attr]
    sel = engine._positions(positions, where.batch, where.length, x.device)
    weight = torch.ones(x.shape[0], dtype=dtype, device=x.device)
    if sel is not None:
        weight = weight * where.select(sel)[:, 0].to(dtype)
    if where.rows.routed is not None:
        weight = weight * where.rows.routed.to(dtype)
    slot = where.row_batch * n_experts + where.rows.expert  # [S] index into [B*E]
    total = torch.zeros(where.batch * n_experts, per, dtype=dtype, device=x.device)
    total.index_add_(0, slot, x.to(dtype) * weight[:, None])
    count = torch.zeros(where.batch * n_experts, dtype=dtype, device=x.device)
    count.index_add_(0, slot, weight)
    _add(acc, total.view(where.batch, n_experts * per), where.part.offset, width, None, dtype)
    offset = where.part.offset
    count = count.view(where.batch, n_experts)
    acc.expert_count[offset] = count if offset not in acc.expert_count else acc.expert_count[offset] + count
    if where.part.offset == 0:  # positions selected per row, whatever the routing
        tokens = torch.full((where.batch,), where.length, dtype=dtype, device=x.device)
        if sel is not None:
            tokens = sel.to(dtype).sum(dim=1)
        acc.count = tokens if acc.count is None else acc.count + tokens


def _stop_signal(source: weakref.ref, layer: int) -> StopForward:
    """The early-stop exception of a recording, carrying a weak reference to the recording that raised it."""
    signal = StopForward(f"recording complete at layer {layer}")
    signal.source = source
    return signal


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers.


def _scatter_rows(x: torch.Tensor, where: _Rows) -> tuple[torch.Tensor, _Dense]:
    """Expert rows `[S, I]` -> `[B, T, E*I]` with zeros for the experts a token was not routed to."""
    n_experts, per = where.part.experts.n_experts, where.per_expert  # type: ignore[union-attr]
    full = x.new_zeros(where.batch * where.length, n_experts, per)
    values = x if where.rows.routed is None else x * where.rows.routed[:, None].to(x.dtype)
    full[where.rows.token, where.rows.expert] = values
    return full.view(where.batch, where.length, n_experts * per), _Dense(where.part, where.batch, where.length)


def _is_int_list(positions) -> bool:
    return isinstance(positions, (list, tuple, range)) and all(isinstance(p, int) for p in positions)


def _rows_for(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """A `[1, ...]`/`[B, ...]` tensor checked against the batch size in flight, with a clear error on mismatch."""
    if t.shape[0] not in (1, batch):
        raise EngramError(
            f"{what} has {t.shape[0]} rows but the batch in flight has {batch} "
            f"(per-row interventions need the same batch size; beam search or num_return_sequences change it)."
        )
    return t


def _per_row(t: torch.Tensor, x: torch.Tensor, what: str, batch: int | None = None) -> torch.Tensor:
    """Broadcast a `[D]`/`[1, ...]`/`[B, ...]` tensor against the batch size in flight (x's first dim)."""
    t = t.to(x.device)
    if t.dim() == 1:
        return t[None]
    return _rows_for(t, x.shape[0] if batch is None else batch, what)


def _coeff(coeff: float | torch.Tensor, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    c = torch.as_tensor(coeff, dtype=x.dtype, device=x.device)
    if c.dim() == 0:
        return c.reshape(1, 1)
    return _per_row(c.reshape(-1, 1), x, "coeff", batch)  # [B, 1]


def _neuron_edit(engine: HookEngine, mask: torch.Tensor, mode: str, value, positions: Positions) -> HookFn:
    """The hook body for zero / clamp / scale on a bool neuron mask `[D]` or `[B, D]` over the site's axis."""

    def edit(x: torch.Tensor, where: Where) -> torch.Tensor:
        rows = _per_row(mask, x, "neuron mask", where.batch)  # [B or 1, D]
        m = where.take(rows)  # [B or 1, 1, w] or [S, I]
        sel = engine._positions(positions, where.batch, where.length, x.device)
        if sel is not None:
            m = m & where.select(sel)
        if isinstance(where, _Rows) and where.routed() is not None:
            m = m & where.routed()
        if mode == "zero":
            return x.masked_fill(m, 0)
        v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        if v.dim() >= 1:
            v = where.take(_per_row(v, x, "value", where.batch))  # [B or 1, 1, w] or [S, I]
        if mode == "clamp":
            return torch.where(m, v, x)
        return torch.where(m, x * v, x)

    return edit


__all__ = ["SITES", "HookContext", "HookEngine", "Positions", "Recording", "StopForward"]
