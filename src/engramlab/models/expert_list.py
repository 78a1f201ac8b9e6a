"""Expert neurons of mixture-of-experts MLPs that keep one module per expert (transformers 4, remote code).

Such a MoE block gathers the tokens routed to expert e, calls `experts[e](rows)` and combines the outputs with its
own routing weights, so an expert's neurons exist only inside its own call, one call per expert, and no module sees
which token a row came from. While a hook engine context touches expert neurons (or the routing weights),
`ExpertListTap` replaces the block's forward with three steps, so that the engine gets every routed row at once with
its (token, expert) pair, exactly as `engramlab.models.experts.ExpertsTap` gives it for batched experts:

1. a silent capture pass of the block's own forward (no hook inside the block fires): each expert's forward is
   replaced by a stub that keeps its input rows and returns the unit vector of its expert index, and the shared
   expert returns zeros, so the block's output holds in column e each token's routing weight for expert e; each
   kept row is matched bit for bit to the token it was copied from;
2. every expert's gate / up / act / down on its kept rows, with the expert's own projection and activation modules
   and the engine's callbacks in between;
3. the real pass: the block's own forward again, each expert's forward replaced by one that returns the rows
   computed in step 2 (after checking it is called with the same rows), so routing, weighting, the shared expert
   and every hook on the block are the family's own. With no edit the output is the block's own, bit for bit when
   the expert's forward is act(gate)·up through its modules, as it is in every family checked.

`probe_expert_list` checks at layout discovery, on random tokens, that the three steps reproduce the block's forward
and that column e of step 1 is the weight the block gives expert e's output; a family for which they do not is
refused. Bit-identical tokens (the same prompt twice in a batch) are told apart by order: the block is assumed to
gather them in ascending token order, as every top-k implementation does (identical tokens get identical routing).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.models.arch import DenseMlp, ExpertsMlp
from engramlab.models.experts import (
    Callback,
    ExpertRows,
    Tap,
    outputs_match,
    own_forward,
    probe_crashed,
    probe_differs,
    shadow_forward,
)

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def relative(path: str, block: str) -> str:
    """A layer-relative path made relative to the MoE block that contains it."""
    return path[len(block) + 1 :] if block else path


def shared_module_path(mlp: ExpertsMlp) -> str | None:
    """The shared expert's module, relative to the layer: the deepest module holding both its up and down."""
    if mlp.shared is None:
        return None
    up, down = mlp.shared.up.path.split("."), mlp.shared.down.path.split(".")
    common = []
    for a, b in zip(up[:-1], down[:-1], strict=False):
        if a != b:
            break
        common.append(a)
    return ".".join(common) or None


class ExpertListTap(Tap):
    """Runs the capture / compute / replay forward of one list-of-experts MoE block (`module`) while callbacks are
    registered; moe.routing callbacks get the captured weights `[N, E]`."""

    sites = ("mlp.gate", "mlp.up", "mlp.act", "moe.routing")

    def __init__(self, block: nn.Module, spec: ExpertsMlp):
        super().__init__(block, spec)
        self.experts: nn.ModuleList = block.get_submodule(relative(spec.experts, spec.block))  # type: ignore[assignment]
        shared = shared_module_path(spec)
        self.shared = block.get_submodule(relative(shared, spec.block)) if shared else None
        self._forward_before: Callable | None = None
        self._inside = [m for m in block.modules() if m is not block]  # what the capture pass silences

    def add(self, site: str, fn: Callback) -> Callable[[], None]:
        if self._restore is None:
            self._forward_before = own_forward(self.module)
        return super().add(site, fn)

    def _forward(self, *args, **kwargs):
        forward = self._forward_before
        hidden = args[0] if args else kwargs["hidden_states"]
        tokens = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        segments, weights = self.capture(forward, args, kwargs)
        rows, order = self.match(tokens, segments, weights)
        outputs = self.compute(segments, order, rows)
        if self.callbacks["moe.routing"]:
            self._call("moe.routing", weights, rows)
        return self.replay(forward, args, kwargs, segments, outputs)

    # ----------------------------------------------------------------------------------------------------------
    # The three steps.

    def capture(self, forward: Callable, args, kwargs) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor]:
        """Step 1: `(expert, rows [n, H])` per expert call, in call order, and the routing weights `[N, E]`."""
        segments: list[tuple[int, torch.Tensor]] = []

        def stub(expert: int):
            def capture(x: torch.Tensor, *rest, **extra) -> torch.Tensor:
                segments.append((expert, x.reshape(-1, x.shape[-1])))
                unit = x.new_zeros(x.shape)
                unit[..., expert] = 1
                return unit

            return capture

        stubs = {expert: stub(i) for i, expert in enumerate(self.experts)}
        if self.shared is not None:
            stubs[self.shared] = lambda x, *rest, **extra: torch.zeros_like(x)
        with _silenced(self._inside), _shadowed(stubs):
            out = forward(*args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        weights = out.reshape(-1, out.shape[-1])[:, : self.spec.n_experts]  # [N, E]
        return segments, weights

    def match(self, tokens: torch.Tensor, segments, weights: torch.Tensor) -> tuple[ExpertRows, list[int]]:
        """The (token, expert) pair of every kept row, and the order of the segments that puts the rows in expert
        order (call order within an expert)."""
        order = sorted(range(len(segments)), key=lambda i: segments[i][0])  # stable: call order within an expert
        rows = [segments[i][1] for i in order]
        experts = torch.tensor([segments[i][0] for i in order], dtype=torch.long)
        sizes = torch.tensor([segments[i][1].shape[0] for i in order], dtype=torch.long)
        expert = experts.repeat_interleave(sizes).to(tokens.device)  # [S]
        all_rows = torch.cat(rows) if rows else tokens[:0]  # [S, H]
        token = gathered_tokens(tokens, all_rows, expert)
        routed = weights[token, expert] != 0
        return ExpertRows(expert=expert, token=token, n_tokens=tokens.shape[0], routed=routed), order

    def compute(self, segments, order: list[int], rows: ExpertRows) -> list[torch.Tensor]:
        """Step 2: each segment's expert output, the callbacks between the projections; returned in call order."""
        mlp: DenseMlp = self.spec.listed  # type: ignore[assignment]
        if not order:
            return []
        inputs = [segments[i][1] for i in order]
        experts = [self.experts[segments[i][0]] for i in order]
        sizes = [x.shape[0] for x in inputs]
        if mlp.gated:
            halves = [_gate_up(expert, mlp, x) for expert, x in zip(experts, inputs, strict=True)]
            gate = self._call("mlp.gate", torch.cat([g for g, _ in halves]), rows)  # [S, I]
            up = self._call("mlp.up", torch.cat([u for _, u in halves]), rows)
            pieces = zip(experts, gate.split(sizes), up.split(sizes), strict=True)
            act = torch.cat([_act(expert, mlp)(g) * u for expert, g, u in pieces])
        else:
            up = self._call("mlp.up", torch.cat([_up(e, mlp, x) for e, x in zip(experts, inputs, strict=True)]), rows)
            act = torch.cat([_act(e, mlp)(u) for e, u in zip(experts, up.split(sizes), strict=True)])
        act = self._call("mlp.act", act, rows)
        down = [e.get_submodule(mlp.down.path)(a) for e, a in zip(experts, act.split(sizes), strict=True)]
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(segments)
        for i, out in zip(order, down, strict=True):
            outputs[i] = out
        return outputs

    def replay(self, forward: Callable, args, kwargs, segments, outputs: list[torch.Tensor]):
        """Step 3: the block's own forward, each expert call answered with the rows computed in step 2."""
        pending: dict[int, list[int]] = {}
        for i, (expert, _) in enumerate(segments):
            pending.setdefault(expert, []).append(i)

        def stub(expert: int):
            def replay(x: torch.Tensor, *rest, **extra) -> torch.Tensor:
                queue = pending.get(expert)
                i = queue.pop(0) if queue else None
                if i is None or not torch.equal(_bits(x.reshape(-1, x.shape[-1])), _bits(segments[i][1])):
                    raise EngramError(
                        f"the MoE block {type(self.module).__name__} routed tokens differently in its second pass "
                        f"(expert {expert}); random routing (router jitter in training mode?) cannot be tapped."
                    )
                return outputs[i].reshape(*x.shape[:-1], outputs[i].shape[-1]).to(x.dtype)

            return replay

        with _shadowed({expert: stub(i) for i, expert in enumerate(self.experts)}):
            return forward(*args, **kwargs)


def gathered_tokens(tokens: torch.Tensor, rows: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """`[S]`: the index into `tokens [N, H]` that each of `rows [S, H]` is a bit-for-bit copy of.

    Rows are found through an integer hash of their bits (sorted, then searched) and checked bit for bit. Equal
    tokens are given to one expert's equal rows in ascending token order."""
    n, s = tokens.shape[0], rows.shape[0]
    if s == 0:
        return torch.zeros(0, dtype=torch.long, device=tokens.device)
    coefficients = _coefficients(tokens.shape[-1], tokens.device)
    token_bits, row_bits = _bits(tokens), _bits(rows)
    token_key = (token_bits.long() * coefficients).sum(-1)  # [N]; int64 wraps around, which a hash may
    row_key = (row_bits.long() * coefficients).sum(-1)  # [S]
    sorted_key, token_order = torch.sort(token_key, stable=True)
    by_key = torch.sort(row_key, stable=True).indices
    by_expert_key = by_key[torch.sort(expert[by_key], stable=True).indices]  # expert, then key, then row order
    key, owner = row_key[by_expert_key], expert[by_expert_key]
    arange = torch.arange(s, device=rows.device)
    starts = torch.ones(s, dtype=torch.bool, device=rows.device)
    starts[1:] = (key[1:] != key[:-1]) | (owner[1:] != owner[:-1])
    group_start = torch.cummax(torch.where(starts, arange, 0), dim=0).values
    rank = torch.empty_like(arange)
    rank[by_expert_key] = arange - group_start  # how many equal rows of the same expert come before this one
    position = torch.searchsorted(sorted_key, row_key) + rank
    found = position < n
    token = token_order[position.clamp(max=n - 1)]
    if not bool(found.all()) or not torch.equal(token_bits[token], row_bits):
        raise EngramError(
            "an expert was called with rows that are not copies of the MoE block's input tokens; engramlab cannot "
            "tell which token each row belongs to."
        )
    return token


@torch.no_grad()
def probe_expert_list(block: nn.Module, spec: ExpertsMlp, hidden: int) -> str | None:
    """None when the tap reproduces the block's forward on 6 random tokens and the captured weights combine the
    experts' outputs into the block's routed output; else what differed."""
    weight = next(block.parameters())
    if weight.device.type == "meta":
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, hidden, generator=generator).to(device=weight.device, dtype=weight.dtype)
    tap = ExpertListTap(block, spec)
    try:
        expected = block(x)
        expected = expected[0] if isinstance(expected, (tuple, list)) else expected
        forward = own_forward(block)
        segments, weights = tap.capture(forward, (x,), {})
        rows, order = tap.match(x.reshape(-1, hidden), segments, weights)
        outputs = tap.compute(segments, order, rows)
        got = tap.replay(forward, (x,), {}, segments, outputs)
        got = got[0] if isinstance(got, (tuple, list)) else got
        stubs = {tap.shared: lambda t, *rest, **extra: torch.zeros_like(t)} if tap.shared is not None else {}
        with _shadowed(stubs):
            routed = forward(x)
        routed = routed[0] if isinstance(routed, (tuple, list)) else routed
        each = torch.stack([expert(x.reshape(-1, hidden)) for expert in tap.experts])  # [E, N, H]
    except EngramError as err:
        return str(err)
    except Exception as err:  # a block that needs more than hidden states, or experts that are not plain MLPs
        return probe_crashed(err)
    if differs := probe_differs(got, expected):
        return differs
    combined = torch.einsum("ne,enh->nh", weights.float(), each.float())
    if not outputs_match(combined, routed.reshape(combined.shape)):
        return "the block's output is not the routing-weighted sum of its experts' outputs."
    return None


# --------------------------------------------------------------------------------------------------------------
# Small helpers.


def _gate_up(expert: nn.Module, mlp: DenseMlp, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if mlp.fused:
        z = expert.get_submodule(mlp.up.path)(x)
        return _rows(z, mlp.gate.rows), _rows(z, mlp.up.rows)  # type: ignore[union-attr]
    return expert.get_submodule(mlp.gate.path)(x), expert.get_submodule(mlp.up.path)(x)  # type: ignore[union-attr]


def _up(expert: nn.Module, mlp: DenseMlp, x: torch.Tensor) -> torch.Tensor:
    return expert.get_submodule(mlp.up.path)(x)


def _act(expert: nn.Module, mlp: DenseMlp) -> nn.Module:
    return expert.get_submodule(mlp.act)  # type: ignore[arg-type]


def _rows(z: torch.Tensor, rows: tuple[int, int, int]) -> torch.Tensor:
    start, stop, step = rows
    return z[..., start:stop:step]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so equality is bit equality (NaN equals itself, -0 differs from 0)."""
    return x.contiguous().view(_BITS[x.element_size()])


_COEFFICIENTS: dict[tuple[int, str], torch.Tensor] = {}


def _coefficients(width: int, device: torch.device) -> torch.Tensor:
    key = (width, str(device))
    if key not in _COEFFICIENTS:
        generator = torch.Generator().manual_seed(20260101)
        odd = torch.randint(1, 2**62, (width,), generator=generator, dtype=torch.long) * 2 + 1
        _COEFFICIENTS[key] = odd.to(device)
    return _COEFFICIENTS[key]


@contextmanager
def _shadowed(stubs: dict[nn.Module, Callable]) -> Iterator[None]:
    restores = [shadow_forward(module, stub) for module, stub in stubs.items()]
    try:
        yield
    finally:
        for restore in reversed(restores):
            restore()


@contextmanager
def _silenced(modules: list[nn.Module]) -> Iterator[None]:
    """No forward hook or pre-hook of `modules` fires (the capture pass is not a forward of the model: a recording
    must not see it). Written by hand because torch has no switch for one subtree's hooks; only modules that hold
    hooks are touched, through `__dict__` (nn.Module.__setattr__ costs ~3 us a call, 64 experts make it show)."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in modules if m._forward_hooks or m._forward_pre_hooks]
    for module, _, _ in saved:
        module.__dict__.update(_forward_hooks=OrderedDict(), _forward_pre_hooks=OrderedDict())
    try:
        yield
    finally:
        for module, hooks, pre_hooks in saved:
            module.__dict__.update(_forward_hooks=hooks, _forward_pre_hooks=pre_hooks)
