"""Cost of one HLOP training step as a ratio to the plain (baseline) step, at every task of the PMNIST schedule.

    python benchmarks/hlop_step.py [--neuron lif|dsr|ann --batch 64 --repeats 15 --tasks 0,1,5,9]

Same network (the spec's PMNIST MLP 784-800-800-10) and the same minibatch for all variants; for task t the lateral
neurons of every layer are those the official schedule has at task t (frozen rows of tasks < t, new rows of task t).
Variants, timed in one run in rotating order so that machine noise hits all alike:
  baseline   forward, backward, SGD step
  hlop       + gradient projection on the frozen rows (input mode, inside backward) + 5 Hebbian iterations on the
             new rows (engramlab)
  official   + the projection as two thin products (GOᵀ)O + 5 Hebbian iterations written as the official module
             does them (ΔH for every row, then the frozen rows' ΔH zeroed)
Prints the median time of each and the ratios hlop/baseline (target <= 1.5 at every task, issue 9) and
official/baseline. Data are random [0, 1] pixels: only the cost is measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from engramlab.hlop.hebbian import CLIP, MOMENTUM, HebbianSubspace
from engramlab.hlop.methods import HLOP, HLOP_PRESETS
from engramlab.hlop.snn import SpikingMLP
from engramlab.hlop.subspace import activity_rows, attach_input_projection


def hlop_at_task(model: SpikingMLP, task: int, hebbian_rows: int | None) -> HLOP:
    """An HLOP whose subspaces have the official row counts of `task` (random orthonormal rows)."""
    method = HLOP(replace(HLOP_PRESETS["mlp"], hebbian_rows=hebbian_rows), seed=0)
    for t in range(task + 1):
        method.begin_task(t, model)  # adds the schedule's rows for task t
        if t < task:
            for s in method.subspaces:
                s.freeze()
    return method


@torch.no_grad()
def official_update(space: HebbianSubspace, rows: torch.Tensor) -> None:
    """The official hlop_module update: ΔH for all rows, frozen rows' ΔH zeroed, 5 iterations (spec §1.2)."""
    w, m, n_old = space.weight, space.momentum, space.n_frozen
    for _ in range(space.config.iterations):
        y = rows @ w.T
        delta = (y.T @ (rows - y @ w) / rows.shape[0]).clamp_(-CLIP, CLIP)
        delta[:n_old] = 0
        m[n_old:] = MOMENTUM * m[n_old:] + (1 - MOMENTUM) * delta[n_old:]
        w[n_old:] += space.config.lr * m[n_old:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neuron", default="lif", choices=["lif", "dsr", "ann"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tasks", default="0,1,3,6,9")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--hebbian-rows",
        type=int,
        default=HLOP_PRESETS["mlp"].hebbian_rows,
        help="HLOP's row subsample for the Hebbian rule (default: the MLP preset's; 0: all rows)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SpikingMLP(neuron=args.neuron)
    x, y = torch.rand(args.batch, 784), torch.randint(0, 10, (args.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)  # tiny lr: the weights barely move between repeats

    def step(method: HLOP | None, official: bool) -> None:
        engramlab_hlop = method is not None and not official
        for layer, space in zip(model.protected_layers(), method.subspaces if method else [None] * 3, strict=True):
            attach_input_projection(layer, space.frozen_projector if engramlab_hlop else None)
        model.record = method is not None
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if method is not None and not official:
            method.after_backward(model)
        elif method is not None:  # the official projection: two thin products, G − (GOᵀ)O
            for layer, space in zip(model.protected_layers(), method.subspaces, strict=True):
                grad, basis = layer.weight.grad, space.frozen_basis()
                grad.sub_((grad @ basis.T) @ basis)
        optimizer.step()
        if method is None:
            return
        if not official:
            method.observe(model)
            return
        for layer, space, activity in zip(model.protected_layers(), method.subspaces, model.presynaptic(), strict=True):
            official_update(space, activity_rows(layer, activity))

    print(
        f"HLOP step cost, PMNIST MLP {args.neuron}, batch {args.batch}, {args.threads} thread(s), "
        f"hebbian rows {args.hebbian_rows or 'all'}, {cpu_name()}"
    )
    print(
        f"{'task':>4} {'rows old/new (fc1, fc2, out)':>32} {'baseline ms':>12} {'hlop ms':>9} {'official ms':>12} "
        f"{'hlop/base':>10} {'official/base':>14}"
    )
    for task in [int(t) for t in args.tasks.split(",")]:
        method = hlop_at_task(model, task, args.hebbian_rows)
        variants = {
            "baseline": lambda: step(None, False),
            "hlop": lambda method=method: step(method, False),
            "official": lambda method=method: step(method, True),
        }
        times = {name: [] for name in variants}
        for fn in variants.values():
            fn()  # warm-up
        for r in range(args.repeats):
            order = list(variants)[r % 3 :] + list(variants)[: r % 3]
            for name in order:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        med = {name: 1000 * statistics.median(v) for name, v in times.items()}
        rows = ", ".join(f"{s.n_frozen}/{s.n_rows - s.n_frozen}" for s in method.subspaces)
        print(
            f"{task:>4} {rows:>32} {med['baseline']:>12.1f} {med['hlop']:>9.1f} {med['official']:>12.1f} "
            f"{med['hlop'] / med['baseline']:>10.2f} {med['official'] / med['baseline']:>14.2f}"
        )


if __name__ == "__main__":
    main()
