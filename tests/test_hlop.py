"""HLOP's Hebbian subspace rule, the gradient projection, GPM's basis and the continual metrics (issue 9 tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.hlop.hebbian import HebbianConfig, HebbianSubspace, pmnist_increments, row_schedule
from engramlab.hlop.methods import HLOP, Baseline, HLOPSettings, extend_basis, make_method
from engramlab.hlop.metrics import average_accuracy, backward_transfer
from engramlab.hlop.snn import SpikingMLP
from engramlab.hlop.subspace import (
    ProjectedLinear,
    Projector,
    activity_rows,
    attach_input_projection,
    project_rows,
    residual_energy,
)


def _low_rank_data(n: int, k: int, rows: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with a known spectrum: k signal directions (variances 9..4) plus small isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, k, generator=g))[0].T  # (k, n) orthonormal
    scales = torch.linspace(3.0, 2.0, k)
    x = (torch.randn(rows, k, generator=g) * scales) @ basis + noise * torch.randn(rows, n, generator=g)
    return x, basis


def _subspace_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖P_a − P_b‖_F between the projectors of two row spaces (a and b orthonormalised first)."""
    qa, qb = torch.linalg.qr(a.T)[0], torch.linalg.qr(b.T)[0]
    return float(torch.linalg.matrix_norm(qa @ qa.T - qb @ qb.T))


def test_hebbian_rule_converges_to_principal_subspace():
    x, basis = _low_rank_data(n=100, k=10, rows=64 * 100, seed=0)
    space = HebbianSubspace(100, HebbianConfig(lr=0.01, iterations=5, orthonormalise=False))
    space.add_rows(10, torch.Generator().manual_seed(1))
    for batch in x.split(64):
        space.update(batch)
    assert _subspace_distance(space.weight, basis) < 0.1  # spec §6: ≈ 0.08 within 100 batches
    assert space.orthonormality_error() < 0.01  # Oja's rule drives H to orthonormal rows


def test_new_rows_learn_only_the_unexplained_part_and_frozen_rows_stay():
    x, basis = _low_rank_data(n=60, k=8, rows=64 * 100, seed=2)
    space = HebbianSubspace(60, HebbianConfig(lr=0.01, iterations=5))
    space.add_rows(5, torch.Generator().manual_seed(3))
    for batch in x.split(64):
        space.update(batch)
    space.freeze()
    old = space.frozen_basis().clone()
    space.add_rows(3, torch.Generator().manual_seed(4))
    for batch in x.split(64):
        space.update(batch)
    assert torch.equal(space.weight[:5], old)  # frozen rows untouched by the rule
    new = space.weight[5:]
    assert float((new @ old.T).abs().max()) < 0.05  # new rows stay (nearly) orthogonal to the old ones
    assert _subspace_distance(space.weight, basis) < 0.3  # together they cover the 8-dim signal subspace


def test_literal_rule_matches_the_official_all_rows_update():
    """Updating only the new rows with a cached frozen residual equals the official update of all rows with the
    frozen rows' ΔH zeroed (spec §1.2)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 20, generator=g)
    space = HebbianSubspace(20, HebbianConfig(lr=0.05, iterations=3, orthonormalise=False))
    space.add_rows(4, g)
    space.update(torch.randn(32, 20, generator=g))
    space.freeze()
    space.add_rows(3, g)
    w, m = space.weight.clone(), space.momentum.clone()
    for _ in range(3):  # the official module, written out
        y = x @ w.T
        delta = (y.T @ (x - y @ w) / 32).clamp(-10, 10)
        delta[:4] = 0
        m[4:] = 0.9 * m[4:] + 0.1 * delta[4:]
        w[4:] = w[4:] + 0.05 * m[4:]  # frozen rows never move
    space.update(x)
    torch.testing.assert_close(space.weight, w, rtol=1e-5, atol=1e-6)


def test_projection_leaves_the_update_orthogonal_to_the_subspace():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5, bias=False)
    basis = torch.linalg.qr(torch.randn(12, 4))[0].T  # (4, 12)
    x = torch.randn(7, 12)
    layer(x).pow(2).sum().backward()
    raw = layer.weight.grad.clone()
    Projector(basis).project_gradient_(layer)
    assert float((layer.weight.grad @ basis.T).abs().max()) < 1e-5
    # weight-space projection = the input-space form δᵀ(x − xOᵀO) (spec §1.4)
    delta = 2 * layer(x).detach()
    torch.testing.assert_close(layer.weight.grad, delta.T @ project_rows(x, basis), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw, layer.weight.grad)


@pytest.mark.parametrize("k, orthonormal", [(3, True), (9, True), (9, False)])
def test_projector_routes_agree_with_the_formula(k, orthonormal):
    """Thin products (k ≤ n/2), complement basis (orthonormal, k > n/2), explicit complement (literal rule)."""
    g = torch.Generator().manual_seed(k)
    basis = torch.linalg.qr(torch.randn(12, k, generator=g))[0].T
    if not orthonormal:
        basis = basis * 1.3
    rows = torch.randn(5, 12, generator=g)
    projector = Projector(basis)
    assert (projector.complement_basis is not None) == (orthonormal and k > 6)
    assert (projector.complement_matrix is not None) == (not orthonormal)
    torch.testing.assert_close(projector(rows), rows - (rows @ basis.T) @ basis, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [4, 9])  # thin products and complement-basis routes
def test_input_mode_projection_equals_weight_mode(k):
    """ProjectedLinear's backward gives δᵀ(x − xOᵀO): the weight-mode gradient, with the input gradient untouched."""
    torch.manual_seed(0)
    plain, projected = nn.Linear(12, 5), ProjectedLinear(12, 5)
    projected.load_state_dict(plain.state_dict())
    basis = torch.linalg.qr(torch.randn(12, k))[0].T
    projector = Projector(basis)
    assert attach_input_projection(projected, lambda: projector)
    assert not attach_input_projection(plain, lambda: projector)  # a plain nn.Linear stays in weight mode
    x = torch.randn(3, 7, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    plain(x).pow(2).sum().backward()
    projected(x2).pow(2).sum().backward()
    projector.project_gradient_(plain)
    torch.testing.assert_close(projected.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(projected.bias.grad, plain.bias.grad)  # biases are not projected
    torch.testing.assert_close(x2.grad, x.grad)
    assert float((projected.weight.grad @ basis.T).abs().max()) < 1e-4


def test_projector_recalls_only_the_rows_it_projected():
    basis = torch.linalg.qr(torch.randn(12, 4))[0].T
    projector, rows = Projector(basis), torch.randn(6, 12)
    projector.remember(rows, projector(rows))
    torch.testing.assert_close(projector.recall(rows.view(6, 12)), project_rows(rows, basis))
    assert projector.recall(rows.clone()) is None  # equal values, other memory
    assert projector.recall(rows[:3]) is None
    rows.add_(1.0)  # modified in place after projection
    assert projector.recall(rows) is None


def test_spiking_mlp_hlop_step_projects_inside_backward_and_reuses_the_residual():
    """BPTT on the PMNIST MLP: linear layers project in input mode; the Hebbian rule gets the same residual as
    when it projects itself (identical H after the step)."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 784), torch.randint(0, 10, (8,))
    weights = {}
    for input_mode in (True, False):
        model = SpikingMLP((784, 40, 30, 10), neuron="lif")
        model.load_state_dict(weights.get("model", model.state_dict()))
        weights["model"] = model.state_dict()
        hlop = HLOP(HLOPSettings(initial=[8, 8, 8], increments=[[4, 4, 4]], lr=[0.01] * 3), seed=0)
        hlop.begin_task(0, model)
        hlop.end_task(0, model, [(x, y)])
        hlop.begin_task(1, model)
        if not input_mode:
            for layer in model.protected_layers():
                attach_input_projection(layer, None)
            hlop.input_mode = [False] * 3
        model.record = True
        nn.functional.cross_entropy(model(x), y).backward()
        hlop.after_backward(model)
        recalled = hlop.subspaces[1].frozen_projector().recall(model.presynaptic()[1])  # fc2's spikes [T*B, 40]
        assert (recalled is not None) == input_mode
        for layer, space in zip(model.protected_layers(), hlop.subspaces, strict=True):
            assert float((layer.weight.grad @ space.frozen_basis().T).abs().max()) < 1e-4
        hlop.observe(model)
        weights[input_mode] = (
            [layer.weight.grad.clone() for layer in model.protected_layers()],
            [s.weight.clone() for s in hlop.subspaces],
        )
    for a, b in zip(weights[True][0] + weights[True][1], weights[False][0] + weights[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_conv_projection_acts_on_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6)
    rows = activity_rows(conv, x)
    assert rows.shape == (2 * 36, 27)
    basis = torch.linalg.qr(torch.randn(27, 5))[0].T
    conv(x).sum().backward()
    Projector(basis).project_gradient_(conv)
    assert float((conv.weight.grad.view(4, -1) @ basis.T).abs().max()) < 1e-5


class _TinyNet(nn.Module):
    """The ContinualNet protocol on a 2-layer ReLU MLP (ANN mode), for method tests without spiking layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16, bias=False), nn.Linear(16, 3, bias=False)
        self.record, self._acts = False, []

    def forward(self, x, task=None):
        h = torch.relu(self.fc1(x))
        if self.record:
            self._acts = [x.detach(), h.detach()]
        return self.fc2(h)

    def protected_layers(self):
        return [self.fc1, self.fc2]

    def presynaptic(self):
        return self._acts

    def fix_bn(self):
        pass


def _one_step(model, method):
    torch.manual_seed(1)
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.record = True
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    method.after_backward(model)
    opt.step()
    method.observe(model)


def test_hlop_with_empty_subspace_equals_the_baseline_step():
    torch.manual_seed(0)
    a = _TinyNet()
    b = _TinyNet()
    b.load_state_dict(a.state_dict())
    hlop = HLOP(HLOPSettings(initial=[4, 4], increments=[[2, 2]], lr=[0.01, 0.01]))
    hlop.begin_task(0, a)  # task 0: rows added, none frozen → no projection
    base = Baseline()
    base.begin_task(0, b)
    _one_step(a, hlop)
    _one_step(b, base)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert hlop.subspaces[0].n_rows == 4 and hlop.subspaces[0].n_frozen == 0


def test_hlop_protects_old_inputs_after_freezing():
    torch.manual_seed(0)
    model = _TinyNet()
    hlop = HLOP(HLOPSettings(initial=[10, 16], increments=[[0, 0]], lr=[0.01, 0.01]))
    hlop.begin_task(0, model)
    old_x = torch.randn(64, 10)
    hlop.end_task(
        0, model, [(old_x, torch.zeros(64))]
    )  # freeze the (orthonormal, full-rank) initial rows: they span everything
    hlop.begin_task(1, model)
    before = model(old_x).detach()
    _one_step(model, hlop)
    torch.testing.assert_close(model(old_x).detach(), before, rtol=1e-4, atol=1e-5)


def test_gpm_basis_captures_the_threshold_energy():
    x, _ = _low_rank_data(n=40, k=6, rows=500, seed=3, noise=0.01)
    grown = extend_basis(torch.zeros(0, 40), x, threshold=0.97)
    assert 1 <= grown.shape[0] <= 6
    assert residual_energy(x, grown) <= 0.03 + 1e-6
    torch.testing.assert_close(grown @ grown.T, torch.eye(grown.shape[0]), atol=1e-5, rtol=0)
    assert extend_basis(grown, x, threshold=0.97).shape == grown.shape  # nothing new to add


def test_pmnist_schedule_matches_the_official_totals():
    increments = pmnist_increments()
    assert [row[0] for row in increments] == [70, 70, 50, 50, 50, 30, 30, 30, 10]
    totals = [sum(row_schedule([80, 200, 100], increments, t)[i] for t in range(10)) for i in range(3)]
    assert totals == [470, 590, 490]  # spec §1.3


def test_acc_and_bwt_on_a_hand_made_matrix():
    acc = [[0.9, 0.1, 0.0], [0.8, 0.95, 0.2], [0.7, 0.9, 0.85]]
    assert math.isclose(average_accuracy(acc), (0.7 + 0.9 + 0.85) / 3)
    assert math.isclose(backward_transfer(acc), ((0.7 - 0.9) + (0.9 - 0.95)) / 2)
    assert math.isnan(backward_transfer([[0.5]]))
    with pytest.raises(EngramError, match="square"):
        average_accuracy(np.zeros((2, 3)))


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(EngramError, match="baseline, hlop, gpm, ewc, multitask"):
        make_method("sgd")


def _tiny_stream(n_tasks: int = 2):
    from engramlab.hlop.streams import Task, TaskStream

    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(n_tasks):
        w = torch.randn(10, 3, generator=g)
        x_train, x_test = torch.randn(96, 10, generator=g), torch.randn(48, 10, generator=g)
        tasks.append(Task(f"t{t}", x_train, (x_train @ w).argmax(1), x_test, (x_test @ w).argmax(1), 3, 0))
    return TaskStream("tiny", tasks, multi_head=False, input_shape=(10,))


@pytest.mark.parametrize("name", ["hlop", "gpm", "ewc"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, name):
    from engramlab.hlop import runner

    stream = _tiny_stream(3)
    settings = runner.TrainSettings(batch_size=16, leak_samples=32)
    hlop = HLOPSettings(initial=[3, 4], increments=[[2, 2]], lr=[0.01, 0.01])
    full = runner.train_method(make_method(name, hlop=hlop), stream, _TinyNet, settings)

    real_evaluate, calls = runner.evaluate, []

    def crash_in_task_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # first evaluation after the third task: tasks 1 and 2 are checkpointed
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", crash_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        runner.train_method(make_method(name, hlop=hlop), stream, _TinyNet, settings, tmp_path)
    monkeypatch.setattr(runner, "evaluate", real_evaluate)
    resumed = runner.train_method(make_method(name, hlop=hlop), stream, _TinyNet, settings, tmp_path)
    np.testing.assert_array_equal(resumed.acc, full.acc)


def test_hlop_cli_runs_every_method_and_writes_its_results(tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli(
        [
            "continual",
            "hlop",
            "--tasks",
            "2",
            "--neuron",
            "ann",
            "--batch-size",
            "400",
            "--lr",
            "0.3",
            "--out",
            str(out),
        ]
    )
    assert code == 0, err
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert set(summary["acc"]) == {"hlop", "baseline", "ewc", "gpm", "multitask"}
    assert all(0.5 < acc <= 1 for acc in summary["acc"].values())  # two easy tasks are learned
    assert summary["bwt"]["multitask"] is None and summary["bwt"]["hlop"] is not None
    assert {"hlop", "gpm"} <= set(summary["final_leak_mean"])
    for name in ("accuracy.parquet", "leak.parquet", "report.html"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--neuron", "ann", "--train", "dsr"], "--neuron ann --train dsr"),
        (["--stream", "cifar100"], "cifar-100-binary"),
        (["--stream", "imagenet"], "unknown stream"),
        (["--methods", "hlop,sgd"], "sgd"),
        (["--lateral-neurons", "80,x"], "--lateral-neurons"),
        (["--lateral-neurons", "80,200", "--methods", "hlop", "--tasks", "1"], "3 protected layers"),
    ],
)
def test_hlop_cli_rejects_bad_input_in_one_line(tmp_path, cli, argv, needle):
    code, _, err = cli(["continual", "hlop", *argv, "--out", str(tmp_path / "o")])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_hlop_on_the_spiking_cnn_with_conv_subspaces():
    """The CIFAR-100 path end to end on random images: conv activity unfolded into patches, multi-head network."""
    from engramlab.hlop import runner
    from engramlab.hlop.methods import HLOP_PRESETS
    from engramlab.hlop.snn import SpikingCNN
    from engramlab.hlop.streams import Task, TaskStream

    g = torch.Generator().manual_seed(0)
    tasks = [
        Task(
            f"t{t}",
            torch.rand(16, 3, 32, 32, generator=g),
            torch.randint(0, 10, (16,), generator=g),
            torch.rand(8, 3, 32, 32, generator=g),
            torch.randint(0, 10, (8,), generator=g),
            10,
            10 * t,
        )
        for t in range(2)
    ]
    stream = TaskStream("tiny-cifar", tasks, multi_head=True, input_shape=(3, 32, 32))
    method = make_method("hlop", hlop=HLOP_PRESETS["cnn"])
    result = runner.train_method(
        method,
        stream,
        lambda: SpikingCNN(2, neuron="lif", timesteps=2),
        runner.TrainSettings(batch_size=8, leak_samples=4, momentum=0.9, lr=0.01),
    )
    assert [s.dim for s in method.subspaces] == [27, 576, 1152]
    assert [s.n_frozen for s in method.subspaces] == [8, 120, 240]  # 6/100/200 rows, then +2/20/40 (spec §1.3)
    assert np.isfinite(result.acc).all()
    assert {row["layer"] for row in result.leak} == {0, 1, 2}
