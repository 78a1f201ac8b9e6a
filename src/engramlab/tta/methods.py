"""Continual test-time adaptation: Source, BN, TENT and CoTTA, one class each on a shared base.

CoTTA: Wang, Fink, Van Gool, Dai, "Continual Test-Time Domain Adaptation", CVPR 2022, arXiv 2203.13591 (official code
qinenergy/cotta). TENT: Wang et al., ICLR 2021, arXiv 2006.10726 (DequanWang/tent). The layout follows
mariodoebler/test-time-adaptation: the base holds the model copy, reset and the optimiser; each method overrides only
its configuration, trained parameters and adapt step. Every method answers `adapt_and_predict(x) -> logits` for one
test batch of images in [0, 1] and never sees a label.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from engramlab.errors import EngramError
from engramlab.tta.augment import augment_views, get_policy
from engramlab.tta.vision import (
    all_weight_bias_parameters,
    bn_affine_parameters,
    configure_for_tta,
    forward_views,
)


class TTAMethod(nn.Module):
    """Shared base: keeps the source weights, (re)builds the adapted model and its optimiser on `reset()`."""

    name = "source"

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.source_state = copy.deepcopy(model.state_dict())
        # channels_last: oneDNN's convolutions run ~1.4x faster in it on a CPU (benchmarks/cotta_speed.py); the
        # weights keep this layout through load_state_dict.
        self.model = model.to(memory_format=torch.channels_last)
        self.lr = lr
        self.optimizer: torch.optim.Optimizer | None = None
        self.reset()

    def configure(self) -> None:
        """Put `self.model` in the method's mode (called by reset, after the source weights are loaded)."""
        self.model.eval()

    def trained_parameters(self) -> list[nn.Parameter]:
        return []

    def reset(self) -> None:
        """Back to the source model and a fresh optimiser (the continual protocol calls this once, at the start)."""
        self.model.load_state_dict(self.source_state, strict=False)
        self.configure()
        params = self.trained_parameters()
        # CIFAR settings of CoTTA and TENT (spec §1.6): Adam, lr 1e-3, betas (0.9, 0.999), no weight decay.
        self.optimizer = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999)) if params else None

    @torch.no_grad()
    def adapt_and_predict(self, x: Tensor) -> Tensor:
        return self.model(x)


class Source(TTAMethod):
    """No adaptation: the source model with its source BN statistics (eval mode)."""

    name = "source"


class BN(TTAMethod):
    """BN statistics adaptation (Schneider et al. 2020; "BN Stats Adapt" in CoTTA Table 2): normalise each test batch
    with its own statistics; no parameter changes."""

    name = "bn"

    def configure(self) -> None:
        configure_for_tta(self.model)


class TENT(TTAMethod):
    """TENT (Wang et al. 2021, §3): minimise the entropy of the predictions by updating the BN affine parameters only;
    batch statistics; continual (never reset within a stream)."""

    name = "tent"

    def configure(self) -> None:
        configure_for_tta(self.model)
        self.model.requires_grad_(False)
        for p in bn_affine_parameters(self.model).values():
            p.requires_grad_(True)

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(bn_affine_parameters(self.model).values())

    def adapt_and_predict(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        entropy.backward()
        self.optimizer.step()
        return logits.detach()  # the official TENT returns the outputs of the forward it adapted on


@dataclass(frozen=True)
class CoTTASettings:
    """CoTTA hyper-parameters (spec §1.2–1.6; defaults = the CIFAR10-C config `cfgs/cifar10/cotta.yaml`)."""

    ema_alpha: float = 0.999  # teacher θ′ ← α·θ′ + (1 − α)·θ
    restore_p: float = 0.01  # stochastic restore probability per weight element
    threshold: float = 0.92  # AP: augment when the anchor's batch-mean max-probability is below it
    n_augmentations: int = 32
    policy: str = "cotta"  # augmentation preset (engramlab.tta.augment.get_policy)
    augment: bool = True  # False = the "no-aug" ablation (teacher's plain prediction always)

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("ema_alpha", self.ema_alpha, 0, 1),
            ("restore_p", self.restore_p, 0, 1),
            ("threshold", self.threshold, 0, 1),
        ):
            if not low <= value <= high:
                raise EngramError(f"CoTTA {name} must be in [{low}, {high}], got {value}.")
        if self.n_augmentations < 1:
            raise EngramError(f"CoTTA n_augmentations must be >= 1, got {self.n_augmentations}.")
        get_policy(self.policy)  # fails early on an unknown preset


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Batch mean of Σ_c −softmax(teacher)_c · log_softmax(student)_c (spec §1.2 step 6, CIFAR form)."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1).mean()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """θ′ ← α·θ′ + (1 − α)·θ over all parameters (spec §1.2 step 8; BN has no running buffers to average)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(alpha).add_(s, alpha=1 - alpha)


@torch.no_grad()
def stochastic_restore_(
    params: dict[str, nn.Parameter], source: dict[str, Tensor], p: float, generator: torch.Generator | None = None
) -> None:
    """Reset each element to its source value with probability p (spec §1.2 step 9), the mask drawn on the
    parameter's device (the official code draws it on the CPU, which is equivalent and slow)."""
    if p <= 0:
        return
    for name, param in params.items():
        mask = torch.rand(param.shape, generator=generator, device=param.device) < p
        param.copy_(torch.where(mask, source[name].to(param.device), param))


class CoTTA(TTAMethod):
    """CoTTA (paper §3, Alg. 1; code order of `forward_and_adapt`): student trained toward an EMA teacher's
    prediction, augmentation-averaged when a frozen anchor is unsure; stochastic restore after every step."""

    name = "cotta"

    def __init__(
        self, model: nn.Module, settings: CoTTASettings = CoTTASettings(), lr: float = 1e-3, seed: int = 0
    ) -> None:
        self.settings = settings
        self.policy = get_policy(settings.policy)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_gate: bool = False  # did the last batch use the augmented target?
        self.last_plain: Tensor | None = None  # the last batch's plain teacher logits (for diagnostics)
        super().__init__(model, lr)

    def configure(self) -> None:
        configure_for_tta(self.model)

    def trained_parameters(self) -> list[nn.Parameter]:
        return list(all_weight_bias_parameters(self.model).values())

    def reset(self) -> None:
        super().reset()
        # Teacher and anchor: copies of the configured model (so the anchor also uses batch statistics, §1.3).
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)
        self.restore_params = all_weight_bias_parameters(self.model)  # what stochastic restore resets, every step
        self.restore_source = {k: v.detach().clone() for k, v in self.restore_params.items()}

    @torch.no_grad()
    def teacher_target(self, x: Tensor) -> Tensor:
        """Steps 2–5: the anchor's confidence gates the augmentation-averaged teacher logits."""
        confidence = self.anchor(x).softmax(1).max(1).values.mean()
        self.last_gate = self.settings.augment and bool(confidence < self.settings.threshold)
        self.last_plain = self.teacher(x)  # the plain teacher prediction (the official CIFAR code computes it always)
        if not self.last_gate:
            return self.last_plain
        n = self.settings.n_augmentations
        views = augment_views(x, n, self.policy, self.generator)  # (N, B, 3, H, W), one vectorised pass
        # Each view normalised with its own batch statistics, as the official loop of N teacher calls does.
        logits = forward_views(self.teacher, views)  # (N, B, classes)
        return logits.mean(0)  # raw logits averaged, as the official code does

    def adapt_and_predict(self, x: Tensor) -> Tensor:
        student_logits = self.model(x)
        target = self.teacher_target(x)
        loss = soft_cross_entropy(student_logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update_(self.teacher, self.model, self.settings.ema_alpha)
        stochastic_restore_(
            self.restore_params,
            self.restore_source,
            self.settings.restore_p,
            self.generator if x.device.type == "cpu" else None,
        )
        return target  # the teacher's prediction made before this step's EMA update (§1.2 step 10)


@torch.no_grad()
def source_confidence_threshold(model: nn.Module, x_source: Tensor, batch_size: int, quantile: float = 0.05) -> float:
    """The gate threshold from source data (the rule CoTTA's supplement is reported to use, spec §1.3): the `quantile`
    of the anchor's batch-mean max-probability over clean source batches of the test batch size, with batch
    statistics as the anchor has them. The gate then fires for a test batch less confident than nearly every
    source batch; no test data is used."""
    anchor = configure_for_tta(copy.deepcopy(model))
    means = torch.stack(
        [anchor(x).softmax(1).max(1).values.mean() for x in x_source.split(batch_size) if len(x) == batch_size]
    )
    return float(means.quantile(quantile))


TTA_METHODS = ("source", "bn", "tent", "cotta", "cotta-no-aug", "cotta-no-restore")


def make_tta_method(
    name: str, model: nn.Module, settings: CoTTASettings = CoTTASettings(), lr: float = 1e-3, seed: int = 0
) -> TTAMethod:
    """Registry: a method by name on (a copy of) `model`; an unknown name gets the list of valid ones."""
    model = copy.deepcopy(model)
    if name == "source":
        return Source(model, lr)
    if name == "bn":
        return BN(model, lr)
    if name == "tent":
        return TENT(model, lr)
    if name == "cotta":
        return CoTTA(model, settings, lr, seed)
    ablations = {"cotta-no-aug": {"augment": False}, "cotta-no-restore": {"restore_p": 0.0}}
    if name in ablations:
        method = CoTTA(model, replace(settings, **ablations[name]), lr, seed)
        method.name = name
        return method
    raise EngramError(f"unknown TTA method {name!r}; choose from {', '.join(TTA_METHODS)}.")
