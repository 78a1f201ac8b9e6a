"""Continual-learning methods compared in HLOP (Xiao et al., ICLR 2024, arXiv 2402.11984, Table 1), one class each.

A method plugs into the one training loop (engramlab.hlop.runner) at four points: `begin_task`, `penalty`
(added to the loss), `after_backward` (edits gradients before the optimiser step, whatever the optimiser) and
`observe` (after the step, sees the minibatch's presynaptic activity), then `end_task`. The network follows the
`ContinualNet` protocol of engramlab.hlop.snn: `protected_layers()`, `presynaptic()`, `record`, `fix_bn()`.

- `baseline`: sequential fine-tuning, BN frozen after task 0 (spec §4 "Baseline").
- `hlop`: Hebbian subspaces + orthogonal projection (spec §1).
- `gpm`: Gradient Projection Memory (Saha et al., ICLR 2021, arXiv 2103.09762): the same projection with bases from an
  SVD of a sample of each task's activity, kept to an energy threshold — HLOP's non-Hebbian counterpart.
- `ewc`: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017, arXiv 1612.00796), diagonal empirical Fisher,
  summed over tasks (one penalty, λ/2·Σ F(θ − θ*)²).
- `multitask`: joint training on every task's data, the upper bound (the runner interleaves the tasks' batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlab.errors import EngramError
from engramlab.hlop.hebbian import HebbianConfig, HebbianSubspace, pmnist_increments, row_schedule
from engramlab.hlop.subspace import (
    Projector,
    activity_rows,
    attach_input_projection,
    layer_input_dim,
    orthonormal_rows,
    project_rows,
    residual_energy,
)


class ContinualMethod:
    """Shared base: does nothing at every hook point (= the sequential baseline)."""

    name = "baseline"
    needs_activity = False  # does `observe` read model.presynaptic()?
    joint = False  # multitask: the runner trains on all tasks at once

    def begin_task(self, task_id: int, model: nn.Module) -> None:
        if task_id > 0:
            model.fix_bn()  # spec §1.3: BN eval mode and frozen after task 0 (also the baseline's setting)

    def penalty(self, model: nn.Module) -> Tensor | None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        pass

    def observe(self, model: nn.Module) -> None:
        pass

    def end_task(self, task_id: int, model: nn.Module, samples: list[tuple[Tensor, Tensor]]) -> None:
        """`samples`: (x, y) of every task seen so far: a small sample of each earlier one, then the current task's
        whole training split."""

    def bases(self) -> list[Tensor] | None:
        """Per protected layer, the protected subspace [k, n] (projection methods only)."""
        return None

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor], model: nn.Module) -> None:
        pass


def project_gradients(model: nn.Module, projectors: list[Projector], input_mode: list[bool]) -> None:
    """Weight-mode projection after `backward()` for every protected layer that did not project in input mode."""
    for i, (layer, projector) in enumerate(zip(model.protected_layers(), projectors, strict=True)):
        if not (i < len(input_mode) and input_mode[i]):
            projector.project_gradient_(layer)


class Baseline(ContinualMethod):
    """Sequential fine-tuning (spec §4 "Baseline")."""


@dataclass
class HLOPSettings:
    """Lateral neurons per layer (spec §1.3): `initial` at task 0, then `increments[t-1]` at task t; Hebbian lr per
    layer. Defaults: the official PMNIST MLP script."""

    initial: list[int] = field(default_factory=lambda: [80, 200, 100])
    increments: list[list[int]] = field(default_factory=pmnist_increments)
    lr: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.01])
    iterations: int = 5
    orthonormalise: bool = True
    # engramlab options (not in the official code); off here, the "mlp" preset sets hebbian_rows = 64:
    hebbian_rows: int | None = None  # learn H from a random subset of this many presynaptic rows per minibatch
    # (None or 0: all rows)
    consolidation_epochs: int = 0  # extra Hebbian-only passes over a task's inputs before its rows are frozen


HLOP_PRESETS = {
    # spec §1.3, PMNIST MLP [fc1 in 784, fc2 in 800, classifier in 800]. Hebbian rows: 64, the spec's batch size, so
    # BPTT (T = 6 spike rows per input) learns H from as many rows per step as DSR/ANN do (their rows are the 64
    # inputs).
    # Measured on the quick preset (10 tasks, LIF/BPTT): 64 rows ACC 86.5 / BWT -2.2, all 384 rows 86.3 / -2.6; the
    # step costs 1.3-1.4x the baseline instead of 1.6-2.1x (README, benchmarks/hlop_step.py).
    "mlp": HLOPSettings(hebbian_rows=64),
    # spec §1.3, CIFAR-100 CNN [conv1 27, conv2 576, conv3 1152 dims]; every CNN layer lr 0.01
    "cnn": HLOPSettings(initial=[6, 100, 200], increments=[[2, 20, 40]], lr=[0.01, 0.01, 0.01]),
}


def _check_layer_count(name: str, values: list, layers: list[nn.Module]) -> None:
    if len(values) != len(layers):
        raise EngramError(f"HLOP {name} has {len(values)} entries but the network has {len(layers)} protected layers.")


class HLOP(ContinualMethod):
    """Hebbian learning based orthogonal projection (spec §1): Hebbian learning of H on every minibatch of every task;
    from task 1 on, gradients projected onto the complement of the frozen rows."""

    name = "hlop"
    needs_activity = True

    def __init__(self, settings: HLOPSettings, seed: int = 2022) -> None:
        self.settings = settings
        self.subspaces: list[HebbianSubspace] = []
        self.input_mode: list[bool] = []  # per protected layer: projected inside backward (input mode)?
        self.generator = torch.Generator().manual_seed(seed)

    def _build(self, model: nn.Module) -> None:
        layers = model.protected_layers()
        for key in ("initial", "lr"):
            _check_layer_count(key, getattr(self.settings, key), layers)
        device = layers[0].weight.device
        self.subspaces = [
            HebbianSubspace(
                layer_input_dim(layer), HebbianConfig(lr, self.settings.iterations, self.settings.orthonormalise)
            ).to(device)
            for layer, lr in zip(layers, self.settings.lr, strict=True)
        ]
        # Linear layers project in input mode inside backward; the rest in weight mode after it (subspace module).
        self.input_mode = [
            attach_input_projection(layer, subspace.frozen_projector)
            for layer, subspace in zip(layers, self.subspaces, strict=True)
        ]

    def begin_task(self, task_id: int, model: nn.Module) -> None:
        super().begin_task(task_id, model)
        if not self.subspaces:
            self._build(model)
        counts = row_schedule(self.settings.initial, self.settings.increments, task_id)
        _check_layer_count("increments", counts, self.subspaces)
        for subspace, k in zip(self.subspaces, counts, strict=True):
            subspace.add_rows(k, self.generator)

    def after_backward(self, model: nn.Module) -> None:
        project_gradients(model, [s.frozen_projector() for s in self.subspaces], self.input_mode)

    def observe(self, model: nn.Module) -> None:
        self._learn(model, model.presynaptic())

    def _learn(self, model: nn.Module, activities: list[Tensor]) -> None:
        """One minibatch of the subspace rule in every layer (spec §1.2)."""
        for layer, subspace, activity in zip(model.protected_layers(), self.subspaces, activities, strict=True):
            rows = activity_rows(layer, activity)
            residual = subspace.frozen_projector().recall(rows)  # projected in this step's backward, if it was
            limit = self.settings.hebbian_rows
            if limit and rows.shape[0] > limit:
                keep = torch.randperm(rows.shape[0], generator=self.generator)[:limit].to(rows.device)
                rows, residual = rows[keep], None if residual is None else residual[keep]
            subspace.update(rows, residual)

    def end_task(self, task_id: int, model: nn.Module, samples: list[tuple[Tensor, Tensor]]) -> None:
        x, _ = samples[-1]
        for _ in range(self.settings.consolidation_epochs):
            for batch in x[torch.randperm(len(x), generator=self.generator)].split(64):
                self._learn(model, record_activity(model, batch, task_id))
        for subspace in self.subspaces:
            subspace.freeze()

    def bases(self) -> list[Tensor]:
        return [s.frozen_basis() for s in self.subspaces]

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"generator": self.generator.get_state()}
        for i, s in enumerate(self.subspaces):
            out |= {f"{i}.weight": s.weight, f"{i}.momentum": s.momentum, f"{i}.n_frozen": s.n_frozen_buffer}
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], model: nn.Module) -> None:
        if not self.subspaces:
            self._build(model)
        self.generator.set_state(tensors["generator"])
        for i, s in enumerate(self.subspaces):
            s.weight, s.momentum = tensors[f"{i}.weight"].clone(), tensors[f"{i}.momentum"].clone()
            s.n_frozen_buffer.copy_(tensors[f"{i}.n_frozen"])


class GPM(ContinualMethod):
    """Gradient Projection Memory (Saha et al. 2021, §4, Eq. 8–10): after each task, an SVD of a sample of every
    protected layer's activity; add the leading new directions until the basis captures `threshold` of the
    activity's energy; later gradients are projected onto the complement of the basis."""

    name = "gpm"
    needs_activity = False

    def __init__(self, threshold: float = 0.97, n_samples: int = 300, max_rows: int = 4096) -> None:
        if not 0 < threshold < 1:
            raise EngramError(f"--gpm-threshold must be in (0, 1), got {threshold}.")
        self.threshold = threshold
        self.n_samples = n_samples  # task inputs whose activity forms the representation matrix (GPM: 300 on PMNIST)
        self.max_rows = max_rows  # cap on activity rows per layer fed to the SVD (conv patches are many)
        self.basis: list[Tensor] = []
        self.projectors: list[Projector] = []
        self.input_mode: list[bool] = []  # per protected layer: projected inside backward (input mode)?

    def begin_task(self, task_id: int, model: nn.Module) -> None:
        super().begin_task(task_id, model)
        if not self.projectors:  # task 0: empty bases, nothing projected yet
            self.projectors = [
                Projector(torch.zeros(0, layer_input_dim(layer), device=layer.weight.device))
                for layer in model.protected_layers()
            ]
        self.input_mode = [
            attach_input_projection(layer, lambda i=i: self.projectors[i])
            for i, layer in enumerate(model.protected_layers())
        ]

    def after_backward(self, model: nn.Module) -> None:
        project_gradients(model, self.projectors, self.input_mode)

    @torch.no_grad()
    def end_task(self, task_id: int, model: nn.Module, samples: list[tuple[Tensor, Tensor]]) -> None:
        layers = model.protected_layers()
        x, _ = samples[-1]
        activities = record_activity(model, x[: self.n_samples], task_id)
        if not self.basis:
            self.basis = [torch.zeros(0, layer_input_dim(layer), device=layer.weight.device) for layer in layers]
        for i, (layer, activity) in enumerate(zip(layers, activities, strict=True)):
            rows = activity_rows(layer, activity)[: self.max_rows]  # (R, n)
            self.basis[i] = extend_basis(self.basis[i], rows, self.threshold)
        self.projectors = [Projector(b) for b in self.basis]

    def bases(self) -> list[Tensor]:
        return self.basis

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"{i}": b for i, b in enumerate(self.basis)}

    def load_state_tensors(self, tensors: dict[str, Tensor], model: nn.Module) -> None:
        self.basis = [tensors[str(i)].clone() for i in range(len(tensors))]
        self.projectors = [Projector(b) for b in self.basis]


def extend_basis(basis: Tensor, rows: Tensor, threshold: float) -> Tensor:
    """GPM's basis update (Saha et al. 2021, Eq. 9–10): keep the fewest new left-singular directions of the residual
    activity such that (energy already in the basis + energy of the kept directions) ≥ threshold·total."""
    total = rows.pow(2).sum()
    if total == 0:
        return basis
    residual = project_rows(rows, basis)  # (R, n)
    captured = total - residual.pow(2).sum()
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)  # vh (r, n): directions in input space
    energy = captured + torch.cumsum(s.pow(2), 0)
    k = int((energy < threshold * total).sum()) + 1 if captured < threshold * total else 0
    k = min(k, basis.shape[1] - basis.shape[0])
    if k <= 0:
        return basis
    return orthonormal_rows(torch.cat([basis, vh[:k]]))


class EWC(ContinualMethod):
    """Elastic Weight Consolidation: after each task, the diagonal empirical Fisher F (mean squared per-sample
    gradient of the log-likelihood of the true label) is added to the running sum; later tasks pay
    λ/2·Σ F·(θ − θ*)² with θ* the weights at the end of the last task."""

    name = "ewc"

    def __init__(self, lam: float = 100.0, fisher_samples: int = 200) -> None:
        # λ = 100: with plain SGD the penalty's step is stable while λ·max(F)·lr < 2; on the PMNIST spiking MLP
        # max(F) ≈ 0.08 and lr = 0.1, so λ = 1000 diverged (ACC 10%) while 10 and 100 trained (3-task check).
        if lam < 0:
            raise EngramError(f"--ewc-lambda must be >= 0, got {lam}.")
        self.lam = lam
        self.fisher_samples = fisher_samples
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self, model: nn.Module) -> Tensor | None:
        if not self.fisher:
            return None
        terms = [
            (self.fisher[n] * (p - self.anchor[n]).pow(2)).sum()
            for n, p in model.named_parameters()
            if n in self.fisher
        ]
        return 0.5 * self.lam * torch.stack(terms).sum()

    def end_task(self, task_id: int, model: nn.Module, samples: list[tuple[Tensor, Tensor]]) -> None:
        x, y = samples[-1]
        x, y = x[: self.fisher_samples], y[: self.fisher_samples]
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = model.training
        model.eval()
        # One sample per backward: the empirical Fisher needs per-sample gradients; torch.func's vmap does not pass
        # through the spiking neurons' custom autograd functions, and 200 small backwards take about a second.
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            logits = model(x[i : i + 1], task=task_id)
            F.cross_entropy(logits, y[i : i + 1]).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().pow(2) / x.shape[0]
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for n, f in fisher.items():
            self.fisher[n] = self.fisher.get(n, torch.zeros_like(f)) + f
            self.anchor[n] = params[n].detach().clone()

    def state_tensors(self) -> dict[str, Tensor]:
        return {f"fisher.{n}": f for n, f in self.fisher.items()} | {f"anchor.{n}": a for n, a in self.anchor.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], model: nn.Module) -> None:
        self.fisher = {k[len("fisher.") :]: v.clone() for k, v in tensors.items() if k.startswith("fisher.")}
        self.anchor = {k[len("anchor.") :]: v.clone() for k, v in tensors.items() if k.startswith("anchor.")}


class Multitask(ContinualMethod):
    """Joint training on all tasks (upper bound); the runner interleaves every task's minibatches."""

    name = "multitask"
    joint = True

    def begin_task(self, task_id: int, model: nn.Module) -> None:
        pass


@torch.no_grad()
def record_activity(model: nn.Module, x: Tensor, task_id: int) -> list[Tensor]:
    """Presynaptic activity of every protected layer for inputs x (eval mode, no gradients)."""
    was_training, was_recording = model.training, model.record
    model.eval()
    model.record = True
    try:
        model(x, task=task_id)
        return [a.detach() for a in model.presynaptic()]
    finally:
        model.record = was_recording
        model.train(was_training)


def subspace_leak(model: nn.Module, bases: list[Tensor], samples: list[tuple[Tensor, Tensor]]) -> list[dict]:
    """Per protected layer and task seen so far: the share of that task's activity energy the projection lets through
    (‖x − xOᵀO‖²/‖x‖², issue 9's "leak"; 1 − leak = captured energy) and the basis size."""
    rows = []
    for task_id, (x, _) in enumerate(samples):
        activities = record_activity(model, x, task_id)
        for layer_idx, (layer, activity, basis) in enumerate(
            zip(model.protected_layers(), activities, bases, strict=True)
        ):
            rows.append(
                {
                    "layer": layer_idx,
                    "task": task_id,
                    "basis_rows": int(basis.shape[0]),
                    "leak": residual_energy(activity_rows(layer, activity), basis),
                }
            )
    return rows


METHODS = ("baseline", "hlop", "gpm", "ewc", "multitask")


def make_method(
    name: str,
    *,
    hlop: HLOPSettings | None = None,
    gpm_threshold: float = 0.97,
    ewc_lambda: float = 100.0,
    seed: int = 2022,
) -> ContinualMethod:
    """The method registry: an unknown name gets an error listing the valid ones."""
    if name == "baseline":
        return Baseline()
    if name == "hlop":
        return HLOP(hlop or HLOPSettings(), seed=seed)
    if name == "gpm":
        return GPM(gpm_threshold)
    if name == "ewc":
        return EWC(ewc_lambda)
    if name == "multitask":
        return Multitask()
    raise EngramError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
