"""Parity of engramlab's BN, TENT, CoTTA and CoTTA augmentation with the official algorithms (issue 24).

The reference (`tta_reference.py`, in this folder) re-implements the official code from the spec: `cifar/norm.py`,
DequanWang/tent `tent.py`, `cifar/cotta.py` `forward_and_adapt` (32 sequential transform + teacher calls on every
batch) and `get_tta_transforms` with torchvision's tensor ops written out in plain torch. The updates are compared
batch by batch on the shipped digits stream and source model; CoTTA with both sides' augmentations fixed to the same
draws. The augmentation distribution is compared statistically: per-view error and the 32-view average's error of a
fixed teacher on a fixed batch, seeded.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

import engramlab.tta.methods as methods
import tta_reference as ref
from engramlab.tta.augment import AugmentParams, apply_params, augment_views, get_policy
from engramlab.tta.methods import CoTTASettings, make_tta_method
from engramlab.tta.source_model import load_source, mnist_rgb32_split
from engramlab.tta.streams import build_stream
from engramlab.tta.vision import configure_for_tta, forward_views
from tta_reference import OfficialPolicy, OfficialTransform, ViewDraws, apply_view, draw_view

CL = torch.channels_last


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return load_source()


@pytest.fixture(scope="module")
def source_cl(source) -> torch.nn.Module:
    """The source model in engramlab's memory layout, for the reference. engramlab runs its models channels_last
    (faster oneDNN convolutions on a CPU), whose rounding differs from the contiguous layout's: on the fog and contrast
    batches below, up to 4e-3 on logits of ~20 (contiguous float32: 2e-5 from float64). With the same layout on both
    sides the update comparisons below test the algorithm, not the layout; `test_bn_adapt_equals_official_norm`
    also compares against the official contiguous layout."""
    return copy.deepcopy(source).to(memory_format=CL)


@pytest.fixture(scope="module")
def stream() -> list:
    """Six batches of 50 corrupted digits (severity 5): three domains, two batches each."""
    _, _, x, y = mnist_rgb32_split()
    corruptions = ["impulse_noise", "fog", "contrast"]
    return list(build_stream(x[:100], y[:100], batch_size=50, seed=3, corruptions=corruptions))


@pytest.fixture(scope="module")
def impulse_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """200 digits under impulse noise: a batch large enough that the default CPU chunk holds one view."""
    _, _, x, y = mnist_rgb32_split()
    batch = next(iter(build_stream(x[:200], y[:200], batch_size=200, seed=1, corruptions=["impulse_noise"])))
    return batch.x, batch.y


def params_from_draws(draws: list[ViewDraws], shape: torch.Size) -> AugmentParams:
    """engramlab's parameters of the views the official transform drew (noise left out: added by the caller)."""
    padded_h, padded_w = shape[-2] + 2 * (shape[-2] // 2), shape[-1] + 2 * (shape[-1] // 2)

    def factor(op: int) -> torch.Tensor:
        return torch.tensor([d.factors[op] for d in draws])

    return AugmentParams(
        order=torch.tensor([d.order for d in draws]),
        brightness=factor(0),
        contrast=factor(1),
        saturation=factor(2),
        hue=factor(3),
        gamma=factor(4),
        angle=torch.tensor([d.angle for d in draws]),
        translate=torch.tensor([[d.translate[0] / padded_w, d.translate[1] / padded_h] for d in draws]),
        scale=torch.tensor([d.scale for d in draws]),
        sigma=torch.tensor([d.sigma for d in draws]),
        flip=torch.tensor([d.flip for d in draws]),
        blur_kernel=5,
        noise_std=0.0,
    )


# ---- augmentation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [OfficialPolicy(), OfficialPolicy(degrees=(-60.0, 60.0), scale=(0.3, 0.5), translate=0.3)],
    ids=["official", "zero-fill-shows"],
)
def test_views_equal_the_torchvision_pipeline_for_the_same_draws(impulse_batch, policy):
    x = impulse_batch[0]
    g = torch.Generator().manual_seed(4)
    draws = [draw_view(x.shape, policy, g) for _ in range(8)]
    expected = torch.stack([apply_view(x, d, gaussian_std=0.0, blur_memory_format=CL) for d in draws])
    before = x.clone()
    views = apply_params(x, params_from_draws(draws, x.shape))  # default chunking: one view per chunk
    torch.testing.assert_close(views, expected, atol=2e-5, rtol=0)
    assert torch.equal(x, before)


def _errors(logits: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-view error % and the error % of each consecutive 32-view logit average: logits [V, B, K]."""
    per_view = ((logits.argmax(2) != y).float().mean(1) * 100).tolist()
    averages = [float((chunk.mean(0).argmax(1) != y).float().mean() * 100) for chunk in logits.split(32)]
    return per_view, averages


@torch.no_grad()
def test_augmentation_distribution_matches_get_tta_transforms(source, impulse_batch):
    """A fixed teacher (the source model on batch statistics) scores views of one fixed batch of 100 digits;
    engramlab's `augment_views` (64 views, one per chunk: the path of issue 24) and the official transform (32
    sequential calls) must agree in the mean and spread of the per-view error and in the 32-view average's error.
    The digits policy (no flip: a mirrored digit is another digit, which makes the per-view error bimodal); the flip
    is checked by the same-draws test above and in test_augment.py. Measured over 6 seeds: engramlab 9.8-10.5 %
    per view (sd 3.1-3.7), official 9.1-10.4 % (sd 2.2-3.5), |z| <= 2.2, sd ratio 0.99-1.63, 32-view averages
    5-7 % on both sides (plain prediction 7 %); the compounded views of issue 24 gave 52 ± 38 % per view and 8 and
    88 % for the two averages."""
    x, y = impulse_batch[0][:100], impulse_batch[1][:100]
    teacher = configure_for_tta(copy.deepcopy(source))
    views = augment_views(x, 64, get_policy("cotta-no-flip"), torch.Generator().manual_seed(0), views_per_chunk=1)
    ours, ours_avg = _errors(forward_views(teacher, views), y)
    official = OfficialTransform(OfficialPolicy(p_hflip=0.0), torch.Generator().manual_seed(100), blur_memory_format=CL)
    theirs, theirs_avg = _errors(torch.stack([teacher(official(x)) for _ in range(32)]), y)
    standard_error = (statistics.variance(ours) / len(ours) + statistics.variance(theirs) / len(theirs)) ** 0.5
    assert abs(statistics.mean(ours) - statistics.mean(theirs)) < 4 * standard_error
    assert 0.5 < statistics.stdev(ours) / statistics.stdev(theirs) < 2.0
    assert abs(statistics.mean(ours_avg) - theirs_avg[0]) <= 3.0  # 3 of 100 images


# ---- the updates -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bn_adapt_equals_official_norm(source, source_cl, stream):
    ours = make_tta_method("bn", source)
    theirs, theirs_contiguous = ref.OfficialNorm(source_cl), ref.OfficialNorm(source)
    for batch in stream:
        logits = ours.adapt_and_predict(batch.x)
        torch.testing.assert_close(logits, theirs(batch.x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, theirs_contiguous(batch.x), atol=1e-2, rtol=0)


def test_tent_equals_official_tent(source, source_cl, stream):
    ours = make_tta_method("tent", source)
    theirs = ref.OfficialTent(source_cl)
    for batch in stream:
        torch.testing.assert_close(ours.adapt_and_predict(batch.x), theirs(batch.x), atol=1e-4, rtol=1e-4)
    adapted = dict(ours.model.named_parameters())
    for name, p in theirs.model.named_parameters():
        torch.testing.assert_close(adapted[name].detach(), p.detach(), atol=1e-5, rtol=1e-4)
    assert not torch.equal(adapted["stem.1.weight"], source.state_dict()["stem.1.weight"])  # TENT did move


class _DrawBank:
    """The same official draws for both CoTTAs: the views of batch `step` come from a generator seeded by step.

    engramlab's CoTTA asks for its N views in one `augment_views` call (patched to `views`), only when the gate
    fires; the official one calls the transform N times on every batch (`__call__`)."""

    def __init__(self, n: int) -> None:
        self.n, self.step, self._pending = n, 0, []

    def draws(self, shape: torch.Size) -> list[ViewDraws]:
        g = torch.Generator().manual_seed(1000 + self.step)
        return [draw_view(shape, OfficialPolicy(p_hflip=0.0), g) for _ in range(self.n)]

    def views(self, x, n_views, policy, generator=None):  # engramlab's augment_views signature
        draws = self.draws(x.shape)
        clean = apply_params(x, params_from_draws(draws, x.shape))
        noise = torch.stack([d.noise for d in draws])
        return (clean + noise * policy.noise_std).clamp(0, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._pending:
            self._pending = self.draws(x.shape)
        return apply_view(x, self._pending.pop(0), blur_memory_format=CL)


def test_cotta_equals_official_cotta_with_the_same_draws(source, source_cl, stream, monkeypatch):
    n = 4
    anchor = configure_for_tta(copy.deepcopy(source))
    with torch.no_grad():
        confidence = [float(anchor(b.x).softmax(1).max(1).values.mean()) for b in stream]
    threshold = statistics.median(confidence)  # the gate fires on about half of the batches
    bank = _DrawBank(n)
    monkeypatch.setattr(methods, "augment_views", bank.views)
    settings = CoTTASettings(n_augmentations=n, threshold=threshold, policy="cotta-no-flip")
    ours = make_tta_method("cotta", source, settings, seed=5)
    theirs = ref.OfficialCoTTA(
        source_cl, bank, ap=threshold, n_augmentations=n, restore_generator=torch.Generator().manual_seed(5)
    )
    gates = []
    for step, batch in enumerate(stream):
        bank.step = step
        expected = theirs(batch.x)
        torch.testing.assert_close(ours.adapt_and_predict(batch.x), expected, atol=2e-5, rtol=1e-4)
        assert ours.last_gate == theirs.last_gate
        gates.append(ours.last_gate)
    assert any(gates) and not all(gates)
    student = dict(ours.model.named_parameters())
    gaps = torch.cat([(student[name] - p).detach().abs().flatten() for name, p in theirs.model.named_parameters()])
    # Adam's normalised step turns rounding-level differences of near-zero gradients into visible ones (measured:
    # 2 % of the weights differ by more than 1e-5 after 6 steps, at most by 1.2e-4); every gap stays below one step.
    assert gaps.max() < 1e-3 and (gaps > 1e-5).float().mean() < 0.05
    teacher = dict(ours.teacher.named_parameters())
    for name, p in theirs.model_ema.named_parameters():
        torch.testing.assert_close(teacher[name], p, atol=1e-5, rtol=1e-4)
