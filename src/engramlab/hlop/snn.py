"""Spiking networks for HLOP: Xiao et al., "Hebbian Learning based Orthogonal Projection for Continual Learning of
Spiking Neural Networks", ICLR 2024, arXiv 2402.11984 (spec §2; official code pkuxmq/HLOP-SNN).

Two neurons and two networks, each network in three modes that share one forward:

- ``"lif"``: BPTT with a surrogate gradient (`LIFNode`, spec §2 "BPTT"), output = mean over time, T = 6.
- ``"dsr"``: Differentiation on Spike Representation (`DSRNeuron`, spec §2 "DSR", the paper's default), output =
  weighted firing rate, T = 20.
- ``"ann"``: ReLU instead of spikes, T = 1, so that the same network can be compared with a plain ANN.

Layout: a neuron maps a multi-step input ``[T, N, *]`` to ``[T, N, *]`` (time first, as spikingjelly's step mode
'm'); linear and conv layers see time folded into the batch, ``[T*N, *]``, row ``t*N + n``. Static images are fed
directly (the same real-valued input at every step, no Poisson coding), so the first weight layer runs once on the
``N`` unique rows and its output is repeated over T; this equals the official code's running it on T copies. The
last linear layer is likewise applied to the time-average of its input (mean for BPTT, weighted firing rate for DSR):
it is linear and the averaging weights sum to 1, so this equals averaging its per-step outputs, as the paper does.

The neurons keep no state between calls (the membrane starts at 0 in every forward), so there is no ``reset`` to
forget. Both are written in plain torch: spikingjelly's declared dependencies pull torchvision, torchaudio and a
CUDA torch, so engramlab cannot depend on it at run time; tests/test_snn.py checks both neurons against it.

Networks implement the protocol the continual-learning methods use (HLOP, GPM, EWC): ``forward(x, task)``,
``protected_layers()``, ``presynaptic()`` (recorded only while ``record`` is True) and ``fix_bn()``.
"""

from __future__ import annotations

import itertools
import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engramlab.errors import EngramError
from engramlab.hlop.subspace import ProjectedLinear

NEURONS = ("lif", "dsr", "ann")
DEFAULT_TIMESTEPS = {"lif": 6, "dsr": 20, "ann": 1}  # spec §3: T = 6 (BPTT), 20 (DSR); an ANN has one step


# --- BPTT: LIF neuron with a sigmoid surrogate gradient (spec §2 "BPTT with surrogate gradient") ---


class SigmoidSurrogate(torch.autograd.Function):
    """Heaviside step forward, sigmoid derivative backward: ds/dx = alpha * sig(alpha x) * (1 - sig(alpha x)).

    Same as spikingjelly's ``surrogate.Sigmoid(alpha)``; spike = 1 where x >= 0 (x = v - v_th).
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spike: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * x)
        return grad_spike * ctx.alpha * sig * (1.0 - sig), None


class LIFNode(nn.Module):
    r"""Multi-step LIF neuron for BPTT, spec §2 (spikingjelly ``LIFNode`` with decay_input=False, soft reset).

    Charge :math:`h_t = v_{t-1}(1 - 1/\tau) + I_t`; fire :math:`s_t = \Theta(h_t - V_{th})`; soft reset with the
    spike detached from the graph :math:`v_t = h_t - \mathrm{sg}(s_t) V_{th}`; :math:`v_0 = 0`. The backward of
    :math:`\Theta` is the sigmoid surrogate (`SigmoidSurrogate`, alpha = 4).

    Input ``[T, N, *]`` currents, output ``[T, N, *]`` binary spikes.
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, surrogate_alpha: float = 4.0):
        super().__init__()
        if tau <= 1.0:
            raise EngramError(f"LIFNode: tau must be > 1 (the membrane decays by 1 - 1/tau per step), got {tau}.")
        self.tau, self.v_threshold, self.surrogate_alpha = tau, v_threshold, surrogate_alpha

    def forward(self, x_seq: Tensor) -> Tensor:
        v = torch.zeros_like(x_seq[0])  # [N, *]
        spikes = []
        for x in x_seq:  # x: [N, *]
            h = v - v / self.tau + x  # = v(1 - 1/tau) + I, written as spikingjelly does so rounding matches
            s = SigmoidSurrogate.apply(h - self.v_threshold, self.surrogate_alpha)
            v = h - s.detach() * self.v_threshold  # detached soft reset
            spikes.append(s)
        return torch.stack(spikes)  # [T, N, *]

    def extra_repr(self) -> str:
        return f"tau={self.tau}, v_threshold={self.v_threshold}, surrogate_alpha={self.surrogate_alpha}"


# --- DSR: LIF with a differentiable spike representation (spec §2 "DSR"; official modules/neuron_dsr.py) ---


def weighted_rate(x_seq: Tensor, tau: float = 1.0, dt: float = 0.05) -> Tensor:
    r"""Weighted firing rate of DSR (spec §1.4, §2): :math:`\sum_i w_i x_i / \sum_i w_i` with
    :math:`w_i = \exp(-(T\Delta t - i\Delta t)/\tau)`, i = 1..T, so later steps weigh more. ``[T, N, *] -> [N, *]``."""
    T = x_seq.shape[0]
    steps = torch.arange(1, T + 1, dtype=torch.float64)
    w = torch.exp(-(T * dt - steps * dt) / tau)
    w = (w / w.sum()).to(dtype=x_seq.dtype, device=x_seq.device)  # [T]
    return torch.tensordot(w, x_seq, dims=1)  # [N, *]


class DSRFunction(torch.autograd.Function):
    """Forward: discrete LIF spikes; backward: the DSR gradient of the weighted firing rate (spec §2).

    Backward, as the official ``LIFFunction``: with r = weighted rate of the input current and g = T * weighted rate
    of the output gradient, the input gets g / tau where 0 < r < Vth * tau / dt and 0 elsewhere, spread evenly over
    the T steps (divided by T); the threshold gets dt * sum(g) over the saturated region r > Vth * tau / dt.
    """

    @staticmethod
    def forward(ctx, x_seq: Tensor, v_threshold: Tensor, tau: float, dt: float, alpha: float) -> Tensor:
        beta = math.exp(-dt / tau)
        u = torch.zeros_like(x_seq[0])  # [N, *]
        spikes = []
        for x in x_seq:  # x: [N, *]
            u = beta * u + (1 - beta) * x
            s = (u >= alpha * v_threshold).to(x.dtype) * v_threshold  # a spike carries Vth
            u = u - s  # subtract Vth
            spikes.append(s / dt)  # output value Vth / dt per spike
        ctx.save_for_backward(x_seq)
        # a copy, not the parameter: DSRNeuron clamps the parameter in place at the next forward
        ctx.v_threshold, ctx.tau, ctx.dt = v_threshold.detach().clone(), tau, dt
        return torch.stack(spikes)  # [T, N, *]

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor | None, None, None, None]:
        (x_seq,) = ctx.saved_tensors
        T, v_threshold, tau, dt = x_seq.shape[0], ctx.v_threshold, ctx.tau, ctx.dt
        rate_in = weighted_rate(x_seq, tau, dt)  # [N, *]
        g = weighted_rate(grad_out, tau, dt) * T  # [N, *]
        upper = v_threshold * tau / dt
        passing = (rate_in > 0) & (rate_in < upper)
        grad_in = torch.where(passing, g / tau, torch.zeros_like(g)) / T  # [N, *], the same at every step
        grad_in = grad_in.unsqueeze(0).expand_as(x_seq)  # [T, N, *]
        grad_vth = (g * (rate_in > upper)).sum() * dt if ctx.needs_input_grad[1] else None
        return grad_in, grad_vth, None, None, None


class DSRNeuron(nn.Module):
    r"""LIF neuron trained by DSR, the paper's default method (spec §2; Meng et al., CVPR 2022, arXiv 2205.00459).

    :math:`u_t = \beta u_{t-1} + (1-\beta) I_t`, :math:`\beta = e^{-\Delta t/\tau}`; a spike when
    :math:`u_t \ge \alpha V_{th}`, then :math:`u_t \leftarrow u_t - V_{th}`; each spike outputs :math:`V_{th}/\Delta t`.
    Defaults are the official script's: dt 0.05, tau 1.0, alpha 0.3, Vth 0.3 (trainable), Vth >= 5e-4.

    Input ``[T, N, *]`` currents, output ``[T, N, *]`` spike values (0 or Vth/dt). Choices where the brief or the
    spec leave room, all following the official code:

    - the spike train, not its rate, goes to the next layer, which therefore sees a time-varying input; the rate is
      taken only for the network output (`weighted_rate` after the last linear layer) and for Hebbian learning;
    - the threshold is clamped in place to >= ``v_threshold_bound`` before every forward (the parameter itself
      stays in range, as ``Vth.copy_(relu(Vth - bound) + bound)`` does officially);
    - the backward is `DSRFunction`'s (no surrogate of the step function).
    """

    def __init__(
        self,
        v_threshold: float = 0.3,
        tau: float = 1.0,
        dt: float = 0.05,
        alpha: float = 0.3,
        v_threshold_bound: float = 5e-4,
        train_threshold: bool = True,
    ):
        super().__init__()
        if v_threshold < v_threshold_bound:
            raise EngramError(f"DSRNeuron: v_threshold {v_threshold} is below v_threshold_bound {v_threshold_bound}.")
        self.v_threshold = nn.Parameter(torch.tensor(float(v_threshold)), requires_grad=train_threshold)
        self.tau, self.dt, self.alpha, self.v_threshold_bound = tau, dt, alpha, v_threshold_bound

    def forward(self, x_seq: Tensor) -> Tensor:
        with torch.no_grad():
            self.v_threshold.clamp_(min=self.v_threshold_bound)
        return DSRFunction.apply(x_seq, self.v_threshold, self.tau, self.dt, self.alpha)

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold.item():.4g}, tau={self.tau}, dt={self.dt}, alpha={self.alpha}, "
            f"v_threshold_bound={self.v_threshold_bound}"
        )


class ReLUNode(nn.Module):
    """ANN mode: ReLU in place of the spiking neuron (any shape, typically ``[1, N, *]``)."""

    def forward(self, x_seq: Tensor) -> Tensor:
        return F.relu(x_seq)


def make_neuron(neuron: str) -> nn.Module:
    """The neuron module for a mode name in `NEURONS`, with the paper's defaults."""
    return {"lif": LIFNode, "dsr": DSRNeuron, "ann": ReLUNode}[neuron]()


# --- Networks (spec §2 "Architectures") ---


@runtime_checkable
class ContinualNet(Protocol):
    """What the continual-learning methods (HLOP, GPM, EWC) need from a network; `SpikingNet` implements it."""

    record: bool  # store presynaptic activity in the next forwards

    def __call__(self, x: Tensor, task: int | None = None) -> Tensor: ...  # logits [B, n_classes]

    def protected_layers(self) -> list[nn.Linear | nn.Conv2d]: ...  # weight layers to protect, input to output

    def presynaptic(self) -> list[Tensor]: ...  # per protected layer, the last forward's detached activity

    def fix_bn(self) -> None: ...  # spec §1.3, tasks >= 1


class SpikingNet(nn.Module):
    """Shared machinery of the spiking networks: mode and T, readout over time, presynaptic recording, fix_bn.

    Set ``record = True`` and every forward stores, per protected layer, the detached activity that Hebbian learning
    and GPM use (spec §1.4): BPTT the layer input at every step, ``[T*N, ...]`` with row ``t*N + n`` (binary spikes
    for the MLP's hidden layers; average-pooled spikes for the CNN's conv2/conv3), except the first layer, whose input
    is the same at every step, ``[N, ...]``; DSR the weighted firing rate ``[N, ...]``; ANN the layer input
    ``[N, ...]``. Linear layers get 2-D ``[rows, in_features]``, conv layers their raw 4-D input.
    """

    def __init__(self, neuron: str, timesteps: int | None):
        super().__init__()
        if neuron not in NEURONS:
            raise EngramError(f"neuron must be one of {', '.join(NEURONS)}; got {neuron!r}.")
        if timesteps is None:
            timesteps = DEFAULT_TIMESTEPS[neuron]
        if timesteps < 1 or (neuron == "ann" and timesteps != 1):
            raise EngramError(
                f"timesteps must be >= 1 (exactly 1 for neuron='ann'); got {timesteps} for neuron={neuron!r}."
            )
        self.neuron, self.timesteps = neuron, timesteps
        self.record = False
        self._presynaptic: list[Tensor] | None = None
        self._bn_fixed = False

    def protected_layers(self) -> list[nn.Linear | nn.Conv2d]:
        raise NotImplementedError

    def presynaptic(self) -> list[Tensor]:
        """Per protected layer, the activity recorded in the last forward (see the class docstring)."""
        if self._presynaptic is None:
            raise EngramError("presynaptic(): the last forward did not record; set net.record = True before it.")
        return list(self._presynaptic)

    def fix_bn(self) -> None:
        """Spec §1.3, tasks >= 1: BN in eval mode with affine frozen, DSR thresholds frozen.

        Sticky: a later ``train()`` keeps BN in eval mode.
        """
        self._bn_fixed = True
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
            elif isinstance(m, DSRNeuron):
                m.v_threshold.requires_grad_(False)

    def train(self, mode: bool = True) -> SpikingNet:
        super().train(mode)
        if self._bn_fixed:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def _start_recording(self) -> list[Tensor] | None:
        self._presynaptic = [] if self.record else None
        return self._presynaptic

    def _repeat(self, h: Tensor) -> Tensor:
        """The first layer's output, computed once, repeated over time: ``[N, *] -> [T, N, *]``."""
        return h.unsqueeze(0).expand(self.timesteps, *h.shape)

    def _rate(self, seq: Tensor) -> Tensor:
        """Readout over time, ``[T, N, *] -> [N, *]``: weighted firing rate (DSR) or mean (BPTT, ANN with T = 1)."""
        return weighted_rate(seq) if self.neuron == "dsr" else seq.mean(0)

    def _presyn(self, seq: Tensor) -> Tensor:
        """What Hebbian learning sees of a per-step layer input ``[T, N, *]``: DSR rate ``[N, *]``, else
        ``[T*N, *]``."""
        with torch.no_grad():
            return weighted_rate(seq.detach()) if self.neuron == "dsr" else seq.detach().flatten(0, 1)


class SpikingMLP(SpikingNet):
    """PMNIST MLP, spec §2: 784-800-800-10, no biases, a neuron after every hidden layer, one shared head.

    Domain-incremental: every task uses the same head, so ``task`` is ignored. Protected layers: every linear
    layer, classifier included. Input ``[B, 784]`` or anything with 784 features per row (``[B, 1, 28, 28]``).
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 800, 800, 10), neuron: str = "dsr", timesteps: int | None = None):
        super().__init__(neuron, timesteps)
        if len(sizes) < 3:
            raise EngramError(f"SpikingMLP: sizes needs input, at least one hidden and output size; got {sizes}.")
        self.sizes = tuple(sizes)
        self.fc = nn.ModuleList(ProjectedLinear(a, b, bias=False) for a, b in itertools.pairwise(sizes[:-1]))
        self.sn = nn.ModuleList(make_neuron(neuron) for _ in self.fc)
        self.classifier = ProjectedLinear(sizes[-2], sizes[-1], bias=False)

    def protected_layers(self) -> list[nn.Linear | nn.Conv2d]:
        return [*self.fc, self.classifier]

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        if x.ndim < 2 or x[0].numel() != self.sizes[0]:
            raise EngramError(
                f"SpikingMLP.forward: x must be [batch, {self.sizes[0]}] (or [batch, ...] with "
                f"{self.sizes[0]} values per row); got shape {tuple(x.shape)}."
            )
        rec = self._start_recording()
        T, B = self.timesteps, x.shape[0]
        x = x.reshape(B, -1)  # [B, D]
        if rec is not None:
            rec.append(x.detach())  # the same input at every step: B unique rows
        s = self.sn[0](self._repeat(self.fc[0](x)))  # [T, B, H1]
        for fc, sn in zip(self.fc[1:], self.sn[1:], strict=True):
            if rec is not None:
                rec.append(self._presyn(s))
            h = fc(s.flatten(0, 1))  # [T*B, H]: time folded into the batch
            s = sn(h.view(T, B, -1))  # [T, B, H]
        if rec is not None:
            rec.append(self._presyn(s))
        return self.classifier(self._rate(s))  # [B, C] = time-average of the per-step logits


class SpikingCNN(SpikingNet):
    """10-split CIFAR-100 CNN, spec §2: (conv3x3-BN-neuron-AvgPool2) with 64, 128, 256 channels, then one linear head
    per task on the 4096 flattened features (task-incremental, ``forward(x, task)``).

    Convs have no bias, kaiming-normal (fan_out) init; heads N(0, 0.01) with a zero bias, as the official ``CNN``
    (its optimiser drops 1-D parameters for tasks >= 1, so only head 0's bias ever trains). BN statistics are taken
    over all T*B rows. Protected layers: the three convs (the heads are per task). Input ``[B, 3, 32, 32]``.
    """

    channels = (64, 128, 256)

    def __init__(self, n_tasks: int, classes_per_task: int = 10, neuron: str = "dsr", timesteps: int | None = None):
        super().__init__(neuron, timesteps)
        if n_tasks < 1 or classes_per_task < 1:
            raise EngramError(
                f"SpikingCNN: n_tasks and classes_per_task must be >= 1; got {n_tasks}, {classes_per_task}."
            )
        ins = (3, *self.channels[:-1])
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip(ins, self.channels, strict=True)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in self.channels)
        self.sn = nn.ModuleList(make_neuron(neuron) for _ in self.channels)
        self.heads = nn.ModuleList(nn.Linear(self.channels[-1] * 4 * 4, classes_per_task) for _ in range(n_tasks))
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        for head in self.heads:
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)

    def protected_layers(self) -> list[nn.Linear | nn.Conv2d]:
        return list(self.convs)

    def forward(self, x: Tensor, task: int | None = None) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise EngramError(f"SpikingCNN.forward: x must be [batch, 3, 32, 32]; got shape {tuple(x.shape)}.")
        if task is None or not 0 <= task < len(self.heads):
            raise EngramError(
                f"SpikingCNN.forward: task must be an int in 0..{len(self.heads) - 1} "
                f"(one head per task); got {task!r}."
            )
        rec = self._start_recording()
        T, B = self.timesteps, x.shape[0]
        if rec is not None:
            rec.append(x.detach())  # the same image at every step: B unique rows
        h = self._repeat(self.convs[0](x)).flatten(0, 1)  # [T*B, 64, 32, 32]
        for i, (bn, sn) in enumerate(zip(self.bns, self.sn, strict=True)):
            h = bn(h)  # [T*B, C, H, W]
            s = sn(h.view(T, B, *h.shape[1:]))  # [T, B, C, H, W]
            p = F.avg_pool2d(s.flatten(0, 1), 2)  # [T*B, C, H/2, W/2]
            if i + 1 < len(self.convs):
                if rec is not None:
                    rec.append(self._presyn(p.view(T, B, *p.shape[1:])))
                h = self.convs[i + 1](p)  # [T*B, C', H/2, W/2]
        features = self._rate(p.view(T, B, -1))  # [B, 4096]
        return self.heads[task](features)  # [B, classes_per_task]
