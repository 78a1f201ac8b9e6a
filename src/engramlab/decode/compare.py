"""Base vs post-trained: how many neurons keep their top token (Davies 2025 §A.1, §A.2.4).

The paper: "over 75% of neurons in the up-projection layers in the instruct model have the same top associated
token compared to the pretrained model" (75.4% for Llama 3.1 8B). For each (layer, neuron) the top-1 token is
decoded under model A and under model B and the two are compared. Each model uses its own LM head by default
(the literal reading); `shared_head="a"|"b"` decodes both with one head, separating neuron drift from head drift.

Beyond the paper: the mean top-k overlap |top-k_A ∩ top-k_B| / k, and a chance level (agreement when B's neurons
are shuffled within each layer) so that "75%" can be read against what unrelated neurons would give.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engramlab.decode.atlas import Atlas, decode_atlas
from engramlab.errors import EngramError


@dataclass
class Comparison:
    """Top-1 agreement between two atlases of same-shaped models."""

    a: Atlas
    b: Atlas
    same: np.ndarray  # [L, N] bool: top-1 equal
    excluded: np.ndarray  # [L, N] bool: no top token in A or B (zero or non-finite vector), left out of every mean
    agreement: float
    agreement_per_layer: list[float]
    overlap_at_k: float  # mean |top-k_A ∩ top-k_B| / k
    overlap_per_layer: list[float]
    chance_agreement: float  # B's neurons shuffled within each layer
    shared_head: str | None = None
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def n_neurons(self) -> int:
        return int(self.same.size)

    @property
    def n_excluded(self) -> int:
        return int(self.excluded.sum())

    def summary(self) -> dict:
        return {
            "a": self.a.model,
            "b": self.b.model,
            "site": self.a.site,
            "fold_norm": self.a.fold_norm,
            "shared_head": self.shared_head,
            "n_neurons": self.n_neurons,
            "n_compared": self.n_neurons - self.n_excluded,
            "excluded_neurons": {"count": self.n_excluded, "reason": EXCLUDED_REASON},
            "n_layers": int(self.same.shape[0]),
            "layers": self.a.layer_ids,
            "agreement": self.agreement,
            "agreement_per_layer": self.agreement_per_layer,
            "top_k": self.a.top_k,
            "overlap_at_k": self.overlap_at_k,
            "overlap_per_layer": self.overlap_per_layer,
            "chance_agreement": self.chance_agreement,
            "seconds": round(self.seconds, 3),
            **self.meta,
        }


EXCLUDED_REASON = "weight vector zero or non-finite in A or B: such a neuron has no top token to compare"


def compare_atlases(a: Atlas, b: Atlas, seed: int = 0, exclude: np.ndarray | None = None) -> Comparison:
    """Agreement of two atlases (pure function over their arrays). Neurons in `exclude` ([L, N] bool) or with a
    non-finite top score in either atlas have no top token to compare (a zero vector scores every token alike, and
    two zero vectors would "agree" on token 0): they are left out of every mean, as the knowledge gate does for
    relations a model does not know."""
    if a.ids.shape != b.ids.shape:
        raise EngramError(
            f"the two atlases have different shapes: A is {_shape_text(a.ids.shape)}, B is {_shape_text(b.ids.shape)}."
        )
    if a.layer_ids != b.layer_ids:
        raise EngramError(f"the two atlases cover different layers: A {a.layer_ids}, B {b.layer_ids}.")
    top_a, top_b = a.top1, b.top1  # [L, N]
    excluded = ~(np.isfinite(a.scores[:, :, 0]) & np.isfinite(b.scores[:, :, 0]))
    if exclude is not None:
        excluded |= exclude
    valid = ~excluded
    if not valid.any():
        raise EngramError("no neuron has a top token in both models (every weight vector is zero or non-finite).")
    same = top_a == top_b
    k = a.top_k
    # overlap of the top-k sets: for each neuron, how many of A's ids appear among B's
    overlap = (a.ids[:, :, :, None] == b.ids[:, :, None, :]).any(axis=3).sum(axis=2) / k  # [L, N]
    rng = np.random.default_rng(seed)
    chance_hits = 0
    for layer in range(top_b.shape[0]):  # B's valid neurons shuffled within the layer
        idx = np.flatnonzero(valid[layer])
        chance_hits += int((top_a[layer, idx] == top_b[layer, rng.permutation(idx)]).sum())
    return Comparison(
        a=a,
        b=b,
        same=same,
        excluded=excluded,
        agreement=float(same[valid].mean()),
        agreement_per_layer=[_masked_mean(same[i], valid[i]) for i in range(same.shape[0])],
        overlap_at_k=float(overlap[valid].mean()),
        overlap_per_layer=[_masked_mean(overlap[i], valid[i]) for i in range(same.shape[0])],
        chance_agreement=chance_hits / int(valid.sum()),
    )


def _masked_mean(values: np.ndarray, keep: np.ndarray) -> float:
    return float(values[keep].mean()) if keep.any() else float("nan")


def undecodable(loaded, site: str, layers: Sequence[int] | None = None) -> np.ndarray:
    """[L, N] bool over the atlas's layers: neurons whose weight vector at `site` is all zero or not finite."""
    from engramlab.decode.atlas import neuron_vectors

    return np.stack(
        [
            ((v == 0).all(dim=1) | ~torch.isfinite(v).all(dim=1)).cpu().numpy()
            for v in neuron_vectors(loaded.layout, site, layers)
        ]
    )


def _shape_text(shape) -> str:
    return f"{shape[0]} layers x {shape[1]} neurons x top-{shape[2]}"


def model_shape(loaded) -> dict:
    """The shapes that must match for a neuron-by-neuron comparison (neurons: one number, or one per layer when
    they differ: a dense+MoE mix, a hybrid's layers without an MLP as 0)."""
    layout = loaded.layout
    widths = [spec.neurons for spec in layout.spec.layer_specs]  # the mlp.up width of each layer, 0 without an MLP
    return {
        "layers": layout.n_layers,
        "neurons": widths[0] if len(set(widths)) == 1 else "/".join(map(str, widths)),
        "hidden": int(layout.lm_head.weight.shape[1]),
        "vocab": int(layout.lm_head.weight.shape[0]),
    }


def check_same_shape(a, b) -> None:
    shape_a, shape_b = model_shape(a), model_shape(b)
    if shape_a != shape_b:

        def text(s: dict) -> str:
            return f"{s['layers']} layers x {s['neurons']} neurons, hidden {s['hidden']}, vocab {s['vocab']}"

        raise EngramError(
            f"the models have different shapes: A ({a.ref}) has {text(shape_a)}; "
            f"B ({b.ref}) has {text(shape_b)}. Neuron-by-neuron comparison needs the same shapes."
        )
    tok_a, tok_b = getattr(a, "tokenizer", None), getattr(b, "tokenizer", None)
    if tok_a is not None and tok_b is not None:
        n = min(len(tok_a), len(tok_b))
        if tok_a.convert_ids_to_tokens(list(range(n))) != tok_b.convert_ids_to_tokens(list(range(n))):
            raise EngramError(
                f"A ({a.ref}) and B ({b.ref}) have different vocabularies: the same token id means "
                "different tokens, so top-token agreement is meaningless."
            )


def compare_models(
    a,
    b,
    site: str = "up",
    top_k: int = 10,
    shared_head: str | None = None,
    fold_norm: bool = False,
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    layers: Sequence[int] | None = None,
) -> Comparison:
    """Decode both models (`LoadedModel`s) and compare their top-1 tokens neuron by neuron (at `layers`: see
    `engramlab.decode.atlas.atlas_layers`)."""
    if shared_head not in (None, "a", "b"):
        raise EngramError(f"--shared-head must be a or b, got {shared_head!r}.")
    check_same_shape(a, b)
    head = {"a": a, "b": b, None: None}[shared_head]
    start = time.perf_counter()
    atlases = [
        decode_atlas(
            m,
            site=site,
            top_k=top_k,
            fold_norm=fold_norm,
            chunk_size=chunk_size,
            head=head,
            progress=progress,
            layers=layers,
        )
        for m in (a, b)
    ]
    exclude = undecodable(a, site, layers) | undecodable(b, site, layers)
    result = compare_atlases(*atlases, seed=seed, exclude=exclude)
    result.shared_head = shared_head
    result.seconds = time.perf_counter() - start
    return result


def comparison_table(result: Comparison):
    """One row per neuron: layer, neuron, both top tokens and scores, same."""
    import pyarrow as pa

    a, b = result.a, result.b
    n_layers, per_layer = result.same.shape
    layer_ids = np.asarray(a.layer_ids, dtype=np.int32)
    flat_a, flat_b = a.top1.reshape(-1), b.top1.reshape(-1)
    vocab = pa.array(a.tokens if a.tokens is not None else [f"<id {i}>" for i in range(a.vocab_size)], pa.string())
    vocab_b = pa.array(b.tokens, pa.string()) if b.tokens is not None else vocab
    return pa.table(
        {
            "layer": np.repeat(layer_ids, per_layer),
            "neuron": np.tile(np.arange(per_layer, dtype=np.int32), n_layers),
            "token_id_a": flat_a.astype(np.int32),
            "token_a": vocab.take(pa.array(flat_a)),
            "score_a": a.scores[:, :, 0].reshape(-1),
            "token_id_b": flat_b.astype(np.int32),
            "token_b": vocab_b.take(pa.array(flat_b)),
            "score_b": b.scores[:, :, 0].reshape(-1),
            "same": result.same.reshape(-1),
            "excluded": result.excluded.reshape(-1),
        }
    )


def agreement_figure(result: Comparison):
    """Per-layer top-1 agreement and top-k overlap, with the shuffled-neuron chance level."""
    import plotly.graph_objects as go

    layers = result.a.layer_ids
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=result.agreement_per_layer, mode="lines+markers", name="top-1 agreement"))
    fig.add_trace(
        go.Scatter(x=layers, y=result.overlap_per_layer, mode="lines+markers", name=f"top-{result.a.top_k} overlap")
    )
    fig.add_hline(y=result.chance_agreement, line_dash="dot", annotation_text="chance (shuffled neurons)")
    fig.update_layout(
        title=f"Neurons keeping their top token: {result.a.model} vs {result.b.model} (site {result.a.site})",
        xaxis_title="layer",
        yaxis_title="fraction",
        yaxis_range=[0, 1.02],
        height=420,
    )
    return fig


def write_comparison(result: Comparison, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """compare.parquet, report.html (agreement per layer) and summary.json in `out`."""
    import pyarrow.compute as pc

    from engramlab.distributed import on_main
    from engramlab.report.html import Section, key_values, table, write_report
    from engramlab.results import prepare_out_dir, write_json, write_parquet

    out_dir = Path(on_main(prepare_out_dir, out, overwrite) or out)  # rank 0 only; the others write nothing
    rows = comparison_table(result)
    write_parquet(out_dir / "compare.parquet", rows)
    summary = result.summary()
    fig = agreement_figure(result)
    changed = rows.filter(pc.and_(pc.invert(rows["same"]), pc.invert(rows["excluded"])))
    examples = changed.sort_by([("score_b", "descending")]).slice(0, 20).to_pylist()
    for row in examples:  # quoted, so that leading spaces show
        row["token_a"], row["token_b"] = repr(row["token_a"]), repr(row["token_b"])
    headline = {
        "A": result.a.model,
        "B": result.b.model,
        "site": result.a.site,
        "head": f"shared ({result.shared_head})" if result.shared_head else "each its own",
        "fold_norm": result.a.fold_norm,
        "neurons": result.n_neurons,
        "neurons excluded (no top token)": result.n_excluded,
        "top-1 agreement": round(result.agreement, 4),
        f"top-{result.a.top_k} overlap": round(result.overlap_at_k, 4),
        "chance agreement": round(result.chance_agreement, 4),
    }
    sections = [
        Section(
            "Top-token agreement",
            text=(
                "<p>For every MLP neuron, its weight vector is decoded through the LM head (Davies 2025) under model A "
                "and under model B; a neuron <em>agrees</em> when both give the same top token. Davies reports 75.4% "
                "for Llama 3.1 8B base vs Instruct (up_proj).</p>"
            ),
            tables=[key_values(headline)],
            figures=[fig],
        ),
        Section(
            "Neurons whose top token changed (highest B score first)",
            tables=[table(examples, ["layer", "neuron", "token_a", "score_a", "token_b", "score_b"])],
        ),
    ]
    write_report(out_dir / "report.html", "Neuron decoding: base vs post-trained", sections, summary)
    write_json(out_dir / "summary.json", summary)
    return summary
