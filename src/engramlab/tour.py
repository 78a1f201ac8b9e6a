"""`engramlab tour`: one command that runs a quick version of every study on the shipped defaults and writes
`index.html` (one section per study, with its headline plot and numbers) and `summary.json`.

Each study adds one step, a function `(TourContext) -> TourSection` in its own package's `tour.py`, listed in
`TOUR_STEPS`. A step that fails
with an `EngramError` is reported in the page and in `summary.json` instead of ending the tour.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from engramlab.decode.tour import decode_step
from engramlab.errors import EngramError
from engramlab.hlop.tour import hlop_step
from engramlab.models.info import model_info
from engramlab.models.loading import load_model
from engramlab.posttrain.tour import posttrain_step
from engramlab.relations.tour import relations_step
from engramlab.report import Section, key_values, table, write_report
from engramlab.report.tour import TourContext, TourSection
from engramlab.results import check_out_dir, prepare_out_dir, write_json
from engramlab.tta.tour import tta_step


def model_step(ctx: TourContext) -> TourSection:
    """The default model's architecture and size (`engramlab models info`)."""
    info = model_info(load_model(ctx.model, device=ctx.device, dtype=ctx.dtype))
    parts = info["parameters_by_part"]
    fig = go.Figure(go.Bar(x=list(parts), y=list(parts.values())))
    fig.update_layout(title="Parameters by part", yaxis_title="parameters", height=340)
    units = [
        {"site": s, "per layer": w, "all layers": info["units_total"][s]} for s, w in info["units_per_layer"].items()
    ]
    headline = {
        k: info[k]
        for k in (
            "ref",
            "family",
            "n_layers",
            "hidden_size",
            "vocab_size",
            "parameters",
            "mlp_neurons_total",
            "dtype",
            "device",
        )
    }
    section = Section(title=f"Model: {info['ref']}", tables=[key_values(headline), table(units)], figures=[fig])
    return TourSection("model", section, info)


TOUR_STEPS: list[Callable[[TourContext], TourSection]] = [
    model_step,
    relations_step,
    decode_step,
    posttrain_step,
    hlop_step,
    tta_step,
]


LLM_STEPS = ("model", "relations", "decode", "posttrain")  # the steps that load --model


def step_names() -> list[str]:
    return [step.__name__.removesuffix("_step") for step in TOUR_STEPS]


def run_tour(
    out: str | Path,
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Run every tour step (or those named in `only`); write `index.html` and `summary.json` into `out`."""
    unknown = [name for name in only or [] if name not in step_names()]
    if unknown:
        raise EngramError(f"--only {unknown[0]!r} is not a tour step; choose from: {', '.join(step_names())}.")
    if seed < 0:
        raise EngramError(f"--seed must be >= 0, got {seed}.")
    check_out_dir(out, overwrite)
    if only is None or set(LLM_STEPS) & set(only):
        load_model(model, device=device, dtype=dtype)  # a model that cannot load fails the tour, not each step
    out_dir = prepare_out_dir(out, overwrite)
    ctx = TourContext(model=model, out=out_dir, device=device, dtype=dtype, seed=seed, overwrite=overwrite)
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
