"""The one training loop for task-incremental continual learning (HLOP spec §1.3 schedule and §3 settings).

For each task: the method's `begin_task`, a fresh optimiser (SGD by default; from task 1 on only parameters with
dim != 1, as the official scripts do, so BN and biases stay put), minibatches with the method's penalty, gradient
edit and Hebbian observation, then `end_task`, the accuracy row on every task, and a checkpoint so that an
interrupted run resumes after the last finished task.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from engramlab.data.batching import batches
from engramlab.hlop.methods import ContinualMethod, subspace_leak
from engramlab.hlop.streams import Task, TaskStream
from engramlab.progress import track
from engramlab.readers import read_json_object, read_safetensors
from engramlab.results import atomic_path


@dataclass
class TrainSettings:
    """Optimisation settings (defaults: the official PMNIST script, spec §3)."""

    epochs: int = 1
    lr: float = 0.1
    batch_size: int = 64
    momentum: float = 0.0  # SGD without momentum for PMNIST; CIFAR-100 uses 0.9
    seed: int = 2022
    leak_samples: int = 256  # training images per task for the subspace-leak diagnostic and GPM/EWC statistics
    eval_batch_size: int = 500


@dataclass
class MethodResult:
    """What one method produced on one stream."""

    method: str
    acc: np.ndarray  # (T, T): acc[i, j] after task i on task j; rows not trained (multitask) are nan
    ms_per_step: float
    ms_per_step_by_task: list[float]
    leak: list[dict] = field(default_factory=list)  # after_task, layer, task, leak, basis_rows


@torch.inference_mode()
def evaluate(model: nn.Module, task: Task, task_id: int, batch_size: int) -> float:
    """Top-1 accuracy on a task's test split (eval mode)."""
    was_training, was_recording = model.training, model.record
    model.eval()
    model.record = False
    correct = 0
    for x, y in batches(task.x_test, task.y_test, batch_size, shuffle=False):
        correct += int((model(x, task=task_id).argmax(-1) == y).sum())
    model.train(was_training)
    model.record = was_recording
    return correct / len(task.y_test)


def _optimizer(model: nn.Module, task_id: int, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad and (task_id == 0 or p.dim() != 1)]
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)


def _train_batches(
    stream: TaskStream, task_ids: list[int], settings: TrainSettings, generator: torch.Generator
) -> list[tuple[int, Tensor, Tensor]]:
    """Minibatches of one training phase: one task's, or (multitask) every task's, interleaved at random."""
    out = []
    for _ in range(settings.epochs):
        epoch = [
            (t, x, y)
            for t in task_ids
            for x, y in batches(
                stream.tasks[t].x_train, stream.tasks[t].y_train, settings.batch_size, shuffle=True, generator=generator
            )
        ]
        if len(task_ids) > 1:
            epoch = [epoch[i] for i in torch.randperm(len(epoch), generator=generator).tolist()]
        out.extend(epoch)
    return out


def _step(
    model: nn.Module, method: ContinualMethod, optimizer: torch.optim.Optimizer, task_id: int, x: Tensor, y: Tensor
) -> None:
    loss = F.cross_entropy(model(x, task=task_id), y)
    penalty = method.penalty(model)
    if penalty is not None:
        loss = loss + penalty
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(model)
    optimizer.step()
    if method.needs_activity:
        method.observe(model)


class Checkpoint:
    """`<dir>/<method>.safetensors` (network + method state) and `<method>.json` (accuracy rows, timings)."""

    def __init__(self, folder: Path | None, method: str) -> None:
        self.folder, self.method = folder, method

    def save(self, model: nn.Module, method: ContinualMethod, meta: dict) -> None:
        if self.folder is None:
            return
        tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        tensors |= {f"method.{k}": v.detach().contiguous().clone() for k, v in method.state_tensors().items()}
        with atomic_path(self.folder / f"{self.method}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(self.folder / f"{self.method}.json") as tmp:
            tmp.write_text(json.dumps(meta))

    def load(self, model: nn.Module, method: ContinualMethod) -> dict | None:
        if self.folder is None or not (self.folder / f"{self.method}.json").exists():
            return None
        hint = "delete the checkpoints folder (or pick a new --out) to start this method over"
        meta = read_json_object(
            self.folder / f"{self.method}.json",
            {"done": int, "acc": list, "step_ms": list, "leak": list, "generator": list},
            hint,
        )
        tensors, _ = read_safetensors(self.folder / f"{self.method}.safetensors", hint=hint)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        method.load_state_tensors({k[7:]: v for k, v in tensors.items() if k.startswith("method.")}, model)
        return meta


def train_method(
    method: ContinualMethod,
    stream: TaskStream,
    build_net: Callable[[], nn.Module],
    settings: TrainSettings,
    checkpoint_dir: Path | None = None,
) -> MethodResult:
    """Train `method` through the stream and return its accuracy matrix, step time and subspace leak."""
    torch.manual_seed(settings.seed)
    model = build_net()
    model.train()
    n_tasks = len(stream.tasks)
    generator = torch.Generator().manual_seed(settings.seed)
    checkpoint = Checkpoint(checkpoint_dir, method.name)
    acc = np.full((n_tasks, n_tasks), math.nan)
    meta = {"done": 0, "acc": acc.tolist(), "step_ms": [], "leak": [], "generator": None}
    phases = [list(range(n_tasks))] if method.joint else [[t] for t in range(n_tasks)]
    resumed = checkpoint.load(model, method)
    if resumed is not None:
        meta = resumed
        acc = np.array(meta["acc"], dtype=float)
        generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
    for phase_idx in range(meta["done"], len(phases)):
        task_ids = phases[phase_idx]
        task_id = task_ids[-1]
        method.begin_task(task_id, model)
        optimizer = _optimizer(model, task_id, settings)
        model.record = method.needs_activity
        seconds, steps = 0.0, 0
        label = f"{method.name}: task {task_id + 1}/{n_tasks}" if not method.joint else f"{method.name}: all tasks"
        for t, x, y in track(_train_batches(stream, task_ids, settings, generator), label):
            start = time.perf_counter()
            _step(model, method, optimizer, t, x, y)
            seconds += time.perf_counter() - start
            steps += 1
        model.record = False
        samples = [
            (stream.tasks[t].x_train[: settings.leak_samples], stream.tasks[t].y_train[: settings.leak_samples])
            for t in range(task_id)
        ]
        method.end_task(task_id, model, [*samples, (stream.tasks[task_id].x_train, stream.tasks[task_id].y_train)])
        bases = method.bases()
        if bases is not None:
            samples.append((stream.tasks[task_id].x_train[: settings.leak_samples], None))
            meta["leak"] += [row | {"after_task": task_id} for row in subspace_leak(model, bases, samples)]
        acc[task_id] = [evaluate(model, stream.tasks[j], j, settings.eval_batch_size) for j in range(n_tasks)]
        meta |= {
            "done": phase_idx + 1,
            "acc": acc.tolist(),
            "step_ms": meta["step_ms"] + [1000 * seconds / steps],
            "generator": generator.get_state().tolist(),
            "settings": asdict(settings),
        }
        checkpoint.save(model, method, meta)
    step_ms = meta["step_ms"]
    return MethodResult(method.name, acc, float(np.mean(step_ms)), step_ms, meta["leak"])
