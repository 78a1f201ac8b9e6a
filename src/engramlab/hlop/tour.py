"""The HLOP step of `engramlab tour`: quick HLOP on Permuted MNIST. Full run: `engramlab continual hlop --quick`."""

from __future__ import annotations

from engramlab.hlop.runner import TrainSettings
from engramlab.report import Section, key_values
from engramlab.report.tour import TourContext, TourSection

TOUR_HLOP_TASKS = 5


def hlop_step(ctx: TourContext) -> TourSection:
    """Paper 4: five Permuted-MNIST tasks, spiking MLP (LIF, BPTT), baseline vs HLOP vs GPM."""
    from engramlab.hlop.study import HLOPStudyOptions, acc_bwt_bars, run_hlop_study

    opts = HLOPStudyOptions(
        methods=["baseline", "hlop", "gpm"],
        n_tasks=TOUR_HLOP_TASKS,
        train_settings=TrainSettings(seed=2022 + ctx.seed),
        out=ctx.out / "hlop",
        overwrite=ctx.overwrite,
    )
    summary = run_hlop_study(opts)
    headline = {
        f"{k} {m}": (None if v is None else round(100 * v, 2)) for k in ("acc", "bwt") for m, v in summary[k].items()
    }
    headline |= {f"ms/step {m}": round(v, 1) for m, v in summary["ms_per_step"].items()}
    text = (
        "<p>HLOP (Xiao et al., ICLR 2024): lateral Hebbian neurons learn each layer's principal subspace; later "
        f"tasks' updates are projected away from it. Quick settings ({TOUR_HLOP_TASKS} tasks, 1 epoch); ACC and "
        "BWT in points. Full report: <a href='hlop/report.html'>hlop/report.html</a>.</p>"
    )
    return TourSection(
        "hlop",
        Section(
            "Continual learning of spiking networks: HLOP (paper 4)",
            text,
            tables=[key_values(headline)],
            figures=[acc_bwt_bars(summary)],
        ),
        headline,
    )
