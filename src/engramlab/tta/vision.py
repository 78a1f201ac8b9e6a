"""A small BatchNorm ResNet for 32x32 images and the BatchNorm set-up of test-time adaptation.

CoTTA (Wang et al., CVPR 2022, arXiv 2203.13591; code `qinenergy/cotta`) and TENT (Wang et al., ICLR 2021,
arXiv 2006.10726) adapt a classifier whose BatchNorm layers always normalise with the current batch's statistics
(CoTTA spec §1.5). This module holds:

- `SmallResNet`: the CIFAR ResNet of He et al. 2016 (§4.2: 3 stages of widths w, 2w, 4w at 32, 16, 8 px), small
  enough to train and adapt on a CPU. torchvision is not a dependency, hence the hand-written model.
- `configure_for_tta`: `configure_model` of the CoTTA/TENT code (spec §1.5).
- `bn_affine_parameters` (TENT's trained set) and `all_weight_bias_parameters` (CoTTA's `collect_params`).
- `per_view_batch_stats`: run V augmented copies of a batch as one forward while every BatchNorm still normalises
  each copy with that copy's own statistics, as V separate forwards would (spec §1.2 step 4); `forward_views`
  runs the V copies in the fastest equivalent way for the device.

Everything but `SmallResNet` works on any torch classifier with `nn.modules.batchnorm._BatchNorm` layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from engramlab.errors import EngramError


class SmallResNetBlock(nn.Module):
    """Basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2016, Fig. 2 left).

    The shortcut is a 1x1 conv + BN when the shape changes (option B of He et al. §3.3), identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class SmallResNet(nn.Module):
    """CIFAR-style ResNet for [N, 3, 32, 32] inputs in [0, 1]; returns logits [N, n_classes].

    Depth is 6 * blocks_per_stage + 2 (blocks_per_stage=3 is ResNet-20). Any input size works (global pooling);
    32x32 is the design point.
    """

    def __init__(self, n_classes: int = 10, width: int = 16, blocks_per_stage: int = 1) -> None:
        super().__init__()
        for name, value in (("n_classes", n_classes), ("width", width), ("blocks_per_stage", blocks_per_stage)):
            if not isinstance(value, int) or value < 1:
                raise EngramError(f"SmallResNet: {name} must be a positive integer, got {value!r}.")
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages, in_ch = [], width
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(SmallResNetBlock(in_ch, out_ch, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_ch, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))  # [N, 4w, H/4, W/4]
        return self.head(h.mean(dim=(2, 3)))  # [N, 4w] -> [N, n_classes]


def configure_for_tta(model: nn.Module, *, eval_mode: bool = False) -> nn.Module:
    """CoTTA/TENT `configure_model` (spec §1.5): batch statistics in every BatchNorm, gradients everywhere.

    Every BatchNorm (1d/2d/3d, SyncBatchNorm) gets track_running_stats=False and running_mean=running_var=None, so
    it normalises with the current batch in train and eval mode alike. The official code does this for BatchNorm2d
    only; the test-time-adaptation repo forces BatchNorm1d into train mode instead, which also means batch
    statistics, so dropping BatchNorm1d's (then unused) buffers changes no output.

    By default the whole model is put in train mode (official CoTTA). `eval_mode=True` keeps the other layers in
    eval mode (dropout, stochastic depth off), as the test-time-adaptation repo does for Swin. Returns `model`.
    """
    model.train(not eval_mode)
    model.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def bn_affine_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """TENT's trained set (TENT §3 "modulation parameters"; `tent.collect_params`): BatchNorm weight and bias.

    Returns {qualified name: parameter}, in module order; `.values()` goes to the optimizer.
    """
    out = {}
    for module_name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            for name, p in m.named_parameters(recurse=False):
                out[f"{module_name}.{name}" if module_name else name] = p
    return out


def all_weight_bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """CoTTA's trained set (spec §1.5, `cotta.collect_params`): every parameter named weight or bias with grad.

    These are also the parameters stochastic restore resets (spec §1.2 step 9). Returns {qualified name: parameter}.
    """
    return {
        name: p
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] in ("weight", "bias") and p.requires_grad
    }


def _grouped_batch_norm(m: _BatchNorm, n_groups: int, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with batch statistics computed separately for each of `n_groups` contiguous slices of the batch.

    One native batch_norm per slice: exactly what a separate forward computes, and on a CPU faster than a
    hand-written grouped reduction (measured when this was written; the notes were not kept).
    """
    if x.shape[0] % n_groups:
        raise EngramError(f"per_view_batch_stats: batch of {x.shape[0]} is not a multiple of n_views={n_groups}.")
    return torch.cat([F.batch_norm(xg, None, None, m.weight, m.bias, True, 0.0, m.eps) for xg in x.chunk(n_groups)])


@contextmanager
def per_view_batch_stats(model: nn.Module, n_views: int) -> Iterator[nn.Module]:
    """Inside the block, a forward on [n_views * B, ...] normalises each of the n_views slices of B separately.

    CoTTA feeds each of its 32 augmented copies of a batch through the teacher on its own (spec §1.2 step 4), so
    each copy is normalised with its own batch statistics. Pooling the copies into one forward would normalise with
    statistics over all of them and change the outputs; this context keeps the per-copy statistics while running
    the convolutions once on the large batch. Only BatchNorm layers that use batch statistics (running_mean None,
    see `configure_for_tta`) are changed; the original forward is restored on exit, even after an exception.
    """
    if not isinstance(n_views, int) or n_views < 1:
        raise EngramError(f"per_view_batch_stats: n_views must be a positive integer, got {n_views!r}.")
    patched = []
    for name, m in model.named_modules() if n_views > 1 else ():
        if not isinstance(m, _BatchNorm):
            continue
        if m.running_mean is None:
            patched.append(m)
        elif m.training:
            raise EngramError(
                f"per_view_batch_stats: BatchNorm {name!r} tracks running statistics in train mode; "
                "call configure_for_tta(model) first."
            )
    try:
        for m in patched:
            m.forward = lambda x, m=m: _grouped_batch_norm(m, n_views, x)
        yield model
    finally:
        for m in patched:
            del m.forward


def forward_views(model: nn.Module, views: torch.Tensor, views_per_forward: int | None = None) -> torch.Tensor:
    """Logits of V views of a batch, each view normalised with its own batch statistics: [V, B, ...] -> [V, B, K].

    CoTTA's augmented teacher passes (spec §1.2 step 4). `views_per_forward` views go through one forward (under
    `per_view_batch_stats`); by default 1 on a CPU, where one huge batch was measured slower than V forwards of B
    (its activations fall out of cache; benchmarks/cotta_speed.py), and all V elsewhere. Inputs follow the memory
    format of the model's first 4-D weight (channels_last helps oneDNN convolutions on a CPU).
    """
    n_views, batch = views.shape[:2]
    if views_per_forward is None:
        views_per_forward = 1 if views.device.type == "cpu" else n_views
    if not isinstance(views_per_forward, int) or views_per_forward < 1:
        raise EngramError(f"forward_views: views_per_forward must be a positive integer, got {views_per_forward!r}.")
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    channels_last = (
        weight is not None
        and views.dim() == 5
        and not weight.is_contiguous()
        and weight.is_contiguous(memory_format=torch.channels_last)
    )
    logits = []
    for chunk in views.split(views_per_forward):  # [v, B, ...]
        flat = chunk.flatten(0, 1)  # [v*B, ...]
        if channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
        with per_view_batch_stats(model, len(chunk)):
            logits.append(model(flat).view(len(chunk), batch, -1))
    return torch.cat(logits)
