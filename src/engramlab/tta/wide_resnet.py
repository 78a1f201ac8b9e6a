"""WideResNet-28-10 in RobustBench's layout, so that CoTTA's CIFAR10-C source model loads without robustbench.

CoTTA's CIFAR10-C table (paper Table 2) adapts RobustBench's "Standard" WRN-28-10 (Zagoruyko & Komodakis 2016,
arXiv 1605.07146), which takes raw [0, 1] images. RobustBench is not a dependency (it pulls torchvision and
downloads on import paths), so the architecture is written out here with RobustBench's parameter names
(`robustbench/model_zoo/architectures/wide_resnet.py`), and `load_robustbench_checkpoint` reads the downloaded
`Standard.pt` with `torch.load(weights_only=True)` — tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engramlab.errors import EngramError
from engramlab.readers import load_failure


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus identity or a 1x1 conv shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.equal_in_out else self.convShortcut(activated))


class NetworkBlock(nn.Module):
    def __init__(self, n_blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(n_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for [N, 3, 32, 32] inputs in [0, 1] (no normalisation inside, as RobustBench's Standard)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, n_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise EngramError(f"WideResNet depth must be 6n + 4 (e.g. 28), got {depth}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))  # [N, 64k, 8, 8]
        out = self.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))  # [N, 64k] -> [N, n_classes]


def load_robustbench_checkpoint(path: str | Path, n_classes: int = 10) -> WideResNet:
    """A WRN-28-10 from RobustBench's `Standard.pt` (a state dict, possibly under "state_dict" and with "module."
    prefixes), loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise EngramError(
            f"--source {path} does not exist; download RobustBench's cifar10 Linf 'Standard' "
            "checkpoint (Standard.pt) and pass its path."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EngramError(f"--source {path} is not a tensors-only torch checkpoint: {load_failure(err)}.") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise EngramError(f"--source {path} holds no state dict.")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = WideResNet(28, 10, n_classes)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise EngramError(
            f"--source {path} is not a WRN-28-10 in RobustBench's layout: {str(err).splitlines()[-1].strip()}"
        ) from err
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise EngramError(
            f"--source {path} is not a WRN-28-10 in RobustBench's layout ({len(missing)} missing, "
            f"{len(unexpected)} unexpected tensors, e.g. {first!r})."
        )
    return model.eval()
