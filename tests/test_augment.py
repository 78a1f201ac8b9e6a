"""CoTTA augmentation (spec §1.4) and the BatchNorm set-up of test-time adaptation (spec §1.5).

References: hand computations (integer shifts, 90-degree rotation, brightness-then-gamma), Python's `colorsys` for
the hue shift, the sequential official-style path `apply_one` for the vectorised `apply_params`, and separate
forwards for `per_view_batch_stats`.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from engramlab.errors import EngramError
from engramlab.tta.augment import (
    _CPU_CHUNK_BYTES,
    BRIGHTNESS,
    GAMMA,
    HUE,
    POLICIES,
    AugmentParams,
    AugmentPolicy,
    _adjust_hue,
    apply_one,
    apply_params,
    augment_one,
    augment_views,
    get_policy,
    sample_params,
)
from engramlab.tta.vision import (
    SmallResNet,
    all_weight_bias_parameters,
    bn_affine_parameters,
    configure_for_tta,
    forward_views,
    per_view_batch_stats,
)

COTTA = get_policy("cotta")


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def identity(n_views: int = 1, **changes) -> AugmentParams:
    return replace(AugmentParams.identity(n_views), **changes)


# ---- augmentation ----------------------------------------------------------------------------------------------


def test_shape_range_and_reproducible(images):
    views = augment_views(images, 7, COTTA, torch.Generator().manual_seed(3))
    again = augment_views(images, 7, COTTA, torch.Generator().manual_seed(3))
    other = augment_views(images, 7, COTTA, torch.Generator().manual_seed(4))
    assert views.shape == (7, 5, 3, 32, 32)
    assert views.min() >= 0 and views.max() <= 1
    assert torch.equal(views, again)
    assert not torch.allclose(views, other)
    assert not torch.allclose(views[0], views[1])  # views differ from each other


def test_identity_parameters_leave_image_unchanged(images):
    torch.testing.assert_close(apply_params(images, identity(3)), images.expand(3, *images.shape), atol=2e-6, rtol=0)
    torch.testing.assert_close(apply_one(images, identity()), images, atol=2e-6, rtol=0)


def test_flip_parameter_flips(images):
    params = identity(2, flip=torch.tensor([True, False]))
    out = apply_params(images, params)
    torch.testing.assert_close(out[0], images.flip(-1), atol=2e-6, rtol=0)
    torch.testing.assert_close(out[1], images, atol=2e-6, rtol=0)
    torch.testing.assert_close(apply_one(images, params.select(0)), images.flip(-1), atol=2e-6, rtol=0)


def test_affine_matches_hand_computation(images):
    # tx = 3, ty = -2 whole pixels: content moves right 3 and up 2; uncovered border replicates the edge.
    moved = apply_params(images, identity(translate=torch.tensor([[3.2, -1.9]]) / 64))[0]  # 64 px padded canvas
    expected = images[..., torch.arange(32).add(2).clamp(max=31), :][..., torch.arange(32).sub(3).clamp(min=0)]
    torch.testing.assert_close(moved, expected, atol=2e-6, rtol=0)
    # +90 degrees is clockwise in torchvision's affine (the crop of the rotated canvas is the rotated image).
    turned = apply_params(images, identity(angle=torch.tensor([90.0])))[0]
    torch.testing.assert_close(turned, torch.rot90(images, k=-1, dims=(-2, -1)), atol=2e-5, rtol=0)


def test_hue_shift_matches_colorsys():
    rgb = torch.rand(400, 3, generator=torch.Generator().manual_seed(1))
    rgb[:20, 1] = rgb[:20, 0]  # ties between max channels
    rgb[20:40] = rgb[20:40, :1]  # grays
    for shift in (0.05, -0.06, 0.5):
        ours = _adjust_hue(rgb.T.reshape(3, 20, 20), shift).reshape(3, -1).T
        ref = []
        for r, g, b in rgb.tolist():
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            ref.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
        torch.testing.assert_close(ours, torch.tensor(ref), atol=1e-5, rtol=0)


def test_colour_op_order_is_applied_as_drawn(images):
    factors = {"brightness": torch.tensor([1.4, 1.4]), "gamma": torch.tensor([0.7, 0.7])}
    first_b = [BRIGHTNESS, GAMMA, 1, 2, HUE]
    first_g = [GAMMA, BRIGHTNESS, 1, 2, HUE]
    out = apply_params(images, identity(2, order=torch.tensor([first_b, first_g]), **factors))
    torch.testing.assert_close(out[0], (1.4 * images).clamp(0, 1) ** 0.7, atol=2e-6, rtol=0)
    torch.testing.assert_close(out[1], (1.4 * images**0.7).clamp(0, 1), atol=2e-6, rtol=0)


def test_random_order_varies_across_views():
    order = sample_params(32, COTTA, torch.Generator().manual_seed(0)).order
    assert sorted(order[0].tolist()) == list(range(5))
    assert len({tuple(o) for o in order.tolist()}) >= 16  # 32 draws of 120 permutations
    position_counts = torch.stack(
        [(sample_params(4000, COTTA, torch.Generator().manual_seed(1)).order == op).float().mean(0) for op in range(5)]
    )  # [op, position] frequency
    torch.testing.assert_close(position_counts, torch.full((5, 5), 0.2), atol=0.03, rtol=0)


@pytest.mark.parametrize("policy", ["cotta", "soft"])
def test_batched_equals_sequential_for_fixed_params(images, policy):
    params = replace(sample_params(8, get_policy(policy), torch.Generator().manual_seed(5)), noise_std=0.0)
    batched = apply_params(images, params)
    for v in range(8):
        torch.testing.assert_close(batched[v], apply_one(images, params.select(v)), atol=1e-5, rtol=0)


def test_batched_equals_sequential_where_zero_fill_shows(images):
    wild = AugmentPolicy(rotation=(-60.0, 60.0), scale=(0.3, 0.5), translate=0.3)
    params = replace(sample_params(4, wild, torch.Generator().manual_seed(2)), noise_std=0.0)
    batched = apply_params(images, params)
    assert (batched == 0).float().mean() > 0.3  # the canvas' zero fill is inside the crop
    for v in range(4):
        torch.testing.assert_close(batched[v], apply_one(images, params.select(v)), atol=1e-5, rtol=0)


def test_one_view_paths_draw_the_same_image_with_noise(images):
    views = augment_views(images, 1, COTTA, torch.Generator().manual_seed(9))
    one = augment_one(images, COTTA, torch.Generator().manual_seed(9))
    torch.testing.assert_close(views[0], one, atol=1e-5, rtol=0)
    assert (one - images).abs().mean() > 0.01


# ---- issue 24: a batch large enough to be cut into one-view chunks on a CPU ----------------------------------------


@pytest.fixture(scope="module")
def large_batch() -> torch.Tensor:
    """200 images (the CIFAR protocol's batch): at 32 px the default CPU chunk holds a single view."""
    x = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    half = COTTA.blur_kernel // 2
    assert _CPU_CHUNK_BYTES // (200 * 3 * (32 + 2 * half) ** 2 * x.element_size()) == 1
    return x


def test_views_do_not_depend_on_the_chunk_size_and_the_batch_is_not_written(large_batch):
    before = large_batch.clone()
    everything = augment_views(large_batch, 12, COTTA, torch.Generator().manual_seed(3), views_per_chunk=12)
    assert torch.equal(large_batch, before)
    for chunk in (1, 2, 5, None):  # None: the CPU default (1 view here); 5: chunks of 5, 5 and 2
        views = augment_views(large_batch, 12, COTTA, torch.Generator().manual_seed(3), views_per_chunk=chunk)
        torch.testing.assert_close(views, everything, atol=1e-5, rtol=0)
        assert torch.equal(large_batch, before)  # bit-identical after every call
    # The jitter of one view does not leak into the next: view v is the same whatever views come before it.
    params = sample_params(12, COTTA, torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        apply_params(large_batch, replace(params.select(slice(8, 12)), noise_std=0.0), views_per_chunk=1),
        apply_params(large_batch, replace(params, noise_std=0.0), views_per_chunk=1)[8:],
        atol=1e-5,
        rtol=0,
    )


def test_every_view_equals_the_sequential_one_with_the_same_draws(large_batch):
    g = torch.Generator().manual_seed(11)
    views = augment_views(large_batch, 32, COTTA, g)
    g = torch.Generator().manual_seed(11)
    params = sample_params(32, COTTA, g)  # the draws augment_views made: parameters, then the noise
    noise = torch.empty(32, *large_batch.shape).normal_(0, COTTA.noise_std, generator=g)
    for v in range(32):
        one = apply_one(large_batch, replace(params.select(v), noise_std=0.0))
        torch.testing.assert_close(views[v], (one + noise[v]).clamp(0, 1), atol=1e-5, rtol=0)
    first = augment_one(large_batch, COTTA, torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        augment_views(large_batch, 1, COTTA, torch.Generator().manual_seed(5))[0], first, atol=1e-5, rtol=0
    )


def test_views_per_chunk_is_validated(images):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(EngramError, match="views_per_chunk"):
            augment_views(images, 2, COTTA, views_per_chunk=bad)


def test_parameter_distribution():
    p = sample_params(20000, COTTA, torch.Generator().manual_seed(0))
    for name, (low, high) in [
        ("brightness", COTTA.brightness),
        ("contrast", COTTA.contrast),
        ("saturation", COTTA.saturation),
        ("hue", COTTA.hue),
        ("gamma", COTTA.gamma),
        ("angle", COTTA.rotation),
        ("scale", COTTA.scale),
        ("sigma", COTTA.blur_sigma),
    ]:
        values = getattr(p, name)
        assert low <= values.min() and values.max() <= high, name
        assert abs(values.mean().item() - (low + high) / 2) < 0.02 * (high - low), name
        assert abs(values.std().item() - (high - low) / 12**0.5) < 0.02 * (high - low), name
    # translate: up to 1/16 of the 64-px padded canvas, applied rounded to whole pixels (torchvision RandomAffine)
    assert p.translate.abs().max() <= 1 / 16 and abs(p.translate.std().item() - 1 / 16 / 3**0.5) < 0.002
    pixels = torch.round(p.translate * 64)
    assert set(pixels.unique().tolist()) == set(range(-4, 5))
    assert abs((pixels == 4).float().mean().item() - 0.5 / 8) < 0.005  # the end pixels get half a bin
    assert abs(p.flip.float().mean().item() - 0.5) < 0.02
    assert (
        not get_policy("cotta-no-flip").flip_p
        and not sample_params(100, get_policy("cotta-no-flip"), torch.Generator().manual_seed(0)).flip.any()
    )


def _view_features(views: torch.Tensor) -> torch.Tensor:
    """Per view: mean, contrast, sharpness (mean |horizontal difference|), mirrored (right half darker)."""
    mirrored = views[..., :16].mean(dim=(1, 2, 3, 4)) > views[..., 16:].mean(dim=(1, 2, 3, 4))
    return torch.stack(
        [
            views.mean(dim=(1, 2, 3, 4)),
            views.std(dim=(1, 2, 3, 4)),
            views.diff(dim=-1).abs().mean(dim=(1, 2, 3, 4)),
            mirrored.float(),
        ],
        dim=1,
    )  # [V, 4]


def test_batched_and_sequential_outputs_have_the_same_statistics(images):
    ramp = torch.linspace(0.1, 0.9, 32).expand(5, 3, 32, 32)  # brighter to the right
    images = 0.5 * images + 0.5 * ramp
    g = torch.Generator().manual_seed(0)
    n = 400
    batched = _view_features(augment_views(images, n, COTTA, g))
    sequential = _view_features(torch.stack([augment_one(images, COTTA, g) for _ in range(n)]))
    no_flip = _view_features(augment_views(images, n, get_policy("cotta-no-flip"), g))
    standard_error = ((batched.var(0) + sequential.var(0)) / n).sqrt()
    assert ((batched.mean(0) - sequential.mean(0)).abs() < 4 * standard_error).all()
    assert (batched.std(0) / sequential.std(0) - 1).abs().max() < 0.15
    assert abs(batched[:, 3].mean() - 0.5) < 0.08 and no_flip[:, 3].sum() == 0  # the mirrored feature is sensitive


def test_bad_inputs_raise():
    with pytest.raises(EngramError, match="cotta, cotta-no-flip, soft"):
        get_policy("katana")
    assert set(POLICIES) == {"cotta", "cotta-no-flip", "soft"}
    with pytest.raises(EngramError, match=re.escape("AugmentPolicy.scale")):
        AugmentPolicy(scale=(1.1, 0.9))
    with pytest.raises(EngramError, match="blur_kernel"):
        AugmentPolicy(blur_kernel=4)
    with pytest.raises(EngramError, match=r"\[B, 3, H, W\]"):
        augment_views(torch.rand(3, 32, 32), 2, COTTA)
    with pytest.raises(EngramError, match="float"):
        augment_views(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 2, COTTA)
    with pytest.raises(EngramError, match="n_views"):
        augment_views(torch.rand(1, 3, 32, 32), 0, COTTA)
    with pytest.raises(EngramError, match="one view"):
        apply_one(torch.rand(1, 3, 32, 32), AugmentParams.identity(2))


# ---- model and BatchNorm set-up --------------------------------------------------------------------------------


@pytest.fixture
def tta_model() -> nn.Module:
    torch.manual_seed(0)
    return configure_for_tta(SmallResNet(n_classes=7, width=8))


def test_small_resnet_shapes():
    model = SmallResNet(n_classes=7, width=8, blocks_per_stage=2)
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 7)
    model(torch.rand(3, 3, 32, 32)).logsumexp(1).sum().backward()  # in-place ReLUs leave autograd intact
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 1 + 3 * 2 * 2 + 2  # stem, blocks, shortcuts
    with pytest.raises(EngramError, match="width"):
        SmallResNet(width=0)


def test_configure_for_tta_uses_batch_statistics(tta_model, images):
    bns = [m for m in tta_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.running_mean is None and m.running_var is None and not m.track_running_stats for m in bns)
    assert tta_model.training and all(p.requires_grad for p in tta_model.parameters())
    assert not any("running" in name for name in tta_model.state_dict())
    other = torch.rand(5, 3, 32, 32)
    first = tta_model(images)
    tta_model(other)  # no state carried between calls
    torch.testing.assert_close(tta_model(images), first)
    torch.testing.assert_close(tta_model.eval()(images), first)  # batch statistics in eval mode too
    assert not torch.allclose(tta_model(torch.cat([images, other]))[:5], first)  # statistics are the batch's
    # one layer by hand: (x - batch mean) / sqrt(batch var + eps), biased variance
    bn = bns[0]
    h = torch.randn(4, bn.num_features, 6, 6)
    mean, var = h.mean(dim=(0, 2, 3), keepdim=True), h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(bn(h), (h - mean) / torch.sqrt(var + bn.eps))


def test_configure_for_tta_on_other_batchnorm_models():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2)).eval()
    configure_for_tta(model, eval_mode=True)
    assert model[1].running_mean is None and not model[3].training  # BN1d batch stats, dropout stays off
    x = torch.randn(8, 4)
    torch.testing.assert_close(model(x), model(x))
    assert configure_for_tta(model).training


def test_parameter_sets(tta_model):
    bn = bn_affine_parameters(tta_model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in tta_model.modules())
    assert len(bn) == 2 * n_bn
    assert all(isinstance(tta_model.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d) for n in bn)
    assert all(p.dim() == 1 for p in bn.values())
    everything = all_weight_bias_parameters(tta_model)
    assert len(everything) == len(list(tta_model.parameters())) and "head.bias" in everything
    assert set(bn) < set(everything)
    tta_model.register_parameter("temperature", nn.Parameter(torch.ones(1)))
    tta_model.head.bias.requires_grad_(False)
    kept = all_weight_bias_parameters(tta_model)
    assert "temperature" not in kept and "head.bias" not in kept


def test_per_view_batch_stats_equals_separate_forwards(tta_model):
    views = torch.rand(4, 6, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # [V, B, 3, H, W]
    separate = torch.stack([tta_model(v) for v in views])
    with torch.inference_mode(), per_view_batch_stats(tta_model, 4):
        grouped = tta_model(views.flatten(0, 1)).view(4, 6, -1)
        grouped_cl = tta_model(views.flatten(0, 1).contiguous(memory_format=torch.channels_last)).view(4, 6, -1)
    torch.testing.assert_close(grouped, separate, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grouped_cl, separate, atol=1e-4, rtol=1e-4)
    for per_forward in (None, 1, 3, 4):  # 3: chunks of 3 and 1 views
        torch.testing.assert_close(forward_views(tta_model, views, per_forward), separate, atol=1e-4, rtol=1e-4)
    cl_model = tta_model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(forward_views(cl_model, views, 4), separate, atol=1e-4, rtol=1e-4)
    pooled = tta_model(views.flatten(0, 1)).view(4, 6, -1)  # forward restored on exit: pooled statistics again
    assert not torch.allclose(pooled, separate, atol=1e-3)
    assert all("forward" not in vars(m) for m in tta_model.modules())


def test_per_view_batch_stats_restores_after_errors(tta_model):
    with pytest.raises(EngramError, match="multiple of n_views=4"), per_view_batch_stats(tta_model, 4):
        tta_model(torch.rand(6, 3, 32, 32))
    assert all("forward" not in vars(m) for m in tta_model.modules())
    with pytest.raises(EngramError, match="configure_for_tta"), per_view_batch_stats(SmallResNet(width=4).train(), 2):
        pass
