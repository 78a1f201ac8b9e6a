"""The decode study's step in `engramlab tour`: the atlas of the tour's model, its explorer, and (for the shipped
organisms) base-vs-chat top-token agreement per layer."""

from __future__ import annotations

import numpy as np

from engramlab.decode.atlas import decode_atlas, write_atlas
from engramlab.decode.compare import agreement_figure, compare_models, write_comparison
from engramlab.models.loading import load_model
from engramlab.organisms.registry import shipped_organisms
from engramlab.report.html import Section, esc, key_values, table
from engramlab.report.tour import TourContext, TourSection


def decode_step(ctx: TourContext) -> TourSection:
    """Atlas (top-10, raw head, with the fold-norm top-1 change) + base-vs-chat agreement when both ship."""
    out = ctx.out / "decode"
    loaded = load_model(ctx.model, device=ctx.device, dtype=ctx.dtype)
    atlas = decode_atlas(loaded, top_k=10, fold_norm=False, softmax=True)
    top1_fold = decode_atlas(loaded, top_k=1, fold_norm=True)
    summary = write_atlas(atlas, out / "atlas", overwrite=True)
    summary["top1_changed_by_fold_norm"] = float(np.mean(top1_fold.top1 != atlas.top1))

    # the neurons whose top token is most probable: the sharpest "feature neurons"
    flat = np.argsort(-atlas.probs[:, :, 0].reshape(-1), kind="stable")[:12]
    sharp = [
        {
            "neuron": f"{atlas.layer_ids[i // atlas.n_neurons_per_layer]}:{i % atlas.n_neurons_per_layer}",
            "top tokens": ", ".join(repr(atlas.token(int(t))) for t in atlas.ids.reshape(-1, atlas.top_k)[i, :5]),
            "P(top-1)": float(atlas.probs.reshape(-1, atlas.top_k)[i, 0]),
        }
        for i in flat
    ]
    headline = {
        "model": ctx.model,
        "neurons decoded": atlas.n_neurons,
        "seconds": round(atlas.seconds, 3),
        "neurons/s": summary["neurons_per_second"],
        "top-1 changed by --fold-norm": round(summary["top1_changed_by_fold_norm"], 4),
    }
    figures, result = [], None
    if ctx.model == "organism:base" and "chat" in shipped_organisms():
        chat = load_model("organism:chat", device=ctx.device, dtype=ctx.dtype)
        result = compare_models(loaded, chat, top_k=10, seed=ctx.seed)
        summary["compare"] = write_comparison(result, out / "compare", overwrite=True)
        headline.update(
            {
                "base vs chat top-1 agreement": round(result.agreement, 4),
                "chance (shuffled)": round(result.chance_agreement, 4),
            }
        )
        figures.append(agreement_figure(result))
    text = (
        "<p>Every up_proj neuron's weight row decoded through the LM head (Davies 2025, arXiv 2501.02688). "
        "Explore it in <a href='decode/atlas/atlas.html'>atlas.html</a>"
        + (", the comparison in <a href='decode/compare/report.html'>compare/report.html</a>" if result else "")
        + f". Commands: <code>engramlab decode atlas --model {esc(ctx.model)} --out DIR</code>, "
        "<code>decode search</code>, <code>decode compare</code>, <code>decode steer</code>.</p>"
    )
    section = Section(
        title="Neuron decoding through the LM head (Davies 2025)",
        text=text,
        tables=[key_values(headline), table(sharp)],
        figures=figures,
    )
    return TourSection("decode", section, summary)
