"""The continual-learning steps of `engramlab tour`: quick HLOP on Permuted MNIST and quick CoTTA on a corruption
stream of the vendored MNIST digits. Full runs: `engramlab continual hlop --quick` and `engramlab continual tta`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engramlab.continual.runner import TrainSettings
from engramlab.report import Section, key_values

if TYPE_CHECKING:
    from engramlab.tour import TourContext, TourSection

TOUR_HLOP_TASKS = 5
TOUR_TTA_IMAGES = 200  # clean digits per corruption domain (the full stream has 1,000)


def hlop_step(ctx: TourContext) -> TourSection:
    """Paper 4: five Permuted-MNIST tasks, spiking MLP (LIF, BPTT), baseline vs HLOP vs GPM."""
    from engramlab.continual.hlop_study import HLOPStudyOptions, acc_bwt_bars, run_hlop_study
    from engramlab.tour import TourSection

    opts = HLOPStudyOptions(methods=["baseline", "hlop", "gpm"], n_tasks=TOUR_HLOP_TASKS,
                            train_settings=TrainSettings(seed=2022 + ctx.seed), out=ctx.out / "hlop")
    summary = run_hlop_study(opts)
    headline = {f"{k} {m}": (None if v is None else round(100 * v, 2)) for k in ("acc", "bwt")
                for m, v in summary[k].items()}
    headline |= {f"ms/step {m}": round(v, 1) for m, v in summary["ms_per_step"].items()}
    text = ("<p>HLOP (Xiao et al., ICLR 2024): lateral Hebbian neurons learn each layer's principal subspace; later "
            f"tasks' updates are projected away from it. Quick settings ({TOUR_HLOP_TASKS} tasks, 1 epoch); ACC and "
            "BWT in points. Full report: <a href='hlop/report.html'>hlop/report.html</a>.</p>")
    return TourSection("hlop", Section("Continual learning of spiking networks: HLOP (paper 4)", text,
                                       tables=[key_values(headline)], figures=[acc_bwt_bars(summary)]), headline)


def tta_step(ctx: TourContext) -> TourSection:
    """Paper 5: Source, BN, TENT and CoTTA on the 15-corruption stream of MNIST digits (one round)."""
    from engramlab.continual.tta import CoTTASettings
    from engramlab.continual.tta_study import TTAStudyOptions, error_by_round, run_tta_study
    from engramlab.tour import TourSection

    # The digits stream's settings of `engramlab continual tta` (its --policy auto and --threshold auto).
    opts = TTAStudyOptions(n_images=TOUR_TTA_IMAGES, batch_size=100, seed=1 + ctx.seed, out=ctx.out / "tta",
                           cotta=CoTTASettings(policy="cotta-no-flip"), threshold_from_source=True)
    summary = run_tta_study(opts)
    headline = {f"error % {m}": round(v, 2) for m, v in summary["error_mean"].items()}
    headline |= {f"images/s {m}": round(v) for m, v in summary["images_per_second"].items()}
    text = ("<p>CoTTA (Wang et al., CVPR 2022): continual test-time adaptation with an EMA teacher, augmentation-"
            f"averaged pseudo-labels and stochastic restore. Quick settings ({TOUR_TTA_IMAGES} digits per "
            "corruption, batch 100, severity 5, CIFAR-10-C constants). Full report: "
            "<a href='tta/report.html'>tta/report.html</a>.</p>")
    return TourSection("tta", Section("Continual test-time adaptation: CoTTA (paper 5)", text,
                                      tables=[key_values(headline)], figures=[error_by_round(summary)]), headline)
