"""The hook engine: record, zero, clamp, scale, add or ablate a direction, and patch — on unmodified HF modules.

This is the only place in engramlab that touches PyTorch hooks. Its design follows baukit's `Trace`/`TraceDict`
(context managers over dotted module paths that always remove their handles, an early-stop exception) with
TransformerLens-style site names mapped per family by `engramlab.models.arch`.

Every method returns a `HookContext`; hooks exist only inside its `with` block and are removed on exit, also on
an exception. Nothing in the model is rewritten, so a context with no edit leaves the logits bit-identical, and
edits keep working inside `model.generate` (KV cache, batching and dtype are HF's own).

Positions (`positions=`) are resolved per forward call from the attention mask the model was called with:
- `"all"`: every position, padding included (the default for edits: prompt and generated tokens alike);
- `"nonpad"`: positions whose attention mask is 1;
- `"last"`: the last non-pad position of each row in this call (during cached generation: the new token);
- a list of ints: absolute token positions (0 = first token of the sequence, counted across generation steps),
  negative ints count from the end of the current call's input (-1 = its last column);
- a bool tensor `[B, L]`: absolute positions per row.

Per-row edits: neuron masks of shape `[B, D]`, directions `[B, D]` and coefficients `[B]` give each batch row its
own intervention, so a k-sweep or a set of random controls runs as one batched forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.arch import SITES, ArchSpec, ModelLayout

Positions = Literal["all", "nonpad", "last"] | Sequence[int] | torch.Tensor
Reduce = Literal["mean", "sum"] | None
SiteKey = tuple[str, int]  # (site, layer)

# Forward order of the sites inside one decoder layer, used to find the last hook of a recording (early stop).
_SITE_ORDER = {"resid_pre": 0, "attn.out": 1, "mlp.gate": 2, "mlp.up": 3, "mlp.act": 4, "mlp.down": 5, "resid_post": 6}


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early; swallowed by the recording context that raised it."""


@dataclass
class _CallState:
    """What the engine knows about the forward call in flight."""

    attention_mask: torch.Tensor | None = None  # [B, L] over the whole sequence so far (cache included)
    offset: int = 0  # absolute position of this call's first input token
    n_calls: int = 0


class HookEngine:
    """Interventions and recordings on one HF causal LM, addressed by (site, layer).

    >>> engine = HookEngine(model)
    >>> with engine.record(["mlp.act"], positions="nonpad", reduce="mean") as rec:
    ...     model(**batch)
    >>> rec["mlp.act", 3]            # [B, intermediate_size], mean over each row's real tokens
    >>> with engine.zero("mlp.act", 3, neurons=[17, 42]):
    ...     model.generate(**batch, max_new_tokens=5)
    """

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        self.model = model
        self.layout = ModelLayout(model, spec)
        self.call = _CallState()
        self._tracker_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._open_contexts = 0

    # ----------------------------------------------------------------------------------------------------------
    # Public API: each returns a context manager.

    def record(
        self,
        sites: str | Iterable[str],
        layers: int | Iterable[int] | None = None,
        positions: Positions = "all",
        reduce: Reduce = None,
        dtype: torch.dtype = torch.float32,
        stop: bool = False,
    ) -> Recording:
        """Record activations at `sites` x `layers` (None = all layers).

        `reduce=None` keeps `[B, T, D]` for `positions="all"` (concatenated across calls, so a cached `generate`
        yields the whole sequence), `[B, D]` for `"last"` (the latest call) and `[B, n, D]` for a list of ints.
        `reduce="mean"`/`"sum"` accumulates `[B, D]` over the selected positions of every call in `dtype`, so
        memory is O(batch x neurons) whatever the sequence length. `stop=True` ends the forward right after the
        last recorded site (no logits are computed; only for plain forwards, not `generate`).
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
            layer = self._check(site, layer)
            mask = self._neuron_mask(site, neurons)
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
        keys = self._keys(site, layers)
        vector = self._direction(site, vector)

        def edit(x: torch.Tensor) -> torch.Tensor:
            v = _per_row(vector, x, "vector").to(x.dtype)  # [B or 1, D]
            c = _coeff(coeff, x)  # [B or 1, 1]
            delta = (c * v)[:, None, :]  # [B, 1, D]
            sel = self._positions(positions, x)
            if sel is None:
                return x + delta
            return x + delta * sel[:, :, None].to(x.dtype)

        return HookContext(self, [(s, layer, edit) for s, layer in keys])

    def ablate_direction(
        self,
        site: str,
        layers: int | Iterable[int] | None,
        vector: torch.Tensor,
        positions: Positions = "all",
    ) -> HookContext:
        """Directional ablation x <- x - (x . v_hat) v_hat (Arditi et al. 2024) at the chosen positions."""
        keys = self._keys(site, layers)
        vector = self._direction(site, vector)
        unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

        def edit(x: torch.Tensor) -> torch.Tensor:
            u = _per_row(unit, x, "vector").float()  # [B or 1, D]
            xf = x.float()
            proj = torch.einsum("btd,bd->bt", xf, u.expand(x.shape[0], -1))  # [B, T]
            sel = self._positions(positions, x)
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
        layer = self._check(site, layer)
        width = self.layout.site_width(site)
        if source.dim() != 3 or source.shape[-1] != width:
            raise EngramError(f"patch source must be [B, L, {width}] for site '{site}', got {list(source.shape)}.")

        def edit(x: torch.Tensor) -> torch.Tensor:
            batch, length = x.shape[:2]
            start = self.call.offset
            src = source[:, start : start + length].to(device=x.device, dtype=x.dtype)  # [B or 1, <=T, D]
            src = _per_row(src, x, "patch source")
            if src.shape[1] < length:  # this call runs past the recorded sequence: keep those positions
                src = torch.cat([src.expand(batch, -1, -1), x[:, src.shape[1] :]], dim=1)
            sel = self._positions(positions, x)
            if sel is None:
                return src.expand(batch, -1, -1).clone()
            return torch.where(sel[:, :, None], src, x)

        return HookContext(self, [(site, layer, edit)])

    # ----------------------------------------------------------------------------------------------------------
    # Argument checks.

    def _check(self, site: str, layer: int) -> int:
        self.layout.check_site(site)
        return self.layout.check_layer(layer)

    def _keys(self, sites: str | Iterable[str], layers: int | Iterable[int] | None) -> list[SiteKey]:
        site_list = [sites] if isinstance(sites, str) else list(sites)
        if layers is None:
            layer_list = list(range(self.layout.n_layers))
        elif isinstance(layers, int):
            layer_list = [layers]
        else:
            layer_list = list(layers)
        if not site_list or not layer_list:
            raise EngramError("choose at least one site and one layer.")
        return [(site, self._check(site, layer)) for site in site_list for layer in layer_list]

    def _neuron_mask(self, site: str, neurons) -> torch.Tensor:
        """Neuron indices or a bool mask -> bool mask `[D]` or `[B, D]`."""
        width = self.layout.site_width(site)
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

    def _direction(self, site: str, vector: torch.Tensor) -> torch.Tensor:
        width = self.layout.site_width(site)
        vector = torch.as_tensor(vector)
        if vector.dim() not in (1, 2) or vector.shape[-1] != width:
            raise EngramError(f"direction for '{site}' must be [{width}] or [B, {width}], got {list(vector.shape)}.")
        return vector.detach()

    # ----------------------------------------------------------------------------------------------------------
    # Position resolution for the call in flight.

    def _positions(self, positions: Positions, x: torch.Tensor) -> torch.Tensor | None:
        """Bool `[B, T]` of the positions selected in this call, or None for all of them."""
        batch, length = x.shape[:2]
        mask = self._window_mask(batch, length, x.device)  # [B, T] bool or None
        if isinstance(positions, str):
            if positions == "all":
                return None
            if positions == "nonpad":
                return mask
            if positions == "last":
                if mask is None:
                    last = torch.full((batch,), length - 1, device=x.device)
                else:  # index of the last True in each row
                    ar = torch.arange(length, device=x.device)
                    last = torch.where(mask, ar, -1).amax(dim=1).clamp_min(0)
                return torch.nn.functional.one_hot(last, length).bool()
            raise EngramError(f"positions={positions!r} is not supported; use 'all', 'nonpad', 'last', ints or a mask.")
        if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
            if positions.dim() != 2:
                raise EngramError(f"a positions mask must be bool [B, L], got {list(positions.shape)}.")
            start = self.call.offset
            window = positions[:, start : start + length].to(x.device)
            if window.shape[1] < length:
                window = torch.nn.functional.pad(window, (0, length - window.shape[1]), value=False)
            return _per_row(window, x, "positions mask").expand(batch, -1)
        sel = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
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

    def _site_module(self, site: str, layer: int) -> tuple[nn.Module, bool]:
        """The module to hook for a site and whether the tensor is its input (pre-hook) or its output."""
        spec = self.layout.spec
        if site in ("resid_pre", "resid_post"):
            return self.layout.layers[layer], site == "resid_pre"
        relative = {
            "attn.out": spec.attn_out,
            "mlp.gate": spec.gate,
            "mlp.up": spec.up,
            "mlp.act": spec.down,
            "mlp.down": spec.down,
        }[site]
        return self.layout.layer_module(layer, relative), site == "mlp.act"

    def _register(self, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        """Attach `fn(x) -> new x or None` to a site, unpacking the module's tuple input or output."""
        module, on_input = self._site_module(site, layer)
        if on_input:

            def pre_hook(mod, args, kwargs):
                if args:
                    new = fn(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                new = fn(kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(mod, args, output):
            if isinstance(output, tuple):
                new = fn(output[0])
                return None if new is None else (new, *output[1:])
            return fn(output)

        return module.register_forward_hook(hook)


HookSpec = tuple[str, int, Callable[[torch.Tensor], torch.Tensor | None]]


class HookContext:
    """A set of hooks that exist only inside a `with` block. `fired[(site, layer)]` counts calls per hook."""

    def __init__(self, engine: HookEngine, hooks: list[HookSpec]):
        self.engine = engine
        self.hooks = hooks
        self.fired: dict[SiteKey, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> HookContext:
        self.engine._open()
        try:
            for site, layer, fn in self.hooks:
                self.fired[(site, layer)] = 0
                self._handles.append(self.engine._register(site, layer, self._counting(site, layer, fn)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return False

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.engine._close()

    def _counting(self, site: str, layer: int, fn):
        def wrapped(x: torch.Tensor):
            self.fired[(site, layer)] += 1
            return fn(x)

        return wrapped


@dataclass
class _Accumulator:
    total: torch.Tensor | None = None  # [B, D] running sum over selected positions
    count: torch.Tensor | None = None  # [B]
    chunks: list[torch.Tensor] = field(default_factory=list)  # unreduced per-call pieces


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
        last = max(keys, key=lambda k: (k[1], _SITE_ORDER[k[0]])) if stop else None
        super().__init__(engine, [(site, layer, self._recorder((site, layer), last)) for site, layer in keys])

    def __exit__(self, exc_type, exc, tb) -> bool:
        super().__exit__(exc_type, exc, tb)
        return exc_type is StopForward and getattr(exc, "source", lambda: None)() is self

    def __getitem__(self, key: SiteKey) -> torch.Tensor:
        """The recording at (site, layer). A single forward's recording is returned as stored (no copy); several
        calls (a cached `generate`) are concatenated along positions."""
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
            return acc.total / acc.count[:, None]
        if not acc.chunks:
            raise EngramError(f"nothing was recorded at ({site}, {layer}): did the forward run inside the block?")
        if self.positions == "last" or len(acc.chunks) == 1:
            return acc.chunks[-1]
        return torch.cat(acc.chunks, dim=1)

    def keys(self) -> list[SiteKey]:
        return list(self._acc)

    def counts(self, key: SiteKey) -> torch.Tensor:
        """Number of positions accumulated per row (`reduce` mode)."""
        return self._acc[key].count

    def _recorder(self, key: SiteKey, last: SiteKey | None):
        """The hook body for one site. It closes over the accumulator, the settings and a weak reference to the
        recording (for the stop signal), so the recording and its hooks form no reference cycle."""
        engine, acc = self._engine, self._acc[key]
        positions, reduce, dtype = self.positions, self.reduce, self.dtype
        source = weakref.ref(self)

        def record(x: torch.Tensor) -> None:
            x = x.detach()
            if reduce is None:
                if positions == "all":
                    acc.chunks.append(x.to(dtype))
                elif positions == "last":
                    sel = engine._positions("last", x)  # [B, T] one-hot
                    acc.chunks = [x[sel].to(dtype)]  # [B, D]
                else:
                    cols = engine._columns(positions, x.shape[1])
                    if cols:
                        acc.chunks.append(x[:, cols].to(dtype))
            else:
                sel = engine._positions(positions, x)
                if sel is None:
                    total = x.sum(dim=1, dtype=dtype)  # [B, D]
                    count = torch.full((x.shape[0],), x.shape[1], dtype=dtype, device=x.device)
                else:
                    weights = sel.to(dtype)  # [B, T]
                    total = torch.einsum("btd,bt->bd", x.to(dtype), weights)
                    count = weights.sum(dim=1)
                acc.total = total if acc.total is None else acc.total + total
                acc.count = count if acc.count is None else acc.count + count
            if key == last:
                # Raised without binding it to a local: a local would tie the exception to this frame through its
                # traceback (a cycle), keeping every frame of the forward and their tensors (HF's KV cache
                # included) alive until the cycle collector ran.
                raise _stop_signal(source, key)
            return None

        return record


def _stop_signal(source: weakref.ref, key: SiteKey) -> StopForward:
    """The early-stop exception of a recording, carrying a weak reference to the recording that raised it."""
    signal = StopForward(f"recording complete at {key}")
    signal.source = source
    return signal


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers.


def _is_int_list(positions) -> bool:
    return isinstance(positions, (list, tuple, range)) and all(isinstance(p, int) for p in positions)


def _per_row(t: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    """Broadcast a `[D]`/`[1, ...]`/`[B, ...]` tensor against batch size of x, with a clear error on mismatch."""
    t = t.to(x.device)
    if t.dim() == 1:
        return t[None]
    if t.shape[0] not in (1, x.shape[0]):
        raise EngramError(
            f"{what} has {t.shape[0]} rows but the batch in flight has {x.shape[0]} "
            f"(per-row interventions need the same batch size; beam search or num_return_sequences change it)."
        )
    return t


def _coeff(coeff: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(coeff, dtype=x.dtype, device=x.device)
    if c.dim() == 0:
        return c.reshape(1, 1)
    return _per_row(c.reshape(-1, 1), x, "coeff")  # [B, 1]


def _neuron_edit(engine: HookEngine, mask: torch.Tensor, mode: str, value, positions: Positions):
    """The hook body for zero / clamp / scale on a bool neuron mask `[D]` or `[B, D]`."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        m = _per_row(mask, x, "neuron mask")[:, None, :]  # [B or 1, 1, D]
        sel = engine._positions(positions, x)
        if sel is not None:
            m = m & sel[:, :, None]  # [B, T, D]
        if mode == "zero":
            return x.masked_fill(m, 0)
        v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        if v.dim() == 2:
            v = _per_row(v, x, "value")[:, None, :]  # [B, 1, D]
        if mode == "clamp":
            return torch.where(m, v, x)
        return torch.where(m, x * v, x)

    return edit


__all__ = ["SITES", "HookContext", "HookEngine", "Positions", "Recording", "StopForward"]
