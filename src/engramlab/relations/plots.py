"""Plots of the relation-neuron study (plotly figures for the HTML reports)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from engramlab.relations.find import FindResult
from engramlab.relations.units import UnitSpace


def ap_by_rank(found: FindResult) -> go.Figure:
    """AP against rank for each relation (log rank): how fast relation-specificity falls off."""
    fig = go.Figure()
    for r, name in enumerate(found.relations):
        ap = np.sort(np.nan_to_num(found.ap[r], nan=0.0))[::-1]
        ranks = np.unique(np.geomspace(1, ap.size, 200).astype(int))
        fig.add_trace(go.Scatter(x=ranks, y=ap[ranks - 1], mode="lines", name=name))
    fig.add_vline(x=found.k, line_dash="dot", annotation_text=f"k = {found.k}")
    fig.update_layout(
        title="AP of units by rank (chance = 0.2)",
        xaxis_type="log",
        xaxis_title="rank",
        yaxis_title="average precision",
        height=420,
    )
    return fig


def layer_histogram(found: FindResult, space: UnitSpace, k: int | None = None) -> go.Figure:
    """Where each relation's top-k units sit: relations x layers heatmap of counts (paper Fig. 1)."""
    counts = np.zeros((len(found.relations), space.n_layers), dtype=int)
    for r, name in enumerate(found.relations):
        layers, _, _ = space.locate(found.top(name, k))
        counts[r] = np.bincount(layers, minlength=space.n_layers)
    fig = go.Figure(go.Heatmap(z=counts, x=list(range(space.n_layers)), y=found.relations, colorscale="Blues"))
    fig.update_layout(title=f"Top-{k or found.k} units per layer", xaxis_title="layer", height=120 + 22 * len(counts))
    return fig


def expert_histogram(found: FindResult, space: UnitSpace, k: int | None = None) -> go.Figure:
    """MoE models: relations x (layer:expert) counts of each relation's top-k units that are routed-expert
    neurons, over the experts that hold any (a model has up to thousands of experts)."""
    cells: dict[tuple[int, int], dict[int, int]] = {}
    for r, name in enumerate(found.relations):
        ids = found.top(name, k)
        layers, experts = space.locate(ids)[0], space.experts_of(ids)
        for layer, expert in zip(layers[experts >= 0].tolist(), experts[experts >= 0].tolist(), strict=True):
            cells.setdefault((layer, expert), {}).setdefault(r, 0)
            cells[(layer, expert)][r] += 1
    columns = sorted(cells)
    counts = np.zeros((len(found.relations), len(columns)), dtype=int)
    for c, key in enumerate(columns):
        for r, n in cells[key].items():
            counts[r, c] = n
    labels = [f"{layer}:{expert}" for layer, expert in columns]
    fig = go.Figure(go.Heatmap(z=counts, x=labels, y=found.relations, colorscale="Blues"))
    fig.update_layout(
        title=f"Top-{k or found.k} units per routed expert (layer:expert; experts holding none left out)",
        xaxis_title="layer:expert",
        xaxis_type="category",
        height=120 + 22 * len(counts),
    )
    return fig


def deactivation_bars(per_relation: dict[str, dict[str, float]], group: str) -> go.Figure:
    """Accuracy before, after zeroing the target set, and after random sets (mean ± std) per relation."""
    names = list(per_relation)
    suffix = "" if group == "all" else f"_{group}"
    fig = go.Figure()
    fig.add_trace(go.Bar(name="before", x=names, y=[per_relation[n][f"acc_before{suffix}"] for n in names]))
    fig.add_trace(
        go.Bar(
            name="random-k",
            x=names,
            y=[per_relation[n][f"acc_after_random_mean{suffix}"] for n in names],
            error_y={"type": "data", "array": [per_relation[n][f"acc_after_random_std{suffix}"] for n in names]},
        )
    )
    fig.add_trace(
        go.Bar(name="relation top-k", x=names, y=[per_relation[n][f"acc_after_target{suffix}"] for n in names])
    )
    fig.update_layout(
        barmode="group",
        title=f"Accuracy on P_eva ({group} templates)",
        yaxis_title="accuracy",
        yaxis_range=[0, 1],
        height=420,
    )
    return fig


def drop_heatmap(matrix: np.ndarray, names: list[str], title: str) -> go.Figure:
    """Rows: whose units are zeroed; columns: relation evaluated. Negative values = interference gains."""
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=matrix, x=names, y=names, colorscale="RdBu_r", zmid=0, zmin=-limit, zmax=limit, colorbar_title="drop"
        )
    )
    fig.update_layout(
        title=title, xaxis_title="evaluated relation", yaxis_title="units zeroed", height=200 + 24 * len(names)
    )
    return fig


def sweep_lines(rows: list[dict]) -> go.Figure:
    """Mean accuracy over relations vs k: the relation itself and the others, target vs random units."""
    fig = go.Figure()
    ks = sorted({r["k"] for r in rows if r["condition"] != "none"})
    for condition, dash in (("target", "solid"), ("random", "dot")):
        for field, label in (("accuracy", "same relation"), ("accuracy_others", "other relations")):
            y = [np.nanmean([r[field] for r in rows if r["k"] == k and r["condition"] == condition]) for k in ks]
            fig.add_trace(
                go.Scatter(x=ks, y=y, mode="lines+markers", line_dash=dash, name=f"{label}, {condition} units")
            )
    fig.update_layout(
        title="Accuracy vs number of zeroed units (mean over relations)",
        xaxis_type="log",
        xaxis_title="k",
        yaxis_title="accuracy",
        yaxis_range=[0, 1],
        height=420,
    )
    return fig


def overlap_heatmap(pairs: list[dict], names: list[str]) -> go.Figure:
    iou = np.eye(len(names))
    index = {n: i for i, n in enumerate(names)}
    for p in pairs:
        iou[index[p["a"]], index[p["b"]]] = iou[index[p["b"]], index[p["a"]]] = p["iou"]
    fig = go.Figure(go.Heatmap(z=iou, x=names, y=names, colorscale="Viridis", zmin=0, zmax=1))
    fig.update_layout(title="IoU of top-k unit sets", height=200 + 24 * len(names))
    return fig


def language_bars(rows: list[dict]) -> go.Figure:
    languages = sorted({r["language"] for r in rows})
    fig = go.Figure()
    for key, label in (
        ("acc_before", "before"),
        ("acc_after_random_mean", "random-k"),
        ("acc_after_target", "English top-k"),
    ):
        fig.add_trace(
            go.Bar(
                name=label,
                x=languages,
                y=[np.mean([r[key] for r in rows if r["language"] == lang]) for lang in languages],
            )
        )
    fig.update_layout(
        barmode="group",
        title="English-identified units zeroed on other languages (mean over relations)",
        yaxis_title="accuracy",
        yaxis_range=[0, 1],
        height=400,
    )
    return fig


def template_scatter(rows: list[dict]) -> go.Figure:
    """Template control: each top unit's subject-only AP against its template-only AP, one colour per relation.
    Units above the diagonal read the template's words more than the subject."""
    fig = go.Figure()
    for name in dict.fromkeys(r["relation"] for r in rows):
        sel = [r for r in rows if r["relation"] == name]
        fig.add_trace(
            go.Scatter(
                x=[r["ap_subject"] for r in sel],
                y=[r["ap_template"] for r in sel],
                mode="markers",
                name=name,
                marker={"size": 5, "opacity": 0.7},
                text=[f"L{r['layer']} {r['site']}[{r['index']}] rank {r['rank']}, AP {r['ap']:.3f}" for r in sel],
            )
        )
    fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "grey"})
    fig.update_layout(
        title="Top units: AP from subject tokens vs from template tokens (chance = 0.2)",
        xaxis_title="AP, mean over subject tokens",
        yaxis_title="AP, mean over template tokens",
        xaxis_range=[0, 1.02],
        yaxis_range=[0, 1.02],
        height=520,
    )
    return fig


def perplexity_bars(per_relation: dict[str, dict[str, float]]) -> go.Figure:
    """Perplexity probe: probe-sentence perplexity before, after random-k and after the relation's top-k."""
    names = list(per_relation)
    fig = go.Figure()
    fig.add_trace(go.Bar(name="before", x=names, y=[per_relation[n]["ppl_before"] for n in names]))
    fig.add_trace(
        go.Bar(
            name="random-k",
            x=names,
            y=[per_relation[n]["ppl_after_random_mean"] for n in names],
            error_y={"type": "data", "array": [per_relation[n]["ppl_after_random_std"] for n in names]},
        )
    )
    fig.add_trace(go.Bar(name="relation top-k", x=names, y=[per_relation[n]["ppl_after_target"] for n in names]))
    fig.update_layout(
        barmode="group",
        title="Perplexity of the probe sentences (paper 1 §5.5)",
        yaxis_type="log",
        yaxis_title="perplexity",
        height=420,
    )
    return fig
