"""CoTTA's teacher augmentation (spec §1.4; `cifar/cotta.py::get_tta_transforms`, `cifar/my_transforms.py`).

CoTTA (Wang et al., CVPR 2022, arXiv 2203.13591) averages the EMA teacher's logits over N = 32 augmented copies
of each test batch (paper §3.2 Eq. 3, §4.1). Each copy ("view") draws ONE set of jitter/affine/blur/flip
parameters shared by all images of the batch; only the pixel noise is independent per image. On a batch
x [B, 3, H, W] in [0, 1] one view is, in order:

1. clip to [0, 1];
2. colour jitter with gamma, the five ops in a random order per view: brightness, contrast, saturation, hue, gamma
   (input clamped to >= 1e-8 before gamma);
3. pad by half the image size with edge replication;
4. random affine (rotation, integer-pixel translation, scale; bilinear; fill 0);
5. Gaussian blur, kernel 5;
6. center crop back to H x W;
7. horizontal flip with probability p;
8. additive Gaussian noise;
9. clip to [0, 1].

Parameter sampling (`sample_params`) is separate from applying them, and there are two appliers with the same
result: `apply_one` follows the torchvision ops of the official code one by one on one view (full padded canvas,
reflect-padded blur, crop, flip); `apply_params` applies V views in one vectorised pass. `apply_params` computes the
affine warp and blur only on the H+4 x W+4 window that survives the crop (the blur's reflect padding never reaches
it), samples the unpadded image with border clamping instead of materialising the padded canvas (a per-view
coverage map restores torchvision's zero fill outside it), and folds the flip into the sampling grid (blur and crop are
mirror-symmetric). `augment_views` and `augment_one` sample and apply in one call.

torchvision and kornia are not dependencies, so the ops are written here following torchvision's tensor code
(`transforms/_functional_tensor.py`, `functional.py`): same blend formulas, grayscale weights, affine matrix and
grid convention, Gaussian kernel, and RandomAffine's rounding of translations to whole pixels.
Hue is shifted in HSV, as torchvision's `adjust_hue` does, so the op means what it meant in the official code;
a YIQ rotation would be cheaper but is a different transform (it changes value and saturation). The HSV round
trip uses the closed form RGB_n = V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6H) mod 6 (n = 5, 3, 1), where
V and C (value and chroma) are unchanged by a hue shift; it equals torchvision's table-based `_hsv2rgb`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from engramlab.errors import EngramError

# Colour ops, indexed as in the official ColorJitterPro.forward (`fn_id` 0..4).
BRIGHTNESS, CONTRAST, SATURATION, HUE, GAMMA = range(5)
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale (ITU-R 601-2 luma)


@dataclass(frozen=True)
class AugmentPolicy:
    """Ranges of the augmentation (spec §1.4). Each (low, high) pair is sampled uniformly, once per view."""

    brightness: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.06, 0.06)  # shift of the HSV hue, in turns
    gamma: tuple[float, float] = (0.7, 1.3)
    rotation: tuple[float, float] = (-15.0, 15.0)  # degrees
    translate: float = 1 / 16  # max shift as a fraction of the padded size, rounded to whole pixels (torchvision)
    scale: tuple[float, float] = (0.9, 1.1)
    blur_kernel: int = 5
    blur_sigma: tuple[float, float] = (0.001, 0.5)
    flip_p: float = 0.5  # horizontal flip probability
    noise_std: float = 0.005  # per-pixel Gaussian noise

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and not (len(value) == 2 and value[0] <= value[1]):
                raise EngramError(f"AugmentPolicy.{f.name} must be a (low, high) pair with low <= high, got {value}.")
        checks = (
            ("brightness", self.brightness[0] >= 0, "must be >= 0"),
            ("contrast", self.contrast[0] >= 0, "must be >= 0"),
            ("saturation", self.saturation[0] >= 0, "must be >= 0"),
            ("hue", self.hue[0] >= -0.5 and self.hue[1] <= 0.5, "must lie in [-0.5, 0.5]"),
            ("gamma", self.gamma[0] > 0, "must be > 0"),
            ("translate", 0 <= self.translate <= 1, "must lie in [0, 1]"),
            ("scale", self.scale[0] > 0, "must be > 0"),
            (
                "blur_kernel",
                isinstance(self.blur_kernel, int) and self.blur_kernel > 0 and self.blur_kernel % 2,
                "must be a positive odd integer",
            ),
            ("blur_sigma", self.blur_sigma[0] > 0, "must be > 0"),
            ("flip_p", 0 <= self.flip_p <= 1, "must lie in [0, 1]"),
            ("noise_std", self.noise_std >= 0, "must be >= 0"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise EngramError(f"AugmentPolicy.{name} {rule}, got {getattr(self, name)}.")


# "cotta": the paper's (hard) variant; "soft": the code's unused soft variant (spec §1.4); "cotta-no-flip" for
# digits and other data where a mirrored image is a different image.
POLICIES: dict[str, AugmentPolicy] = {
    "cotta": AugmentPolicy(),
    "cotta-no-flip": AugmentPolicy(flip_p=0.0),
    "soft": AugmentPolicy(
        brightness=(0.8, 1.2),
        contrast=(0.85, 1.15),
        saturation=(0.75, 1.25),
        hue=(-0.03, 0.03),
        gamma=(0.85, 1.15),
        rotation=(-8.0, 8.0),
        scale=(0.95, 1.05),
        blur_sigma=(0.001, 0.25),
    ),
}


def get_policy(name: str) -> AugmentPolicy:
    """The named preset of `POLICIES`."""
    if name not in POLICIES:
        raise EngramError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICIES)}.")
    return POLICIES[name]


@dataclass(frozen=True)
class AugmentParams:
    """The random parameters of V views; every tensor has V rows, on the device it was sampled on."""

    order: torch.Tensor  # [V, 5] long: colour-op ids (BRIGHTNESS..GAMMA) in the order they are applied
    brightness: torch.Tensor  # [V]
    contrast: torch.Tensor  # [V]
    saturation: torch.Tensor  # [V]
    hue: torch.Tensor  # [V]
    gamma: torch.Tensor  # [V]
    angle: torch.Tensor  # [V] degrees
    translate: torch.Tensor  # [V, 2] (tx, ty) as fractions of the padded canvas' (width, height); see _inverse_affine
    scale: torch.Tensor  # [V]
    sigma: torch.Tensor  # [V] blur sigma
    flip: torch.Tensor  # [V] bool
    blur_kernel: int
    noise_std: float

    def __len__(self) -> int:
        return self.order.shape[0]

    def select(self, index: int | slice | torch.Tensor) -> AugmentParams:
        """The parameters of some views (an int keeps the view axis: length 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(
            self,
            **{
                f.name: getattr(self, f.name)[index]
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    def to(self, device: torch.device | str) -> AugmentParams:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    @classmethod
    def identity(cls, n_views: int, blur_kernel: int = 5) -> AugmentParams:
        """Parameters that leave an image unchanged (no jitter, affine, blur, flip or noise)."""
        ones, zeros = torch.ones(n_views), torch.zeros(n_views)
        return cls(
            order=torch.arange(5).repeat(n_views, 1),
            brightness=ones,
            contrast=ones,
            saturation=ones,
            hue=zeros,
            gamma=ones,
            angle=zeros,
            translate=torch.zeros(n_views, 2),
            scale=ones,
            sigma=torch.full((n_views,), 1e-3),
            flip=torch.zeros(n_views, dtype=torch.bool),
            blur_kernel=blur_kernel,
            noise_std=0.0,
        )


def sample_params(n_views: int, policy: AugmentPolicy, generator: torch.Generator | None = None) -> AugmentParams:
    """Draw the parameters of `n_views` views (spec §1.4), on the generator's device."""
    if not isinstance(n_views, int) or n_views < 1:
        raise EngramError(f"n_views must be a positive integer, got {n_views!r}.")
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n_views, 11, generator=generator, device=device)  # [V, 11] one column per scalar parameter
    order = torch.rand(n_views, 5, generator=generator, device=device).argsort(dim=1)  # uniform permutation

    def uniform(column: int, bounds: tuple[float, float]) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * u[:, column]

    return AugmentParams(
        order=order,
        brightness=uniform(0, policy.brightness),
        contrast=uniform(1, policy.contrast),
        saturation=uniform(2, policy.saturation),
        hue=uniform(3, policy.hue),
        gamma=uniform(4, policy.gamma),
        angle=uniform(5, policy.rotation),
        translate=(2 * u[:, 6:8] - 1) * policy.translate,  # [V, 2]
        scale=uniform(8, policy.scale),
        sigma=uniform(9, policy.blur_sigma),
        flip=u[:, 10] < policy.flip_p,
        blur_kernel=policy.blur_kernel,
        noise_std=policy.noise_std,
    )


# ---- colour ops on [..., 3, H, W] (torchvision's tensor formulas), in place where possible -----------------------
# In place because on a CPU most of the time of a vectorised augmentation goes to allocating and first-touching
# large temporaries, not to arithmetic.


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)  # [..., 1, H, W]


def _blend_(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """torchvision `_blend`: clamp(factor * x + (1 - factor) * other, 0, 1), written as (x - other) * f + other."""
    return x.sub_(other).mul_(factor).add_(other).clamp_(0, 1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns (torchvision `adjust_hue`: _rgb2hsv, h += shift mod 1, _hsv2rgb).

    `shift` broadcasts against [..., 1, H, W]. Returns a new tensor.
    """
    r, g, b = x.unbind(dim=-3)
    maxc = x.amax(dim=-3, keepdim=True)  # [..., 1, H, W]: value V
    chroma = maxc - x.amin(dim=-3, keepdim=True)  # C = V - min
    inverse = torch.where(chroma == 0, 1.0, chroma).reciprocal_()
    r, g, b, top = r.unsqueeze(-3), g.unsqueeze(-3), b.unsqueeze(-3), maxc
    # hexcone sector in [-1, 5) (torchvision's hr/hg/hb, with its priority red > green > blue among ties)
    sector = torch.where(
        top == r, g - b, torch.where(top == g, (b - r).add_(chroma, alpha=2), (r - g).add_(chroma, alpha=4))
    )
    h6 = sector.mul_(inverse).add_(6.0 * shift).remainder_(6.0)  # new hue in units of 60 degrees
    k = (h6 + torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)).remainder_(6.0)
    ramp = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0, 1)  # clamp(min(k, 4 - k), 0, 1)
    return ramp.mul_(chroma).neg_().add_(maxc)  # [..., 3, H, W]


def _colour_op_(op: int, x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """One of ColorJitterPro's five ops on x [..., 3, H, W] (one image per leading index); may overwrite x."""
    if op == BRIGHTNESS:
        return x.mul_(factor).clamp_(0, 1)
    if op == CONTRAST:  # blend with the image's mean gray (gray is linear: mean of gray = gray of channel means)
        return _blend_(x, _grayscale(x.mean(dim=(-2, -1), keepdim=True)), factor)
    if op == SATURATION:
        return _blend_(x, _grayscale(x), factor)
    if op == HUE:
        return _adjust_hue(x, factor)
    return x.clamp_(1e-8, 1.0).pow_(factor).clamp_(0, 1)  # GAMMA; the clamp avoids NaN gradients (official code)


def _factors(params: AugmentParams) -> torch.Tensor:
    """[V, 5] colour factors indexed by op id."""
    return torch.stack([params.brightness, params.contrast, params.saturation, params.hue, params.gamma], dim=1)


def _gaussian_kernel1d(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision `_get_gaussian_kernel1d` for each sigma: [V] -> [V, size], rows summing to 1."""
    half = (size - 1) * 0.5
    t = torch.linspace(-half, half, size, dtype=sigma.dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def _inverse_affine(params: AugmentParams, canvas: tuple[int, int]) -> torch.Tensor:
    """torchvision `_get_inverse_affine_matrix` (center 0, no shear) per view: [V, 2, 3], output -> input pixels.

    torchvision's RandomAffine draws tx ~ U(-t * W, t * W) on the (padded) canvas of width W and rounds it to a
    whole pixel; `params.translate` holds tx / W, so tx = round(translate * W) here. `canvas` is (H, W).
    """
    rot = torch.deg2rad(params.angle)
    cos, sin = torch.cos(rot) / params.scale, torch.sin(rot) / params.scale
    size = torch.tensor([canvas[1], canvas[0]], dtype=params.translate.dtype, device=params.translate.device)
    tx, ty = torch.round(params.translate * size).unbind(dim=1)
    row0 = torch.stack([cos, sin, -cos * tx - sin * ty], dim=1)
    row1 = torch.stack([-sin, cos, sin * tx - cos * ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def _check_input(x: torch.Tensor, params: AugmentParams, generator: torch.Generator | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise EngramError(f"augmentation input x must be an RGB batch [B, 3, H, W], got {shape}.")
    if not x.is_floating_point():
        raise EngramError(f"augmentation input x must be a float tensor in [0, 1], got dtype {x.dtype}.")
    if min(x.shape[-2:]) // 2 < params.blur_kernel // 2:
        raise EngramError(
            f"augmentation input of {x.shape[-2]}x{x.shape[-1]} px is too small for blur kernel "
            f"{params.blur_kernel} (needs at least {2 * (params.blur_kernel // 2)} px)."
        )
    if generator is not None and generator.device.type != x.device.type:
        raise EngramError(
            f"the generator is on {generator.device} but x is on {x.device}; "
            f"use torch.Generator(device={str(x.device)!r})."
        )


# ---- one view, the official sequence of ops --------------------------------------------------------------------


def apply_one(x: torch.Tensor, params: AugmentParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One view (len(params) == 1) on x [B, 3, H, W], op by op as torchvision runs it in the official code.

    Returns [B, 3, H, W]. Noise is drawn from `generator` (on x's device) after the parameters.
    """
    if len(params) != 1:
        raise EngramError(f"apply_one takes the parameters of one view, got {len(params)}; use apply_params.")
    _check_input(x, params, generator)
    p = params.to("cpu")
    height, width = x.shape[-2:]
    x = x.clamp(0, 1)
    factors = _factors(p)[0].tolist()
    for op in p.order[0].tolist():
        x = _colour_op_(op, x, factors[op])
    pad_h, pad_w = height // 2, width // 2
    x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="replicate")  # [B, 3, Hp, Wp]
    hp, wp = x.shape[-2:]
    # torchvision `_affine_grid`: output pixel centres relative to the canvas centre, mapped by the inverse matrix
    # and normalised by half the canvas size (align_corners=False).
    theta = _inverse_affine(p, (hp, wp))[0].to(x.dtype)  # [2, 3]
    xs = torch.linspace(-wp * 0.5 + 0.5, wp * 0.5 - 0.5, wp, dtype=x.dtype)
    ys = torch.linspace(-hp * 0.5 + 0.5, hp * 0.5 - 0.5, hp, dtype=x.dtype)
    base = torch.stack([xs.expand(hp, wp), ys[:, None].expand(hp, wp), torch.ones(hp, wp, dtype=x.dtype)], dim=-1)
    grid = (base @ theta.T) / torch.tensor([0.5 * wp, 0.5 * hp], dtype=x.dtype)  # [Hp, Wp, 2]
    grid = grid.to(x.device).expand(x.shape[0], hp, wp, 2)
    # torchvision `_apply_grid_transform` with fill 0: a channel of ones is warped along, and the zero-padded
    # result is blended with the fill by it (img * mask + (1 - mask) * 0).
    x = F.grid_sample(torch.cat([x, x.new_ones(x.shape[0], 1, hp, wp)], dim=1), grid, align_corners=False)
    x = x[:, :3] * x[:, 3:]
    k1 = _gaussian_kernel1d(p.sigma.to(x.dtype), p.blur_kernel)[0]
    kernel = torch.outer(k1, k1).to(x.device).expand(3, 1, p.blur_kernel, p.blur_kernel)
    half = p.blur_kernel // 2
    x = F.conv2d(F.pad(x, (half, half, half, half), mode="reflect"), kernel, groups=3)
    top, left = round((hp - height) / 2), round((wp - width) / 2)  # torchvision center_crop
    x = x[..., top : top + height, left : left + width]
    if bool(p.flip[0]):
        x = x.flip(-1)
    if p.noise_std > 0:
        x = x + torch.empty_like(x, memory_format=torch.contiguous_format).normal_(0, p.noise_std, generator=generator)
    return x.clamp(0, 1)


# ---- V views at once -------------------------------------------------------------------------------------------

# On a CPU, views are processed in chunks of about this many bytes of warped images: all ops are vectorised over
# the views of a chunk, and a chunk stays in cache (one 32-view tensor for B = 100 at 32x32 is 40 MB; measured
# 2-3x slower than chunks of a few MB when this was written). On other devices all views go in one chunk.
_CPU_CHUNK_BYTES = 4 * 2**20


def _colour_jitter_views(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Colour jitter of V views in 5 rounds; in round r each view runs its r-th op (x: [V, B, 3, H, W], overwritten).

    Views are grouped by the op they run this round, so every op is computed once per view in total.
    """
    factors = _factors(params).to(x.dtype).view(len(params), 5, 1, 1, 1, 1)  # [V, 5, 1, 1, 1, 1]
    order = params.order.tolist()  # one host sync for V x 5 ids
    for r in range(5):
        for op in range(5):
            views = [v for v, ops in enumerate(order) if ops[r] == op]
            if len(views) == len(order):
                x = _colour_op_(op, x, factors[:, op])
            elif views:
                idx = torch.tensor(views, device=x.device)
                x.index_copy_(0, idx, _colour_op_(op, x.index_select(0, idx), factors[idx, op]))
    return x


def _warp_blur_views(x: torch.Tensor, params: AugmentParams, out: torch.Tensor) -> None:
    """Steps 3-7 (pad, affine, blur, crop, flip) of V views x [V, B, 3, H, W], blurred result added onto `out`."""
    n_views, batch, _, height, width = x.shape
    dtype, device = x.dtype, x.device
    pad_h, pad_w = height // 2, width // 2
    hp, wp, half = height + 2 * pad_h, width + 2 * pad_w, params.blur_kernel // 2
    oh, ow = height + 2 * half, width + 2 * half  # the window of the canvas that survives blur + crop
    # Output pixel centres of the window relative to the canvas centre (torchvision `_affine_grid`).
    xs = torch.arange(pad_w - half, pad_w + width + half, dtype=dtype, device=device) - (wp - 1) / 2  # [ow]
    ys = torch.arange(pad_h - half, pad_h + height + half, dtype=dtype, device=device) - (hp - 1) / 2  # [oh]
    base = torch.stack(
        [xs.expand(oh, ow), ys[:, None].expand(oh, ow), torch.ones(oh, ow, dtype=dtype, device=device)], dim=-1
    )
    # Flip: blur and crop are mirror-symmetric, so flipping the result = sampling at mirrored x positions.
    theta = _inverse_affine(params, (hp, wp)).to(dtype)  # [V, 2, 3]
    theta[:, :, 0] *= (1.0 - 2.0 * params.flip.to(dtype)).view(-1, 1)
    src = torch.einsum("hwk,vjk->vhwj", base, theta)  # [V, oh, ow, 2] source pixel offsets from the canvas centre
    # Sampling the unpadded image with border clamping equals sampling the edge-padded canvas inside the canvas.
    # Outside it torchvision's grid_sample pads with 0: the bilinear weight left inside is clamp(1 - distance past
    # the outermost pixel centre, 0, 1) per axis (exactly 1 inside), the "coverage". torchvision then blends with
    # the fill value 0 by the warped mask channel, which is that coverage again: multiply by coverage**2 where < 1.
    outermost = torch.tensor([(wp - 1) / 2, (hp - 1) / 2], dtype=dtype, device=device)
    coverage = (1 - (src.abs() - outermost).clamp_(min=0)).clamp_(min=0).prod(dim=-1)  # [V, oh, ow]
    half_image = torch.tensor([width / 2, height / 2], dtype=dtype, device=device)
    planes = x.view(n_views, batch * 3, height, width)  # [V, B*3, H, W]: one grid per view serves all images
    warped = F.grid_sample(planes, src / half_image, mode="bilinear", padding_mode="border", align_corners=False)
    if bool((coverage < 1).any()):
        warped.mul_(coverage.square_().unsqueeze(1))  # [V, B*3, oh, ow]
    # Separable Gaussian blur with per-view kernels on the valid region: rows, then columns into `out`.
    k1 = _gaussian_kernel1d(params.sigma.to(dtype), params.blur_kernel).view(n_views, -1, 1, 1, 1)  # [V, k, 1,1,1]
    rows = warped[..., 0:height, :] * k1[:, 0]  # [V, B*3, H, ow]
    for t in range(1, params.blur_kernel):
        rows.addcmul_(warped[..., t : t + height, :], k1[:, t])
    out = out.view(n_views, batch * 3, height, width)
    for t in range(params.blur_kernel):
        out.addcmul_(rows[..., t : t + width], k1[:, t])


def apply_params(
    x: torch.Tensor,
    params: AugmentParams,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = None,
) -> torch.Tensor:
    """All V views of `params` on x [B, 3, H, W] -> [V, B, 3, H, W], vectorised over views.

    Equal to `apply_one` view by view up to float rounding (for V = 1 with the same generator state, noise
    included). Views are computed `views_per_chunk` at a time (default: chunks of about `_CPU_CHUNK_BYTES` on a
    CPU, all views at once elsewhere); every view starts from its own copy of the clipped batch, and x is never
    written. Noise is drawn from `generator` (on x's device) as one [V, B, 3, H, W] tensor before any view is
    computed, so the result does not depend on the chunking.
    """
    _check_input(x, params, generator)
    if views_per_chunk is not None and (
        isinstance(views_per_chunk, bool) or not isinstance(views_per_chunk, int) or views_per_chunk < 1
    ):
        raise EngramError(f"views_per_chunk must be a positive integer, got {views_per_chunk!r}.")
    params = params.to(x.device)
    n_views, (batch, _, height, width) = len(params), x.shape
    out = torch.empty(n_views, batch, 3, height, width, dtype=x.dtype, device=x.device)
    if params.noise_std > 0:
        out.normal_(0, params.noise_std, generator=generator)
    else:
        out.zero_()
    per_chunk = views_per_chunk or n_views
    if views_per_chunk is None and x.device.type == "cpu":
        half = params.blur_kernel // 2
        view_bytes = batch * 3 * (height + 2 * half) * (width + 2 * half) * x.element_size()
        per_chunk = max(1, _CPU_CHUNK_BYTES // view_bytes)
    for start in range(0, n_views, per_chunk):
        chunk = params.select(slice(start, start + per_chunk))
        # A fresh buffer per chunk, filled with the clipped batch: the colour ops below work in place, so the
        # views must not share memory with x or with each other. (`x.expand(1, ...).contiguous()` would return
        # x itself, a size-1 expanded dimension counting as contiguous, and each view would carry the jitter of
        # the views before it; issue 24.)
        views = torch.empty(len(chunk), *x.shape, dtype=x.dtype, device=x.device)  # [v, B, 3, H, W]
        torch.clamp(x.expand_as(views), 0, 1, out=views)
        _warp_blur_views(_colour_jitter_views(views, chunk), chunk, out[start : start + len(chunk)])
    return out.clamp_(0, 1)


def augment_views(
    x: torch.Tensor,
    n_views: int,
    policy: AugmentPolicy,
    generator: torch.Generator | None = None,
    views_per_chunk: int | None = None,
) -> torch.Tensor:
    """CoTTA's N augmented copies of a batch (spec §1.4): x [B, 3, H, W] in [0, 1] -> [n_views, B, 3, H, W].

    `generator` (on x's device, or None for the global RNG) draws parameters then noise; the views are the same
    for every `views_per_chunk` (see `apply_params`).
    """
    params = sample_params(n_views, policy, generator)
    return apply_params(x, params, generator, views_per_chunk)


def augment_one(x: torch.Tensor, policy: AugmentPolicy, generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmented copy of a batch, the official sequential way: x [B, 3, H, W] -> [B, 3, H, W].

    Draws exactly what `augment_views(x, 1, policy, generator)[0]` draws and returns the same image up to float
    rounding; calling it N times is the official loop of N separate augmentations.
    """
    params = sample_params(1, policy, generator)
    return apply_one(x, params, generator)
