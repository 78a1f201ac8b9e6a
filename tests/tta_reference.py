"""A plain re-implementation of the official CoTTA / TENT / BN-adapt code, the reference of the parity tests and of
`benchmarks/cotta_speed.py` (issue 24).

Written from the spec (`shared/papers/cotta.md` §1.2–1.6) in the shape of the official code: `qinenergy/cotta`
`cifar/cotta.py` (`forward_and_adapt`, `get_tta_transforms`), `cifar/my_transforms.py` (`ColorJitterPro`,
`GaussianNoise`, `Clip`), `cifar/norm.py`, and `DequanWang/tent` `tent.py`. Nothing here imports engramlab's TTA code,
so the tests compare two independent implementations.

torchvision is not a dependency (its wheel pulls a CUDA torch), so the torchvision transforms the official
augmentation composes are written out below with plain torch, following torchvision's tensor code
(`transforms/_functional_tensor.py`, `functional.py`, `transforms.py`) op by op and in its order of random draws:
`ColorJitterPro` draws a permutation of its five ops and then each op's factor when it runs; `RandomAffine` draws
angle, translation (rounded to whole pixels), scale; `GaussianBlur` its sigma; `RandomHorizontalFlip` one uniform;
`GaussianNoise` a normal tensor of the batch's shape. The official code draws from torch's global RNG; here every
draw comes from one `torch.Generator`, which changes no distribution.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ---- torchvision's tensor ops (the parts get_tta_transforms uses) --------------------------------------------------


def rgb_to_grayscale(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(dim=-3)


def _blend(img1: torch.Tensor, img2: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0, 1.0)


def adjust_brightness(img: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(img, torch.zeros_like(img), factor)


def adjust_contrast(img: torch.Tensor, factor: float) -> torch.Tensor:
    mean = torch.mean(rgb_to_grayscale(img), dim=(-3, -2, -1), keepdim=True)
    return _blend(img, mean, factor)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    return _blend(img, rgb_to_grayscale(img), factor)


def _rgb2hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    maxc = torch.max(img, dim=-3).values
    minc = torch.min(img, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv2rgb(img: torch.Tensor) -> torch.Tensor:
    h, s, v = img.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(dtype=torch.int32)
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    i = i % 6
    mask = i.unsqueeze(dim=-3) == torch.arange(6, device=i.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(dtype=img.dtype), a4)


def adjust_hue(img: torch.Tensor, factor: float) -> torch.Tensor:
    h, s, v = _rgb2hsv(img).unbind(dim=-3)
    return _hsv2rgb(torch.stack(((h + factor) % 1.0, s, v), dim=-3))


def adjust_gamma(img: torch.Tensor, gamma: float, gain: float = 1.0) -> torch.Tensor:
    return (gain * img**gamma).clamp(0, 1)


def _inverse_affine_matrix(angle: float, translate: tuple[float, float], scale: float) -> list[float]:
    """torchvision `_get_inverse_affine_matrix` with center (0, 0) (the tensor path) and no shear."""
    rot = math.radians(angle)
    a, b, c, d = math.cos(rot), -math.sin(rot), math.sin(rot), math.cos(rot)
    matrix = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    tx, ty = translate
    matrix[2] += matrix[0] * -tx + matrix[1] * -ty
    matrix[5] += matrix[3] * -tx + matrix[4] * -ty
    return matrix


def affine(img: torch.Tensor, angle: float, translate: tuple[int, int], scale: float) -> torch.Tensor:
    """torchvision `F.affine` on a tensor: bilinear; fill 0 via the warped mask channel (`_apply_grid_transform`)."""
    n, channels, h, w = img.shape
    theta = torch.tensor(_inverse_affine_matrix(angle, translate, scale), dtype=img.dtype).reshape(1, 2, 3)
    # _gen_affine_grid
    base = torch.empty(1, h, w, 3, dtype=img.dtype)
    base[..., 0].copy_(torch.linspace(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, steps=w))
    base[..., 1].copy_(torch.linspace(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, steps=h).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=img.dtype)
    grid = base.view(1, h * w, 3).bmm(rescaled).view(1, h, w, 2).expand(n, h, w, 2)
    with_mask = torch.cat((img, torch.ones(n, 1, h, w, dtype=img.dtype)), dim=1)
    out = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = out[:, -1:].expand(n, channels, h, w)
    return out[:, :-1] * mask  # + (1 - mask) * fill, fill = 0


def gaussian_blur(
    img: torch.Tensor, kernel_size: int, sigma: float, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """torchvision `gaussian_blur`: reflect padding, then one depthwise conv2d with the outer-product kernel.

    torchvision calls conv2d on the contiguous tensor. On a CPU oneDNN's depthwise path for 3 channels is then
    ~5-7x slower than the same convolution in channels_last (measured here, torch 2.13); `memory_format` picks the
    layout (same result up to float rounding) so that tests need not wait on it.
    """
    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=kernel_size) / sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(img.dtype)
    kernel = torch.mm(k1[:, None], k1[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    padded = F.pad(img, [pad, pad, pad, pad], mode="reflect").contiguous(memory_format=memory_format)
    return F.conv2d(padded, kernel, groups=img.shape[-3]).contiguous()


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return img[..., top : top + size, left : left + size]


# ---- get_tta_transforms ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialPolicy:
    """The ranges of `get_tta_transforms` (hard variant; `soft=True` in the official code halves most of them)."""

    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.06, 0.06)
    gamma: tuple[float, float] = (0.7, 1.3)
    degrees: tuple[float, float] = (-15.0, 15.0)
    translate: float = 1 / 16
    scale: tuple[float, float] = (0.9, 1.1)
    blur_sigma: tuple[float, float] = (0.001, 0.5)
    p_hflip: float = 0.5
    gaussian_std: float = 0.005


@dataclass
class ViewDraws:
    """Every random number one call of the official transform draws, in draw order."""

    order: list[int]  # ColorJitterPro's fn_idx (0 brightness, 1 contrast, 2 saturation, 3 hue, 4 gamma)
    factors: dict[int, float]  # fn_id -> factor
    angle: float
    translate: tuple[int, int]  # whole pixels (tx, ty)
    scale: float
    sigma: float
    flip: bool
    noise: torch.Tensor  # [B, 3, H, W] standard normal (times the std when applied)


def _uniform(low: float, high: float, g: torch.Generator) -> float:
    return torch.empty(1).uniform_(low, high, generator=g).item()


def draw_view(shape: torch.Size, policy: OfficialPolicy, g: torch.Generator) -> ViewDraws:
    """The draws of one transform call on a batch of `shape` [B, 3, H, W], in the official order."""
    order = torch.randperm(5, generator=g).tolist()
    ranges = (policy.brightness, policy.contrast, policy.saturation, policy.hue, policy.gamma)
    factors = {fn_id: _uniform(*ranges[fn_id], g) for fn_id in order}
    padded_h, padded_w = shape[-2] + 2 * (shape[-2] // 2), shape[-1] + 2 * (shape[-1] // 2)
    angle = _uniform(*policy.degrees, g)
    max_dx, max_dy = policy.translate * padded_w, policy.translate * padded_h
    tx = round(_uniform(-max_dx, max_dx, g))
    ty = round(_uniform(-max_dy, max_dy, g))
    scale = _uniform(*policy.scale, g)
    sigma = _uniform(*policy.blur_sigma, g)
    flip = bool(torch.rand(1, generator=g) < policy.p_hflip)
    noise = torch.randn(shape, generator=g)
    return ViewDraws(order, factors, angle, (tx, ty), scale, sigma, flip, noise)


def apply_view(
    img: torch.Tensor,
    d: ViewDraws,
    gaussian_std: float = 0.005,
    blur_memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """`get_tta_transforms()(img)` with the given draws: [B, 3, H, W] -> [B, 3, H, W]."""
    size = img.shape[-1]
    img = torch.clip(img, 0.0, 1.0)  # Clip
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue, adjust_gamma)
    for fn_id in d.order:  # ColorJitterPro
        if fn_id == 4:
            img = img.clamp(1e-8, 1.0)
        img = ops[fn_id](img, d.factors[fn_id])
    pad = size // 2
    img = F.pad(img, [pad, pad, pad, pad], mode="replicate")  # Pad(padding_mode="edge")
    img = affine(img, d.angle, d.translate, d.scale)  # RandomAffine
    img = gaussian_blur(img, 5, d.sigma, blur_memory_format)  # GaussianBlur
    img = center_crop(img, size)  # CenterCrop
    if d.flip:  # RandomHorizontalFlip
        img = img.flip(-1)
    img = img + d.noise * gaussian_std  # GaussianNoise(0, std)
    return torch.clip(img, 0.0, 1.0)  # Clip


class OfficialTransform:
    """`get_tta_transforms(...)` as a callable: one fresh set of draws from `generator` per call."""

    def __init__(
        self,
        policy: OfficialPolicy = OfficialPolicy(),
        generator: torch.Generator | None = None,
        blur_memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.policy = policy
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.blur_memory_format = blur_memory_format

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        draws = draw_view(img.shape, self.policy, self.generator)
        return apply_view(img, draws, self.policy.gaussian_std, self.blur_memory_format)


# ---- the updates ----------------------------------------------------------------------------------------------


def configure_model(model: nn.Module) -> nn.Module:
    """`configure_model` of cotta.py / tent.py: train mode, BatchNorm2d on batch statistics, no running buffers."""
    model.train()
    model.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def softmax_entropy(x: torch.Tensor, x_ema: torch.Tensor) -> torch.Tensor:
    return -(x_ema.softmax(1) * x.log_softmax(1)).sum(1)


class OfficialNorm(nn.Module):
    """cifar/norm.py: the source model in eval mode with every BatchNorm2d in train mode (normalising with the
    test batch; the running statistics it keeps updating are never read)."""

    def __init__(self, model: nn.Module, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.eps, m.momentum = eps, momentum

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class OfficialTent(nn.Module):
    """tent.py: entropy minimisation of the BatchNorm2d affine parameters, one Adam step per batch, returning the
    logits of the forward it adapted on."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = configure_model(copy.deepcopy(model))
        self.model.requires_grad_(False)
        params = []
        for m in self.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(True)
                params += [m.weight, m.bias]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    @torch.enable_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        loss = softmax_entropy(outputs, outputs).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return outputs.detach()


class OfficialCoTTA(nn.Module):
    """cotta.py `CoTTA.forward_and_adapt` (CIFAR): student, EMA teacher, anchor; the N augmented teacher passes run
    on every batch, one sequential transform + forward each; soft cross-entropy; Adam; EMA; stochastic restore with
    a mask drawn on the CPU per weight/bias (from `restore_generator` here, from the global RNG there)."""

    def __init__(
        self,
        model: nn.Module,
        transform,
        lr: float = 1e-3,
        mt: float = 0.999,
        rst: float = 0.01,
        ap: float = 0.92,
        n_augmentations: int = 32,
        restore_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.model = configure_model(copy.deepcopy(model))
        params = [
            p
            for _, m in self.model.named_modules()
            for name, p in m.named_parameters(recurse=False)
            if name in ("weight", "bias") and p.requires_grad
        ]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.model_state = copy.deepcopy(self.model.state_dict())
        self.model_anchor = copy.deepcopy(self.model)
        self.model_ema = copy.deepcopy(self.model)
        for p in self.model_ema.parameters():
            p.detach_()
        self.transform, self.mt, self.rst, self.ap, self.n = transform, mt, rst, ap, n_augmentations
        self.restore_generator = restore_generator
        self.last_gate = False

    @torch.enable_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.model(x)
        anchor_prob = torch.nn.functional.softmax(self.model_anchor(x), dim=1).max(1)[0]
        standard_ema = self.model_ema(x)
        outputs_emas = [self.model_ema(self.transform(x)).detach() for _ in range(self.n)]
        self.last_gate = bool(anchor_prob.mean(0) < self.ap)
        outputs_ema = torch.stack(outputs_emas).mean(0) if self.last_gate else standard_ema
        loss = softmax_entropy(outputs, outputs_ema).mean(0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        for ema_param, param in zip(self.model_ema.parameters(), self.model.parameters(), strict=True):
            ema_param.data[:] = self.mt * ema_param[:].data[:] + (1 - self.mt) * param[:].data[:]
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters(recurse=False):
                if npp in ("weight", "bias") and p.requires_grad:
                    mask = (torch.rand(p.shape, generator=self.restore_generator) < self.rst).float()
                    with torch.no_grad():
                        p.data = self.model_state[f"{nm}.{npp}" if nm else npp] * mask + p * (1.0 - mask)
        return outputs_ema.detach()
