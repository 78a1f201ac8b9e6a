"""The CoTTA step of `engramlab tour`: quick CoTTA on a corruption stream of the vendored MNIST digits. Full run:
`engramlab continual tta`."""

from __future__ import annotations

from engramlab.report import Section, key_values
from engramlab.report.tour import TourContext, TourSection

TOUR_TTA_IMAGES = 200  # clean digits per corruption domain (the full stream has 1,000)


def tta_step(ctx: TourContext) -> TourSection:
    """Paper 5: Source, BN, TENT and CoTTA on the 15-corruption stream of MNIST digits (one round)."""
    from engramlab.tta.methods import CoTTASettings
    from engramlab.tta.study import TTAStudyOptions, error_by_round, run_tta_study

    # The digits stream's settings of `engramlab continual tta` (its --policy auto and --threshold auto).
    opts = TTAStudyOptions(
        n_images=TOUR_TTA_IMAGES,
        batch_size=100,
        seed=1 + ctx.seed,
        out=ctx.out / "tta",
        cotta=CoTTASettings(policy="cotta-no-flip"),
        threshold_from_source=True,
        overwrite=ctx.overwrite,
    )
    summary = run_tta_study(opts)
    headline = {f"error % {m}": round(v, 2) for m, v in summary["error_mean"].items()}
    headline |= {f"images/s {m}": round(v) for m, v in summary["images_per_second"].items()}
    text = (
        "<p>CoTTA (Wang et al., CVPR 2022): continual test-time adaptation with an EMA teacher, augmentation-"
        f"averaged pseudo-labels and stochastic restore. Quick settings ({TOUR_TTA_IMAGES} digits per "
        "corruption, batch 100, severity 5, CIFAR-10-C constants). Full report: "
        "<a href='tta/report.html'>tta/report.html</a>.</p>"
    )
    return TourSection(
        "tta",
        Section(
            "Continual test-time adaptation: CoTTA (paper 5)",
            text,
            tables=[key_values(headline)],
            figures=[error_by_round(summary)],
        ),
        headline,
    )
