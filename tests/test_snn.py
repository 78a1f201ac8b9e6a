"""Spiking networks for HLOP (engramlab.hlop.snn): neurons against spikingjelly and hand computations, the
networks' protocol (presynaptic shapes, gradients, ANN mode, fix_bn) and the time-folding shortcuts against a naive
per-step reference."""

from __future__ import annotations

import math

import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate
from torch import nn

from engramlab.errors import EngramError
from engramlab.hlop.snn import (
    DEFAULT_TIMESTEPS,
    NEURONS,
    ContinualNet,
    DSRNeuron,
    LIFNode,
    SpikingCNN,
    SpikingMLP,
    weighted_rate,
)

SIZES = (784, 37, 29, 10)  # odd hidden sizes so that a transposed dimension cannot hide


def sj_lif() -> nn.Module:
    """The official BPTT neuron (spec §2) as spikingjelly 2.0 builds it."""
    return sj_neuron.LIFNode(
        tau=2.0,
        decay_input=False,
        v_threshold=1.0,
        v_reset=None,
        detach_reset=True,
        surrogate_function=sj_surrogate.Sigmoid(alpha=4.0),
        step_mode="m",
    )


# --- LIF (BPTT) ---


def test_lif_matches_spikingjelly_forward_and_input_gradient():
    ref = sj_lif()
    ours = LIFNode()
    for seed in (0, 1):  # two uses of the same spikingjelly module, reset in between
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(6, 5, 13, generator=g) * 1.5 + 0.4).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        w = torch.randn(6, 5, 13, generator=g)  # a loss that weighs every spike differently
        s = ours(x)
        ref.reset()
        s_ref = ref(x_ref)
        assert 0 < s.sum() < s.numel()
        assert torch.equal(s, s_ref)
        (s * w).sum().backward()
        (s_ref * w).sum().backward()
        assert x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)  # backward sums in another order


def test_lif_hand_computed_spike_train():
    # I = 0.6: h = 0.6, 0.9, 1.05 (spike, v = 0.05), 0.625, 0.9125, 1.05625 (spike)
    # I = 1.0: h = 1.0 at every step (spike, v = 0) -> fires every step; I = 0.4: h -> 0.8 from below, never fires.
    x = torch.tensor([0.6, 1.0, 0.4]).expand(6, 3)  # [T, N]
    expected = torch.tensor([[0, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.float32).T
    assert torch.equal(LIFNode()(x), expected)
    assert torch.equal(LIFNode()(x), expected)  # no state carried between calls


def test_lif_surrogate_gradient_single_step():
    x = torch.tensor([[1.0, 0.5]], requires_grad=True)  # [T=1, N=2]: v - v_th = 0 and -0.5
    LIFNode()(x).sum().backward()
    sig = 1 / (1 + math.exp(2.0))  # sigmoid(4 * -0.5)
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 4 * sig * (1 - sig)]]))  # alpha/4 at 0


# --- DSR ---


def test_dsr_hand_computed_forward():
    # beta = exp(-0.05) = 0.951229, 1 - beta = 0.048771; fires when u >= 0.3 * 0.3 = 0.09, then u -= 0.3; out 6.
    # I = 4: u = 0.19508 (spike -> -0.10492), 0.09528 (spike -> -0.20472), 0.00034 (no).
    # I = 1: u = 0.04877, 0.09516 (spike -> -0.20484), -0.14608 (no).
    # I = -1: never.
    x = torch.tensor([4.0, 1.0, -1.0]).expand(3, 3)  # [T, N]
    expected = torch.tensor([[6.0, 6.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 0.0]]).T
    torch.testing.assert_close(DSRNeuron()(x), expected)


@pytest.mark.parametrize("tau", [1.0, 2.0])  # the paper's 1.0 hides a missing 1/tau in the backward
def test_dsr_matches_spikingjelly_dsr_lif(tau):
    g = torch.Generator().manual_seed(0)
    # per-neuron mean currents from -4 to 12: silent, passing (rate < Vth*tau/dt = 6) and saturated neurons
    x = (torch.randn(20, 8, 11, generator=g) * 2 + torch.linspace(-4, 12, 11)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    w = torch.randn(20, 8, 11, generator=g)
    ours = DSRNeuron(tau=tau)
    ref = sj_neuron.DSRLIFNode(T=20, v_threshold=0.3, tau=tau, delta_t=0.05, alpha=0.3, v_threshold_lower_bound=5e-4)
    y, y_ref = ours(x), ref(x_ref)
    assert torch.equal(y, y_ref)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.v_threshold.grad, ref.v_threshold.grad)
    assert ours.v_threshold.grad != 0


def test_dsr_backward_regions():
    T = 20
    # constant currents: rate -1 (silent), 2 (inside 0 < r < Vth*tau/dt = 6), 10 (saturated)
    x = torch.tensor([-1.0, 2.0, 10.0]).repeat(T, 1).requires_grad_()  # [T, N]
    n = DSRNeuron()
    n(x).sum().backward()
    # dL/d(out) = 1 at every step -> g = T * weighted_rate(1) = T; the middle neuron gets g / tau / T = 1 per step
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 0.0]).repeat(T, 1))
    torch.testing.assert_close(n.v_threshold.grad, torch.tensor(0.05 * T))  # dt * g over the saturated neuron


def test_dsr_threshold_is_clamped():
    n = DSRNeuron()
    with torch.no_grad():
        n.v_threshold.fill_(-1.0)
    n(torch.zeros(3, 2))
    assert n.v_threshold.item() == pytest.approx(5e-4)


def test_weighted_rate_hand():
    x = torch.tensor([[1.0], [0.0]])  # T = 2: weights exp(-0.05), exp(0)
    w1 = math.exp(-0.05)
    torch.testing.assert_close(weighted_rate(x), torch.tensor([w1 / (w1 + 1)]))


# --- networks ---


def make_net(kind: str, neuron: str) -> nn.Module:
    torch.manual_seed(0)
    return SpikingMLP(SIZES, neuron=neuron) if kind == "mlp" else SpikingCNN(n_tasks=3, neuron=neuron)


def make_input(kind: str, batch: int = 3) -> tuple[torch.Tensor, int | None]:
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(batch, 1, 28, 28, generator=g) * 2, None
    return torch.randn(batch, 3, 32, 32, generator=g), 1


def test_default_timesteps():
    assert {n: SpikingMLP(SIZES, neuron=n).timesteps for n in NEURONS} == {"lif": 6, "dsr": 20, "ann": 1}
    assert DEFAULT_TIMESTEPS == {"lif": 6, "dsr": 20, "ann": 1}


@pytest.mark.parametrize("neuron", NEURONS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_presynaptic_shapes(kind, neuron):
    net = make_net(kind, neuron)
    assert isinstance(net, ContinualNet)
    x, task = make_input(kind, batch=3)
    net(x, task)
    with pytest.raises(EngramError, match="record"):
        net.presynaptic()
    net.record = True
    net(x, task)
    acts = net.presynaptic()
    rows = 3 * net.timesteps if neuron == "lif" else 3
    if kind == "mlp":
        assert [tuple(a.shape) for a in acts] == [(3, 784), (rows, 37), (rows, 29)]
        assert [(layer.in_features) for layer in net.protected_layers()] == [784, 37, 29]
    else:
        assert [tuple(a.shape) for a in acts] == [(3, 3, 32, 32), (rows, 64, 16, 16), (rows, 128, 8, 8)]
        assert [layer.in_channels for layer in net.protected_layers()] == [3, 64, 128]
    torch.testing.assert_close(acts[0], x.reshape(3, -1) if kind == "mlp" else x)
    assert all(not a.requires_grad for a in acts)
    if neuron == "lif" and kind == "mlp":
        assert set(torch.cat([a.flatten() for a in acts[1:]]).unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("neuron", NEURONS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_gradients_reach_every_weight(kind, neuron):
    net = make_net(kind, neuron)
    x, task = make_input(kind, batch=4)
    out = net(x, task)
    assert out.shape == (4, 10)
    nn.functional.cross_entropy(out, torch.arange(4) % 10).backward()
    layers = net.protected_layers() + ([net.heads[task]] if kind == "cnn" else [])
    for layer in layers:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, layer


def naive_mlp_forward(net: SpikingMLP, x: torch.Tensor) -> torch.Tensor:
    """The official layout: the image repeated over T and stacked into T*B rows, every layer (classifier too) run
    on every step, then the network output is the rate of the per-step logits."""
    T, B = net.timesteps, x.shape[0]
    h = x.reshape(B, -1).repeat(T, 1)  # [T*B, 784]
    for fc, sn in zip(net.fc, net.sn, strict=True):
        h = sn(fc(h).view(T, B, -1)).flatten(0, 1)  # [T*B, H]
    out = net.classifier(h).view(T, B, -1)  # [T, B, C]
    return weighted_rate(out) if net.neuron == "dsr" else out.mean(0)


@pytest.mark.parametrize("neuron", ["lif", "dsr"])
def test_mlp_time_shortcuts_match_naive_layout(neuron):
    net = make_net("mlp", neuron)
    x, _ = make_input("mlp", batch=4)
    out = net(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ref = naive_mlp_forward(net, x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def naive_cnn_forward(net: SpikingCNN, x: torch.Tensor, task: int) -> torch.Tensor:
    """The official CNN layout: the image repeated into T*B rows, each conv on every step, the head on every step."""
    T, B = net.timesteps, x.shape[0]
    h = x.repeat(T, 1, 1, 1)  # [T*B, 3, 32, 32]
    for conv, bn, sn in zip(net.convs, net.bns, net.sn, strict=True):
        h = bn(conv(h))
        h = nn.functional.avg_pool2d(sn(h.view(T, B, *h.shape[1:])).flatten(0, 1), 2)  # [T*B, C, H/2, W/2]
    out = net.heads[task](h.flatten(1)).view(T, B, -1)  # [T, B, classes]
    return weighted_rate(out) if net.neuron == "dsr" else out.mean(0)


@pytest.mark.parametrize("neuron", ["lif", "dsr"])
def test_cnn_time_shortcuts_match_naive_layout(neuron):
    net = make_net("cnn", neuron)
    ref_net = make_net("cnn", neuron)  # same seed: same weights; its BN running stats are updated separately
    x, task = make_input("cnn", batch=2)
    out, ref = net(x, task), naive_cnn_forward(ref_net, x, task)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref_net.parameters(), strict=True):
        if p.grad is not None:  # the heads of other tasks get none
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    for b, b_ref in zip(net.bns, ref_net.bns, strict=True):
        torch.testing.assert_close(b.running_var, b_ref.running_var)


def test_ann_mode_is_a_relu_mlp():
    net = make_net("mlp", "ann")
    ref = nn.Sequential(
        nn.Linear(784, 37, bias=False),
        nn.ReLU(),
        nn.Linear(37, 29, bias=False),
        nn.ReLU(),
        nn.Linear(29, 10, bias=False),
    )
    for dst, src in zip([ref[0], ref[2], ref[4]], net.protected_layers(), strict=True):
        dst.weight.data.copy_(src.weight.data)
    x, _ = make_input("mlp", batch=5)
    out, out_ref = net(x), ref(x.reshape(5, -1))
    torch.testing.assert_close(out, out_ref)
    out.sum().backward()
    out_ref.sum().backward()
    for dst, src in zip([ref[0], ref[2], ref[4]], net.protected_layers(), strict=True):
        torch.testing.assert_close(src.weight.grad, dst.weight.grad)


@pytest.mark.parametrize("neuron", ["dsr", "ann"])
def test_fix_bn_freezes_bn_and_thresholds(neuron):
    net = make_net("cnn", neuron)
    x, task = make_input("cnn", batch=2)
    net.fix_bn()
    net.train()  # fix_bn is sticky: BN stays in eval mode
    bn_state = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("bns.")}
    out = net(x, task)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in bn_state.items())  # running stats untouched
    assert all(not bn.training and not bn.weight.requires_grad and not bn.bias.requires_grad for bn in net.bns)
    if neuron == "dsr":
        assert all(not sn.v_threshold.requires_grad for sn in net.sn)
    torch.testing.assert_close(out, net.eval()(x, task))
    out.sum().backward()
    assert all(bn.weight.grad is None for bn in net.bns)
    assert all(conv.weight.grad is not None for conv in net.convs)


def test_mlp_fix_bn_freezes_thresholds():
    net = make_net("mlp", "dsr")
    net.fix_bn()
    assert [sn.v_threshold.requires_grad for sn in net.sn] == [False, False]


def test_user_errors():
    with pytest.raises(EngramError, match="neuron"):
        SpikingMLP(neuron="relu")
    with pytest.raises(EngramError, match="timesteps"):
        SpikingMLP(neuron="ann", timesteps=4)
    with pytest.raises(EngramError, match="784"):
        SpikingMLP(SIZES)(torch.zeros(2, 100))
    cnn = SpikingCNN(n_tasks=2)
    with pytest.raises(EngramError, match="task"):
        cnn(torch.zeros(1, 3, 32, 32))
    with pytest.raises(EngramError, match="task"):
        cnn(torch.zeros(1, 3, 32, 32), task=2)
    with pytest.raises(EngramError, match="3, 32, 32"):
        cnn(torch.zeros(1, 1, 28, 28), task=0)
