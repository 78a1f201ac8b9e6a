"""Layer activity as rows, and gradient projection onto the complement of a protected subspace.

Shared by HLOP (Xiao et al., ICLR 2024, arXiv 2402.11984, §3.2: the projected update ΔW ∝ δ·(x − HᵀHx)ᵀ) and its
SVD counterpart GPM (Saha et al., ICLR 2021, arXiv 2103.09762, Eq. 8): both keep, per layer, an orthonormal basis
O [k, n] of earlier tasks' presynaptic activity and remove from each weight gradient its component in that span.

For a linear layer the input-space form δᵀ(x − xOᵀO) and the weight-space form G − (GOᵀ)O are the same matrix
(G = δᵀx, and OᵀO is symmetric); for a convolution the same holds on unfolded patches when the activity is not
quantised (HLOP spec §1.4: "without spiking quantisation this equals 'input' mode"). Both modes edit only the
gradient, so either works with any optimiser:

- "input" mode (`ProjectedLinear`, the official module's choice): the layer's backward computes δᵀ(x − xOᵀO) in
  place of δᵀx. It costs 2·R·n·min(k, n − k) for R input rows instead of 2·out·n·min(k, n − k), and the projected
  rows are remembered, so the Hebbian rule reuses them after the optimiser step instead of projecting again.
- "weight" mode (`Projector.project_gradient_`): G ← G − (GOᵀ)O after `backward()`, for any layer (convolutions,
  a user's plain `nn.Linear`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ProtectedLayer = nn.Linear | nn.Conv2d


def layer_input_dim(layer: ProtectedLayer) -> int:
    """n: the width of one presynaptic row (in_features, or C_in·k_h·k_w for a convolution's patches)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]


def activity_rows(layer: ProtectedLayer, activity: Tensor) -> Tensor:
    """Presynaptic activity as rows [R, n]: linear inputs as given, convolution inputs unfolded into patches."""
    if isinstance(layer, nn.Linear):
        return activity.reshape(-1, layer.in_features)
    patches = F.unfold(
        activity, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride
    )  # (N, C·kh·kw, L)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·L, C·kh·kw)


def project_rows(rows: Tensor, basis: Tensor) -> Tensor:
    """x − xOᵀO for rows x [R, n] and an orthonormal basis O [k, n] (the residual the update may use)."""
    if basis.shape[0] == 0:
        return rows
    return rows - (rows @ basis.T) @ basis


class Projector:
    """x ↦ x − (xOᵀ)O for one fixed basis O [k, n], by the cheapest exact route (chosen once, used every step):

    - k ≤ n/2: two thin products through O (2·n·k multiply-adds per row);
    - O orthonormal and k > n/2: x − xOᵀO = xQQᵀ with Q [n, n−k] an orthonormal basis of the orthogonal complement
      (2·n·(n−k) per row; late in a task stream most of the input space is protected, so this is the thin side);
    - O not orthonormal (the literal HLOP rule) and k > n/2: one product with the explicit matrix I − OᵀO.
    """

    def __init__(self, basis: Tensor) -> None:
        self.basis = basis
        k, n = basis.shape
        self.complement_basis: Tensor | None = None
        self.complement_matrix: Tensor | None = None
        self._remembered: tuple[Tensor, int, Tensor] | None = None
        if 2 * k <= n:
            return
        eye = torch.eye(k, dtype=basis.dtype, device=basis.device)
        if torch.linalg.matrix_norm(basis @ basis.T - eye) < 1e-4:
            q, _ = torch.linalg.qr(basis.T, mode="complete")  # (n, n): first k columns span O's rows
            self.complement_basis = q[:, k:].contiguous()  # (n, n − k)
        else:
            self.complement_matrix = torch.eye(n, dtype=basis.dtype, device=basis.device) - basis.T @ basis

    def __call__(self, rows: Tensor) -> Tensor:
        """The residual rows [R, n] − their part in span(O)."""
        if self.is_identity:
            return rows
        if self.complement_basis is not None:
            return (rows @ self.complement_basis) @ self.complement_basis.T
        if self.complement_matrix is not None:
            return rows @ self.complement_matrix
        return project_rows(rows, self.basis)

    @property
    def is_identity(self) -> bool:
        return self.basis.shape[0] == 0

    def remember(self, rows: Tensor, residual: Tensor) -> None:
        """Keep `residual` = self(rows) for `recall`. Holding `rows` keeps its memory alive, so no later tensor can
        reuse the address and be mistaken for it."""
        self._remembered = (rows, rows._version, residual)

    def recall(self, rows: Tensor) -> Tensor | None:
        """self(rows) if `remember` was last given these very rows (same memory, shape, strides, unmodified)."""
        if self._remembered is None:
            return None
        old, version, residual = self._remembered
        same = (
            old.data_ptr() == rows.data_ptr()
            and old.shape == rows.shape
            and old.stride() == rows.stride()
            and rows._version == version
        )
        return residual if same else None

    def project_gradient_(self, layer: ProtectedLayer) -> None:
        """In place: G ← G − (GOᵀ)O on the layer's weight gradient viewed as [out, n] (conv weights flattened like
        F.unfold's patches); biases are left alone."""
        grad = layer.weight.grad
        if grad is None or self.is_identity:
            return
        flat = grad.view(grad.shape[0], -1)  # (out, n)
        flat.copy_(self(flat))


class _InputProjectedLinear(torch.autograd.Function):
    """y = xWᵀ whose weight gradient is δᵀ·P(x) (input-mode projection) instead of δᵀx."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, projector: Projector) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.projector = projector
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            rows = x.reshape(-1, x.shape[-1])  # (R, n)
            residual = ctx.projector(rows)
            ctx.projector.remember(rows, residual)
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ residual  # (out, n)
        return grad_x, grad_w, None


class ProjectedLinear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose weight gradient is projected in input mode when a
    projection method attaches `projector_source`, a callable returning the current `Projector`; the bias is not
    projected. Without a source, or without gradients, it is exactly `nn.Linear`."""

    projector_source: Callable[[], Projector] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.projector_source is None or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        projector = self.projector_source()
        if projector.is_identity:
            return F.linear(x, self.weight, self.bias)
        out = _InputProjectedLinear.apply(x, self.weight, projector)
        return out if self.bias is None else out + self.bias


def attach_input_projection(layer: nn.Module, source: Callable[[], Projector] | None) -> bool:
    """Make `layer` project its weight gradient in input mode with `source()` (None detaches); False when the
    layer cannot (not a `ProjectedLinear`), so the caller projects in weight mode after `backward()`."""
    if not isinstance(layer, ProjectedLinear):
        return False
    layer.projector_source = source
    return True


def residual_energy(rows: Tensor, basis: Tensor) -> float:
    """‖x − xOᵀO‖² / ‖x‖²: the share of the activity's energy a projection with O lets through ("leak")."""
    total = rows.pow(2).sum()
    if total == 0:
        return 0.0
    return float(project_rows(rows, basis).pow(2).sum() / total)


def orthonormal_rows(rows: Tensor) -> Tensor:
    """An orthonormal basis [k, n] of the span of `rows` [k, n] (QR of the transpose; signs kept close to rows)."""
    if rows.shape[0] == 0:
        return rows
    q, r = torch.linalg.qr(rows.T)  # q (n, k)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).T.contiguous()
