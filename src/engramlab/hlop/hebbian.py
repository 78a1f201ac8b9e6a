"""HLOP: Hebbian learning of principal subspaces, per layer (Xiao et al., ICLR 2024, arXiv 2402.11984).

Each protected layer gets lateral neurons with weights H [k, n] (spec §1.1: y = Hx forward, −Hᵀ back). They learn
with Oja's subspace rule (§1.2, paper Eq. 5):

    Y = X Hᵀ,  X̂ = Y H,  ΔH = Yᵀ(X − X̂) / B          (Hebbian y xᵀ, anti-Hebbian −y yᵀH)

clamped to [−10, 10], smoothed by momentum M ← 0.9·M + 0.1·ΔH, H ← H + lr·M, 5 iterations per minibatch. Rows come
in blocks, one per task; after a task all rows are frozen and the next task adds new ones (§1.3). Weight updates of
later tasks are projected onto the complement of the frozen rows' span (engramlab.hlop.subspace).

Two documented departures from the literal official module, both switchable:
- `orthonormalise=True` (default): new rows start orthogonal to the frozen ones, and frozen rows are re-orthonormalised
  by QR when a task ends. The literal rule lets H drift away from orthonormal (‖HHᵀ − I‖ 13–18 measured on PMNIST),
  so HᵀH stops being a projector and 20–38% of old-task activity leaks through after ten tasks (issue 9).
  `orthonormalise=False` reproduces the official behaviour.
- Only the new rows are updated, with the frozen rows' reconstruction computed once per minibatch. The official
  module computes the update for all rows and then zeroes the frozen ones; the result is identical (frozen rows never
  change within a task) at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engramlab.hlop.subspace import Projector, orthonormal_rows

CLIP = 10.0  # official hlop_module.py: ΔH clamped elementwise to [−10, 10]
MOMENTUM = 0.9  # official: M ← 0.9·M + 0.1·ΔH


@dataclass(frozen=True)
class HebbianConfig:
    """Hyper-parameters of one layer's subspace rule (spec §1.2; defaults = the official script)."""

    lr: float = 0.01  # PMNIST first layer (784-dim input): 0.001
    iterations: int = 5  # Hebbian iterations on each training minibatch
    orthonormalise: bool = True  # engramlab's fix, see the module docstring


class HebbianSubspace(nn.Module):
    """The lateral weights H [k, n] of one layer, its momentum, and how many leading rows are frozen.

    State is registered as buffers so that `state_dict()` saves and restores it (safetensors-friendly tensors).
    """

    def __init__(self, dim: int, config: HebbianConfig = HebbianConfig()) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("weight", torch.zeros(0, dim))
        self.register_buffer("momentum", torch.zeros(0, dim))
        self.register_buffer("n_frozen_buffer", torch.zeros((), dtype=torch.long))
        self._projector: tuple[tuple, Projector] | None = None  # cached for the current frozen rows

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def n_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def n_frozen(self) -> int:
        return int(self.n_frozen_buffer)

    def frozen_basis(self) -> Tensor:
        """The rows of earlier tasks [k_old, n]: the subspace the gradient projection protects (spec §1.2 "block 0")."""
        return self.weight[: self.n_frozen]

    def frozen_projector(self) -> Projector:
        """x ↦ x − (xH_oldᵀ)H_old for the frozen rows, built once per set of frozen rows (they change only when a
        task ends or a state is loaded)."""
        key = (self.n_frozen, self.weight.data_ptr(), self.weight.shape)
        if self._projector is None or self._projector[0] != key:
            self._projector = (key, Projector(self.frozen_basis()))
        return self._projector[1]

    def add_rows(self, k: int, generator: torch.Generator | None = None) -> None:
        """Append k new lateral neurons, orthonormal among themselves (official: orthogonal init of the new block);
        with `orthonormalise`, also orthogonal to the frozen rows. k is capped so that rows never exceed n."""
        k = min(k, self.dim - self.n_rows) if self.config.orthonormalise else k
        if k <= 0:
            return
        init = torch.randn(k, self.dim, generator=generator, dtype=self.weight.dtype, device="cpu")
        init = init.to(self.weight.device)
        if self.config.orthonormalise and self.n_rows:
            init = init - (init @ self.weight.T) @ self.weight
        new = orthonormal_rows(init)
        self.weight = torch.cat([self.weight, new])
        self.momentum = torch.cat([self.momentum, torch.zeros_like(new)])

    def freeze(self) -> None:
        """End of a task (official `merge_hlop_subspace`): every row becomes old and stops learning; with
        `orthonormalise`, the rows are replaced by an orthonormal basis of their span (QR)."""
        if self.config.orthonormalise:
            self.weight = orthonormal_rows(self.weight)
        self.n_frozen_buffer.fill_(self.n_rows)

    @torch.no_grad()
    def update(self, rows: Tensor, residual: Tensor | None = None) -> None:
        """Run the subspace rule `iterations` times on one minibatch of presynaptic rows X [B, n] (spec §1.2).

        `residual`: X − (XH_oldᵀ)H_old when the caller has it already (the input-mode gradient projection computed
        it in backward); otherwise it is computed here.
        """
        n_old = self.n_frozen
        if self.n_rows == n_old or rows.shape[0] == 0:
            return
        x = rows.to(self.weight.dtype)
        new = self.weight[n_old:]
        # The frozen rows' part of X̂ is the same in every iteration: X − Y_old·H_old, computed once.
        if residual is None:
            residual = self.frozen_projector()(x)  # (B, n)
        momentum = self.momentum[n_old:]
        batch = x.shape[0]
        for _ in range(self.config.iterations):
            y_new = x @ new.T  # (B, k_new)
            delta = y_new.T @ (residual - y_new @ new) / batch  # (k_new, n): ΔH rows of the new block
            delta.clamp_(-CLIP, CLIP)
            momentum.mul_(MOMENTUM).add_(delta, alpha=1 - MOMENTUM)
            new.add_(momentum, alpha=self.config.lr)

    def orthonormality_error(self) -> float:
        """‖HHᵀ − I‖_F over all rows (0 for an orthonormal H)."""
        gram = self.weight @ self.weight.T
        return float(torch.linalg.matrix_norm(gram - torch.eye(self.n_rows, device=gram.device)))


def row_schedule(initial: list[int], increments: list[list[int]], task: int) -> list[int]:
    """Lateral neurons to add per layer at the start of `task` (task 0: `initial`; later: `increments[task-1]`,
    the last entry repeating)."""
    if task == 0:
        return list(initial)
    return list(increments[min(task - 1, len(increments) - 1)])


def pmnist_increments(n_tasks: int = 10, n_layers: int = 3) -> list[list[int]]:
    """The official PMNIST schedule (spec §1.3): 70 new rows per layer at tasks 1–2, 50 at 3–5, 30 at 6–8, 10 at 9:
    the increment drops by 20 whenever task_id % 3 == 0."""
    out, k = [], 70
    for task in range(1, n_tasks):
        if task % 3 == 0:
            k = max(k - 20, 10)
        out.append([k] * n_layers)
    return out
