"""The post-training step of `engramlab tour`: paper 3 on the base and chat organisms with quick settings. Full run:
`engramlab posttrain compare`."""

from __future__ import annotations

from engramlab.errors import EngramError
from engramlab.report import Section, key_values
from engramlab.report.tour import TourContext, TourSection


def posttrain_step(ctx: TourContext) -> TourSection:
    """Paper 3 on the base and chat organisms (quick settings): the four analyses in one report."""
    from engramlab.posttrain.study import Options, run

    chat_model = ctx.model.replace("organism:base", "organism:chat")
    if chat_model == ctx.model:
        raise EngramError(
            "the post-training step compares organism:base with organism:chat; "
            "run it on another pair with `engramlab posttrain compare --base A --post B`."
        )
    opts = Options(
        base=ctx.model,
        post=chat_model,
        out=ctx.out / "posttrain",
        device=ctx.device,
        dtype=ctx.dtype,
        seed=ctx.seed,
        max_pairs=8,
        per_set=60,
        n_refusal_train=32,
        n_refusal_eval=20,
        overwrite=ctx.overwrite,
    )
    summary = run(opts, ["knowledge", "truth", "refusal", "entropy"])
    headline = {
        "knowledge_pearson_r": summary["knowledge"]["pearson_r"],
        "truth_layer": summary["truth"]["layer"],
        "truth_cosine": summary["truth"]["cosine"],
        "truth_probe_base_dir_on_post": summary["truth"]["probe_acc"]["base_dir_on_post"],
        "refusal_cosine": summary["refusal"]["cosine"],
        "refusal_rate_harmful": summary["refusal"]["refusal_rate_harmful"],
        "refusal_rate_harmful_ablated": summary["refusal"]["refusal_rate_harmful_ablated"],
        "refusal_rate_harmless": summary["refusal"]["refusal_rate_harmless"],
        "refusal_rate_harmless_added": summary["refusal"]["refusal_rate_harmless_added"],
        "entropy_neurons_iou": summary["entropy"]["iou"],
    }
    text = (
        "<p>How post-training reshapes a model (Du et al., COLM 2025): organism:base vs organism:chat. "
        "Full report: <a href='posttrain/report.html'>posttrain/report.html</a>.</p>"
    )
    return TourSection(
        "posttrain",
        Section(title="Post-training: base vs chat (paper 3)", text=text, tables=[key_values(headline)]),
        headline,
    )
