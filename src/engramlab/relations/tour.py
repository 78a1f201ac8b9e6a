"""The relations step of `engramlab tour`: paper 1 on six relations with quick settings. Full run:
`engramlab relations deactivate`."""

from __future__ import annotations

from engramlab.report import Section, key_values
from engramlab.report.tour import TourContext, TourSection

TOUR_RELATIONS = (
    "company_hq,country_capital,person_plays_pro_sport,star_constellation,landmark_on_continent,city_country"
)


def relations_step(ctx: TourContext) -> TourSection:
    """Paper 1 on six relations: find the units, zero them, compare with random units (quick settings)."""
    from engramlab.relations import plots
    from engramlab.relations.study import StudyOptions, run_deactivate

    out = ctx.out / "relations"
    opts = StudyOptions(
        model=ctx.model,
        out=out,
        relations=TOUR_RELATIONS,
        max_prompts=150,
        eval_subjects=20,
        device=ctx.device,
        dtype=ctx.dtype,
        seed=ctx.seed,
        batch_size=64,
        overwrite=ctx.overwrite,
    )
    summary = run_deactivate(opts, n_random=3)
    headline = {
        k: summary[k]
        for k in (
            "k",
            "mean_drop_target",
            "mean_drop_random",
            "mean_drop_target_seen_templates",
            "mean_drop_target_heldout_templates",
            "mean_drop_offtarget",
        )
    }
    text = (
        "<p>Relation-specific neurons (Liu et al., EMNLP 2025): each relation's top-k units by AP are zeroed; "
        "accuracy on held-out subjects drops for that relation, not for random units. Quick settings "
        "(6 relations, 20 eval subjects, 3 random seeds); full report: <a href='relations/report.html'>"
        "relations/report.html</a>.</p>"
    )
    section = Section(
        title="Relation-specific neurons (paper 1)",
        text=text,
        tables=[key_values(headline)],
        figures=[plots.deactivation_bars(summary["per_relation"], "heldout")],
    )
    return TourSection("relations", section, headline)
