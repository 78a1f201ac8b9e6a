"""Expert neurons of mixture-of-experts MLPs stored as batched parameter tensors.

transformers 5 keeps a MoE layer's experts in one module with `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
(or their transposes) and computes every neuron inside one fused function (`use_experts_implementation`), so no
module boundary exists at `act(gate)·up`. While a hook engine context touches expert neurons, `ExpertsTap` runs
engramlab's own expert loop in place of the module's forward (restored on exit) and calls the engine's callbacks on
the [rows, I] gate / up / act values, where row r is one (token, expert) pair.

The loop mirrors transformers' `grouped_mm_experts_forward` (rows sorted by expert, transformers' own grouped
linear, the module's own `_apply_gate` / `act_fn`), so with no edit the output equals the default implementation bit
for bit on the same device. A model set to another experts implementation (eager, batched_mm: float64 needs one)
gets one GEMM per expert, equal to its forward up to float rounding. `probe_experts` checks at layout discovery that
the loop reproduces the module's forward on random routing; a family for which it does not is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from engramlab.errors import first_line
from engramlab.models.arch import ExpertsMlp, fused_rows

try:  # transformers' grouped GEMM (torch.nn.functional.grouped_mm where it exists): same arithmetic as its forward
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - older transformers: one GEMM per expert
    _grouped_linear = None


@dataclass
class ExpertRows:
    """Which (token, expert) pair each row of an expert tensor holds."""

    expert: torch.Tensor  # [S] int64
    token: torch.Tensor  # [S] int64, index into the flattened [B*T] tokens of the call
    n_tokens: int
    routed: torch.Tensor | None = None  # [S] bool; None = every row is routed (top-k routing)


Callback = Callable[[torch.Tensor, ExpertRows], torch.Tensor | None]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else x @ weight.T
    return out + bias if bias is not None else out


def _grouped(
    x: torch.Tensor, weight: torch.Tensor, counts: list[int] | None, offsets: torch.Tensor, bias, transposed: bool
) -> torch.Tensor:
    """Rows of `x` sorted by expert times their expert's weight; `bias` is per row. transformers' grouped GEMM when
    the model runs its experts that way (`counts` None), else one GEMM per expert (any dtype, e.g. float64)."""
    if counts is None:
        return _grouped_linear(x, weight, offsets, bias=bias, is_transposed=transposed)
    out, start = [], 0
    for expert, n in enumerate(counts):
        if n:
            out.append(_linear(x[start : start + n], weight[expert], None, transposed))
        start += n
    result = torch.cat(out) if out else x.new_zeros(0, weight.shape[2] if transposed else weight.shape[1])
    return result + bias if bias is not None else result


def own_forward(module: nn.Module) -> Callable:
    """The forward that `shadow_forward` replaces: the instance's own (accelerate's `_old_forward`) or the class's."""
    attribute = "_old_forward" if hasattr(module, "_hf_hook") else "forward"
    return module.__dict__.get(attribute) or type(module).forward.__get__(module)


def shadow_forward(module: nn.Module, forward: Callable) -> Callable[[], None]:
    """Shadow `module.forward` with an instance attribute; returns the function that puts the old one back. Under
    accelerate's device hooks (device_map="auto") the forward is accelerate's wrapper, which calls `_old_forward`
    after moving the inputs: that one is replaced instead, so the inputs still land on the module's device."""
    attribute = "_old_forward" if hasattr(module, "_hf_hook") else "forward"
    previous = module.__dict__.get(attribute)

    def restore() -> None:
        if previous is None:
            module.__dict__.pop(attribute, None)
        else:
            module.__dict__[attribute] = previous

    module.__dict__[attribute] = forward  # what nn.Module.__setattr__ does for a plain value, without its checks
    return restore


class Tap:
    """Callbacks on expert neurons, and a replacement forward of `module` installed while any is registered."""

    sites: tuple[str, ...] = ("mlp.gate", "mlp.up", "mlp.act")

    def __init__(self, module: nn.Module, spec: ExpertsMlp):
        self.module = module
        self.spec = spec
        self.callbacks: dict[str, list[Callback]] = {site: [] for site in self.sites}
        self._restore: Callable[[], None] | None = None

    def add(self, site: str, fn: Callback) -> Callable[[], None]:
        """Register `fn(values, rows) -> new values or None`; returns a function that removes it."""
        if self._restore is None:
            self._restore = shadow_forward(self.module, self._forward)
        self.callbacks[site].append(fn)

        def remove() -> None:
            if fn in self.callbacks[site]:
                self.callbacks[site].remove(fn)
            if not any(self.callbacks.values()) and self._restore is not None:
                self._restore()
                self._restore = None

        return remove

    def _call(self, site: str, values: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        for fn in self.callbacks[site]:
            new = fn(values, rows)
            if new is not None:
                values = new
        return values

    def _forward(self, *args, **kwargs):
        raise NotImplementedError


class ExpertsTap(Tap):
    """Runs engramlab's expert loop in place of one batched-experts module's forward (values `[S, I]`)."""

    def _forward(self, hidden_states: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
        if self.spec.routing == "all":
            return self._forward_all(hidden_states)
        return self._forward_top_k(hidden_states, *routing)

    def _gate_up(self, proj: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
        """The gate and up halves of the fused projection through their callbacks, then the neuron values."""
        spec, module = self.spec, self.module
        if not spec.gated:
            up = self._call("mlp.up", proj, rows)
            return self._call("mlp.act", module.act_fn(up), rows)
        gate_rows, up_rows = fused_rows(spec.fused, spec.width)
        gate = proj[..., gate_rows[0] : gate_rows[1] : gate_rows[2]]
        up = proj[..., up_rows[0] : up_rows[1] : up_rows[2]]
        new_gate, new_up = self._call("mlp.gate", gate, rows), self._call("mlp.up", up, rows)
        if new_gate is not gate or new_up is not up:
            proj = proj.clone()
            proj[..., gate_rows[0] : gate_rows[1] : gate_rows[2]] = new_gate
            proj[..., up_rows[0] : up_rows[1] : up_rows[2]] = new_up
        if spec.routing == "all":  # Llama 4 computes act(gate)·up inline
            act = module.act_fn(proj[..., : spec.width]) * proj[..., spec.width :]
        else:
            act = module._apply_gate(proj)
        return self._call("mlp.act", act, rows)

    def _forward_top_k(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """transformers' grouped-GEMM experts forward with the neuron callbacks between its steps."""
        module, spec = self.module, self.spec
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [N, H]
        n_tokens, k = x.shape[0], top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)  # [S], S = N*k
        sample_weights = top_k_weights.reshape(-1)
        expert_sorted, perm = torch.sort(expert_ids)
        token = perm // k
        histc_input = expert_sorted.float() if x.device.type in ("cpu", "mps") else expert_sorted.int()
        per_expert = torch.histc(histc_input, bins=spec.n_experts, min=0, max=spec.n_experts - 1)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        grouped = _grouped_linear is not None and _implementation(module) == "grouped_mm"
        counts = None if grouped else per_expert.long().tolist()
        rows = ExpertRows(expert=expert_sorted, token=token, n_tokens=n_tokens)
        has_bias = getattr(module, "has_bias", False)
        first = module.gate_up_proj if spec.gated else module.up_proj
        first_bias = None
        if has_bias:
            first_bias = (module.gate_up_proj_bias if spec.gated else module.up_proj_bias)[expert_sorted]
        proj = _grouped(x[token], first, counts, offsets, first_bias, spec.transposed)  # [S, 2I] or [S, I]
        act = self._gate_up(proj, rows)  # [S, I]
        down_bias = module.down_proj_bias[expert_sorted] if has_bias else None
        out = _grouped(act, module.down_proj, counts, offsets, down_bias, spec.transposed)  # [S, H]
        if getattr(module, "has_post_expert_norm", False):
            out = module.post_expert_norm(out)
        weighted = out * sample_weights[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.size(0), device=perm.device)
        final = weighted[inverse].view(n_tokens, k, shape[-1]).sum(dim=1)  # [N, H]
        return final.to(hidden_states.dtype).reshape(shape)

    def _forward_all(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Llama 4's experts: hidden_states is [E*N, H], each expert's block scaled by its router score."""
        module, spec = self.module, self.spec
        x = hidden_states.view(spec.n_experts, -1, hidden_states.shape[-1])  # [E, N, H]
        n_tokens = x.shape[1]
        arange = torch.arange(n_tokens, device=x.device)
        rows = ExpertRows(
            expert=torch.arange(spec.n_experts, device=x.device).repeat_interleave(n_tokens),
            token=arange.repeat(spec.n_experts),
            n_tokens=n_tokens,
            routed=(x != 0).any(dim=-1).reshape(-1),  # router score 0 <=> the expert's input row is exactly 0
        )
        gate_up = torch.bmm(x, module.gate_up_proj)  # [E, N, 2I]
        act = self._gate_up(gate_up.reshape(-1, gate_up.shape[-1]), rows).view(spec.n_experts, n_tokens, -1)
        return torch.bmm(act, module.down_proj).view(-1, hidden_states.shape[-1])


def _implementation(module: nn.Module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None)


def expert_vectors(module: nn.Module, spec: ExpertsMlp, part: str) -> torch.Tensor:
    """`[E*I, H]`: each expert neuron's gate row, up row (what it reads) or down column (what it writes)."""
    if part == "down":
        down = module.down_proj  # [E, H, I] or transposed [E, I, H]
        per_neuron = down if spec.transposed else down.transpose(1, 2)  # [E, I, H]
        return per_neuron.reshape(-1, per_neuron.shape[-1])
    weight = module.gate_up_proj if spec.gated else module.up_proj
    rows = weight.transpose(1, 2) if spec.transposed else weight  # [E, out, H]
    if spec.gated:
        gate_rows, up_rows = fused_rows(spec.fused, spec.width)
        start, stop, step = gate_rows if part == "gate" else up_rows
        rows = rows[:, start:stop:step]
    return rows.reshape(-1, rows.shape[-1])


def probe_crashed(err: Exception) -> str:
    """What a probe forward that raised says: a forward with another signature or extra state."""
    return f"{type(err).__name__} on a probe forward ({first_line(err)[:120]})."


def probe_differs(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when a probe forward reproduced the module's output, else by how much it missed."""
    if outputs_match(got, expected):
        return None
    return f"outputs differ by {float((got.float() - expected.float()).abs().max()):.3g} on a probe forward."


def outputs_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding: 1e-4 of the largest magnitude in float32, 2e-2 in half precision."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    tol = 1e-4 if a.dtype == torch.float32 and b.dtype == torch.float32 else 2e-2
    scale = float(b.abs().max()) + 1e-6
    return bool((a - b).abs().max() <= tol * scale)


@torch.no_grad()
def probe_experts(module: nn.Module, spec: ExpertsMlp, hidden: int) -> str | None:
    """None when engramlab's loop reproduces the module's forward on 6 random tokens, else what differed."""
    weight = next(module.parameters())
    if weight.device.type == "meta":
        return None  # nothing can run on the meta device; hooking such a model fails earlier anyway
    generator = torch.Generator().manual_seed(0)
    n_tokens = 6
    x = torch.randn(n_tokens, hidden, generator=generator).to(device=weight.device, dtype=weight.dtype)
    tap = ExpertsTap(module, spec)
    if spec.routing == "all":
        scores = torch.rand(spec.n_experts, n_tokens, 1, generator=generator) * (
            torch.rand(spec.n_experts, n_tokens, 1, generator=generator) > 0.5
        )
        args: tuple = ((x[None] * scores.to(x)).reshape(-1, hidden),)
    else:
        k = min(2, spec.n_experts)
        index = torch.stack([torch.randperm(spec.n_experts, generator=generator)[:k] for _ in range(n_tokens)])
        weights = torch.rand(n_tokens, k, generator=generator).to(x)
        args = (x, index.to(weight.device), weights)
    try:
        expected = module(*args)
        got = tap._forward(*args)
    except Exception as err:  # a forward with another signature or extra state: not the format we reproduce
        return probe_crashed(err)
    if isinstance(expected, tuple):
        expected = expected[0]
    return probe_differs(got, expected)
