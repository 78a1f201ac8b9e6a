"""`engramlab tour`: one command that runs a quick version of every study on the shipped defaults and writes
`index.html` (one section per study, with its headline plot and numbers) and `summary.json`.

Each study adds one step: a function `(context) -> TourSection` appended to `TOUR_STEPS`. A step that fails
with an `EngramError` is reported in the page and in `summary.json` instead of ending the tour.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from engramlab.errors import EngramError
from engramlab.models.info import model_info
from engramlab.models.loading import load_model
from engramlab.report import Section, key_values, table, write_report
from engramlab.results import prepare_out_dir, write_json


@dataclass
class TourContext:
    model: str
    out: Path
    device: str
    dtype: str
    seed: int


@dataclass
class TourSection:
    name: str  # key in summary.json
    section: Section
    summary: dict[str, Any] = field(default_factory=dict)


def model_step(ctx: TourContext) -> TourSection:
    """The default model's architecture and size (`engramlab models info`)."""
    info = model_info(load_model(ctx.model, device=ctx.device, dtype=ctx.dtype))
    parts = info["parameters_by_part"]
    fig = go.Figure(go.Bar(x=list(parts), y=list(parts.values())))
    fig.update_layout(title="Parameters by part", yaxis_title="parameters", height=340)
    units = [{"site": s, "per layer": w, "all layers": info["units_total"][s]} for s, w in
             info["units_per_layer"].items()]
    headline = {k: info[k] for k in ("ref", "family", "n_layers", "hidden_size", "vocab_size", "parameters",
                                     "mlp_neurons_total", "dtype", "device")}
    section = Section(title=f"Model: {info['ref']}", tables=[key_values(headline), table(units)], figures=[fig])
    return TourSection("model", section, info)


TOUR_RELATIONS = "company_hq,country_capital,person_plays_pro_sport,star_constellation,landmark_on_continent,city_country"


def relations_step(ctx: TourContext) -> TourSection:
    """Paper 1 on six relations: find the units, zero them, compare with random units (quick settings)."""
    from engramlab.relations import plots
    from engramlab.relations.study import StudyOptions, run_deactivate

    out = ctx.out / "relations"
    opts = StudyOptions(model=ctx.model, out=out, relations=TOUR_RELATIONS, max_prompts=150, eval_subjects=20,
                        device=ctx.device, dtype=ctx.dtype, seed=ctx.seed, batch_size=64)
    summary = run_deactivate(opts, n_random=3)
    headline = {k: summary[k] for k in ("k", "mean_drop_target", "mean_drop_random",
                                        "mean_drop_target_seen_templates", "mean_drop_target_heldout_templates",
                                        "mean_drop_offtarget")}
    text = ("<p>Relation-specific neurons (Liu et al., EMNLP 2025): each relation's top-k units by AP are zeroed; "
            "accuracy on held-out subjects drops for that relation, not for random units. Quick settings "
            "(6 relations, 20 eval subjects, 3 random seeds); full report: <a href='relations/report.html'>"
            "relations/report.html</a>.</p>")
    section = Section(title="Relation-specific neurons (paper 1)", text=text, tables=[key_values(headline)],
                      figures=[plots.deactivation_bars(summary["per_relation"], "heldout")])
    return TourSection("relations", section, headline)


def posttrain_step(ctx: TourContext) -> TourSection:
    """Paper 3 on the base and chat organisms (quick settings): the four analyses in one report."""
    from engramlab.posttrain.study import Options, run

    chat_model = ctx.model.replace("organism:base", "organism:chat")
    if chat_model == ctx.model:
        raise EngramError("the post-training step compares organism:base with organism:chat; "
                          "run it on another pair with `engramlab posttrain compare --base A --post B`.")
    opts = Options(base=ctx.model, post=chat_model, out=ctx.out / "posttrain", device=ctx.device, dtype=ctx.dtype,
                   seed=ctx.seed, max_pairs=8, per_set=60, n_refusal_train=32, n_refusal_eval=20)
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
    text = ("<p>How post-training reshapes a model (Du et al., COLM 2025): organism:base vs organism:chat. "
            "Full report: <a href='posttrain/report.html'>posttrain/report.html</a>.</p>")
    return TourSection("posttrain", Section(title="Post-training: base vs chat (paper 3)", text=text,
                                            tables=[key_values(headline)]), headline)


def decode_step(ctx: TourContext) -> TourSection:
    """Paper 2: the neuron atlas of the model and base-vs-chat agreement (engramlab.decode.tour)."""
    from engramlab.decode.tour import decode_step as run_decode

    return run_decode(ctx)


def hlop_step(ctx: TourContext) -> TourSection:
    """Paper 4: HLOP vs baseline vs GPM on Permuted MNIST (engramlab.continual.tour)."""
    from engramlab.continual.tour import hlop_step as run_hlop

    return run_hlop(ctx)


def tta_step(ctx: TourContext) -> TourSection:
    """Paper 5: Source, BN, TENT and CoTTA on a corruption stream (engramlab.continual.tour)."""
    from engramlab.continual.tour import tta_step as run_tta

    return run_tta(ctx)


TOUR_STEPS: list[Callable[[TourContext], TourSection]] = [model_step, relations_step, decode_step, posttrain_step,
                                                           hlop_step, tta_step]


def step_names() -> list[str]:
    return [step.__name__.removesuffix("_step") for step in TOUR_STEPS]


def run_tour(out: str | Path, model: str, device: str = "auto", dtype: str = "auto", seed: int = 0,
             overwrite: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Run every tour step (or those named in `only`); write `index.html` and `summary.json` into `out`."""
    unknown = [name for name in only or [] if name not in step_names()]
    if unknown:
        raise EngramError(f"--only {unknown[0]!r} is not a tour step; choose from: {', '.join(step_names())}.")
    out_dir = prepare_out_dir(out, overwrite)
    ctx = TourContext(model=model, out=out_dir, device=device, dtype=dtype, seed=seed)
    sections, summary = [], {"model": model, "steps": {}}
    for step in TOUR_STEPS:
        if only and step.__name__.removesuffix("_step") not in only:
            continue
        start = time.perf_counter()
        try:
            result = step(ctx)
        except EngramError as err:
            name = step.__name__.removesuffix("_step")
            sections.append(Section(title=f"{name}: failed", text=f"<p>{err}</p>"))
            summary["steps"][name] = {"error": str(err)}
            continue
        result.summary["seconds"] = round(time.perf_counter() - start, 3)
        sections.append(result.section)
        summary["steps"][result.name] = result.summary
    write_json(out_dir / "summary.json", summary)
    write_report(out_dir / "index.html", "engramlab tour", sections, summary=None)
    return summary
