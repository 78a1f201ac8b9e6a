"""Base vs post-trained model, four analyses (paper 3): what each `engramlab posttrain` command runs and writes.

Defaults are sized for CPU and the shipped organisms; every count is an option. Choices the paper leaves to the
implementation (spec B.1-B.6) are fixed here and written into `summary.json`:
- truth: probe layer = the layer where the base model's mean leave-one-dataset-out probe accuracy peaks;
  intervention layers = that layer and the two before it (the paper uses 5 layers ending at the probe layer of a
  32-layer model); statements are the held-out split of each set (never trained by the organisms).
- refusal: direction at `resid_pre` of the middle layer, last prompt token, from 64 harmful and 64 harmless
  training instructions; evaluated on held-out instructions. Addition adds c x r with r the un-normalised mean
  difference (c = 1 by default), so the scale needs no tuning per model.
- knowledge: geometry-of-truth cities plus the organism's own country_capital and city_country statements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engramlab.data import chat, statements
from engramlab.data.facts import load_relation
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel, load_model
from engramlab.posttrain import entropy, patching, refusal, truth
from engramlab.report import Section, key_values, table, write_report
from engramlab.results import prepare_out_dir, write_json, write_parquet

TRUTH_SETS = ("cities", "neg_cities", "sp_en_trans", "larger_than", "smaller_than", "facts")
FACT_RELATIONS = ("country_capital", "city_country", "company_hq", "star_constellation")


@dataclass
class Options:
    base: str = "organism:base"
    post: str = "organism:chat"
    out: Path = Path("runs/posttrain")
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int = 16
    overwrite: bool = False
    max_pairs: int = 24  # knowledge: true/false pairs per dataset
    per_set: int = 150  # truth: statements per dataset
    n_refusal_train: int = 64
    n_refusal_eval: int = 40
    refusal_layer: int | None = None
    refusal_coeff: float = 1.0
    max_new_tokens: int = 16


def _load(opts: Options) -> tuple[LoadedModel, LoadedModel]:
    base = load_model(opts.base, device=opts.device, dtype=opts.dtype)
    post = load_model(opts.post, device=opts.device, dtype=opts.dtype)
    if base.layout.n_layers != post.layout.n_layers or base.layout.site_width("resid_pre") != \
            post.layout.site_width("resid_pre") or base.layout.site_width("mlp.act") != post.layout.site_width("mlp.act"):
        raise EngramError(f"--base {opts.base} and --post {opts.post} differ in shape; paper 3 compares a model "
                          "with its own post-trained version.")
    return base, post


# ------------------------------------------------------------------------------------------------ knowledge

def knowledge(base: LoadedModel, post: LoadedModel, opts: Options) -> tuple[dict, list[dict], list[Section]]:
    tok = base.require_tokenizer()
    datasets = {"cities": statements.got_statements("cities", "all"),
                "facts": [s for name in FACT_RELATIONS[:2] for s in patching.fact_pairs(load_relation(name), 60,
                                                                                         opts.seed)]}
    summary, rows, figures = {}, [], []
    for name, stmts in datasets.items():
        pairs = patching.pairs_by_last_word(stmts, tok, opts.max_pairs, opts.seed)
        if len(pairs) < 2:
            continue
        maps = {"base": patching.patching_map(base, base, pairs, batch_size=opts.batch_size * 4),
                "post": patching.patching_map(post, post, pairs, batch_size=opts.batch_size * 4),
                "base_to_post": patching.patching_map(base, post, pairs, batch_size=opts.batch_size * 4),
                "post_to_base": patching.patching_map(post, base, pairs, batch_size=opts.batch_size * 4)}
        norm = {k: m.normalised for k, m in maps.items()}
        diff = norm["base"] - norm["post"]
        summary[name] = {
            "pairs": len(pairs),
            "pearson_r": patching.pearson(norm["base"], norm["post"]),
            "pearson_r_raw": patching.pearson(maps["base"].effect, maps["post"].effect),
            "max_abs_diff": float(np.abs(diff).max()),
            "clean": {k: {"true": m.clean_true, "false": m.clean_false} for k, m in maps.items()},
            # how much of the TRUE-FALSE gap the best single patch restores, per direction of patching
            "restored": {k: _restored(m) for k, m in maps.items()},
        }
        for kind, m in maps.items():
            for layer in range(m.effect.shape[0]):
                for pos, token in enumerate(m.tokens):
                    rows.append(dict(dataset=name, map=kind, layer=layer, position=pos - len(m.tokens), token=token,
                                     effect=float(m.effect[layer, pos]), normalised=float(norm[kind][layer, pos])))
        figures.append(_maps_figure(name, maps, norm))
    if not summary:
        raise EngramError("no dataset gave two or more true/false pairs of equal token length.")
    summary["pearson_r"] = float(np.nanmean([v["pearson_r"] for v in summary.values()]))
    return summary, rows, [Section("Knowledge locations: activation patching (paper 3 §4.1)",
                                   text="<p>Residual stream patched from the TRUE run into the FALSE run at every "
                                        "(layer, position); normalised as in the paper (binned, one-sided).</p>",
                                   figures=figures)]


def _restored(m: patching.PatchingMap) -> float:
    gap = m.clean_true - m.clean_false
    return float((m.effect.max() - m.clean_false) / gap) if gap else float("nan")


def _maps_figure(name: str, maps: dict, norm: dict) -> go.Figure:
    kinds = list(maps)
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[k.replace("_", " -> ") for k in kinds],
                        shared_yaxes=True)
    for i, kind in enumerate(kinds, start=1):
        fig.add_trace(go.Heatmap(z=norm[kind], x=[f"{j}:{t}" for j, t in enumerate(maps[kind].tokens)],
                                 zmin=0, zmax=1, colorscale="Blues", showscale=i == len(kinds)), row=1, col=i)
    fig.update_layout(title=f"{name}: normalised patching maps (rows = layers)", height=380)
    return fig


# ------------------------------------------------------------------------------------------------ truth

def _truth_sets(opts: Options) -> dict[str, list[statements.Statement]]:
    sets = {}
    for name in TRUTH_SETS:
        if name == "facts":
            stmts = [s for rel in FACT_RELATIONS for s in statements.fact_statements(load_relation(rel), "heldout")]
        else:
            stmts = statements.got_statements(name, "heldout")
        rng = np.random.default_rng(opts.seed)
        sets[name] = [stmts[i] for i in rng.permutation(len(stmts))[: opts.per_set]]
    return sets


def truth_analysis(base: LoadedModel, post: LoadedModel, opts: Options) -> tuple[dict, list[dict], list[Section]]:
    sets = _truth_sets(opts)
    layers = list(range(base.layout.n_layers))
    labels = {n: np.array([s.label for s in st]) for n, st in sets.items()}
    acts = {m: {n: truth.statement_acts(lm, [s.text for s in st], layers, opts.batch_size) for n, st in sets.items()}
            for m, lm in (("base", base), ("post", post))}
    loo = {m: {layer: truth.leave_one_out({n: acts[m][n][layer] for n in sets}, labels) for layer in layers}
           for m in acts}
    mean_loo = {m: [float(np.mean(list(loo[m][layer].values()))) for layer in layers] for m in acts}
    layer = int(np.argmax(mean_loo["base"]))
    directions, probes = {}, {}
    for m in acts:
        stacked = np.concatenate([acts[m][n][layer] - acts[m][n][layer].mean(0) for n in sets])
        y = np.concatenate([labels[n] for n in sets])
        directions[m] = truth.mm_direction(stacked, y)
        probes[m] = (stacked, y)
    probe_acc = {}
    for src in directions:
        for tgt in directions:
            stacked, y = probes[tgt]
            probe_acc[f"{src}_dir_on_{tgt}"] = truth.Probe.fit(directions[src], stacked, y).accuracy(stacked, y)
    # intervention on the few-shot prompt, all four (direction source -> target model) pairs
    int_layers = list(range(max(0, layer - 2), layer + 1))
    eval_stmts = sets["facts"][:40] + sets["cities"][:40]
    y_eval = np.array([s.label for s in eval_stmts])
    nie = {}
    for tgt_name, tgt in (("base", base), ("post", post)):
        pd_base = truth.prob_difference(tgt, eval_stmts, batch_size=opts.batch_size)
        for src in directions:
            pd_int = truth.prob_difference(tgt, eval_stmts, directions[src], int_layers, batch_size=opts.batch_size)
            nie[f"{src}_dir_on_{tgt_name}"] = truth.nie(pd_base, pd_int, y_eval)
    summary = {"layer": layer, "intervention_layers": int_layers, "cosine": truth.cosine(directions["base"],
                                                                                        directions["post"]),
               "probe_acc": probe_acc, "loo_acc_by_layer": mean_loo,
               "loo_acc_at_layer": {m: loo[m][layer] for m in loo}, "nie": nie,
               "statements_per_set": {n: len(s) for n, s in sets.items()}}
    rows = [dict(model=m, layer=lay, held_out=n, accuracy=a) for m in loo for lay in layers
            for n, a in loo[m][lay].items()]
    fig = go.Figure([go.Scatter(x=layers, y=mean_loo[m], mode="lines+markers", name=m) for m in mean_loo])
    fig.update_layout(title="Leave-one-dataset-out probe accuracy by layer", xaxis_title="layer",
                      yaxis_title="accuracy", yaxis_range=[0.4, 1], height=360)
    nie_fig = go.Figure(go.Bar(x=list(nie), y=[v["nie"] for v in nie.values()]))
    nie_fig.update_layout(title="Truth-direction intervention: mean NIE (direction source -> target model)",
                          height=340)
    section = Section("Truthfulness direction (paper 3 §4.2)",
                      text=key_values({"layer": layer, "cosine(base, post)": summary["cosine"], **probe_acc}),
                      figures=[fig, nie_fig])
    return summary, rows, [section]


# ------------------------------------------------------------------------------------------------ refusal

def refusal_analysis(base: LoadedModel, post: LoadedModel, opts: Options) -> tuple[dict, list[dict], list[Section]]:
    harmful_train, harmful_test = chat.advbench_split()
    harmless = [e.user for e in chat.harmless_examples("heldout", opts.n_refusal_train + opts.n_refusal_eval)]
    harmful_train = harmful_train[: opts.n_refusal_train]
    harmful_test = harmful_test[: opts.n_refusal_eval]
    harmless_train, harmless_test = harmless[: opts.n_refusal_train], harmless[opts.n_refusal_train :]
    layer = opts.refusal_layer if opts.refusal_layer is not None else base.layout.n_layers // 2
    base.layout.check_layer(layer)
    directions = {}
    for name, lm in (("base", base), ("post", post)):
        directions[name] = refusal.refusal_direction(lm, refusal.chat_prompts(lm, harmful_train),
                                                     refusal.chat_prompts(lm, harmless_train), layer, opts.batch_size)
    prompts_harmful = refusal.chat_prompts(post, harmful_test)
    prompts_harmless = refusal.chat_prompts(post, harmless_test)

    def rate(prompts, intervention=None):
        texts = refusal.generate(post, prompts, opts.max_new_tokens, opts.batch_size, intervention)
        return refusal.refusal_rate(texts), texts

    results, rows = {}, []
    for label, prompts, kind in (("harmful", prompts_harmful, None), ("harmless", prompts_harmless, None)):
        results[f"refusal_rate_{label}"], texts = rate(prompts)
        rows += [dict(set=label, direction="none", intervention="none", text=t) for t in texts]
    for src, d in directions.items():
        suffix = "" if src == "post" else "_base_direction"
        r, texts = rate(prompts_harmful, lambda d=d: refusal.ablation(post, d))
        results[f"refusal_rate_harmful_ablated{suffix}"] = r
        rows += [dict(set="harmful", direction=src, intervention="ablate", text=t) for t in texts]
        r, texts = rate(prompts_harmless, lambda d=d: refusal.addition(post, d, layer, opts.refusal_coeff))
        results[f"refusal_rate_harmless_added{suffix}"] = r
        rows += [dict(set="harmless", direction=src, intervention="add", text=t) for t in texts]
    # backward transfer: the post direction steering the base model
    base_harmless = refusal.chat_prompts(base, harmless_test)
    texts = refusal.generate(base, base_harmless, opts.max_new_tokens, opts.batch_size,
                             lambda: refusal.addition(base, directions["post"], layer, opts.refusal_coeff))
    results["base_refusal_rate_harmless_added_post_direction"] = refusal.refusal_rate(texts)
    summary = {"layer": layer, "coeff": opts.refusal_coeff,
               "cosine": truth.cosine(directions["base"], directions["post"]),
               "direction_norm": {k: float(np.linalg.norm(v)) for k, v in directions.items()},
               "n_eval": {"harmful": len(harmful_test), "harmless": len(harmless_test)}, **results}
    bars = go.Figure(go.Bar(x=list(results), y=list(results.values())))
    bars.update_layout(title="Refusal rate of the post model (and base, last bar) under interventions",
                       yaxis_range=[0, 1], height=380)
    section = Section("Refusal direction (paper 3 §4.3)", text=key_values(
        {"layer": layer, "cosine(base, post)": summary["cosine"], **results}), figures=[bars])
    return summary, rows, [section]


# ------------------------------------------------------------------------------------------------ entropy

def entropy_analysis(base: LoadedModel, post: LoadedModel, opts: Options) -> tuple[dict, list[dict], list[Section]]:
    texts = [s.text for s in statements.fact_statements(load_relation("country_capital"), "all")[:32]]
    found = {m: entropy.entropy_neurons(lm) for m, lm in (("base", base), ("post", post))}
    effects = {m: entropy.entropy_effect(lm, found[m].selected, texts, opts.batch_size)
               for m, lm in (("base", base), ("post", post))}
    summary = {"layer": found["base"].layer, "iou": entropy.iou(found["base"].selected, found["post"].selected),
               "neurons": {m: f.selected.tolist() for m, f in found.items()},
               "entropy": {m: e["entropy"] for m, e in effects.items()},
               "mean_abs_entropy_delta_when_ablated": {m: float(np.mean(np.abs(e["delta"]))) for m, e in effects.items()}}
    rows = [dict(model=m, neuron=int(i), norm=float(f.norm[i]), logit_var=float(f.logit_var[i]),
                 selected=bool(i in set(f.selected.tolist()))) for m, f in found.items() for i in range(f.norm.size)]
    fig = go.Figure()
    for m, f in found.items():
        fig.add_trace(go.Scatter(x=f.norm, y=f.logit_var, mode="markers", name=m, marker=dict(size=4, opacity=0.5)))
        fig.add_trace(go.Scatter(x=f.norm[f.selected], y=f.logit_var[f.selected], mode="markers",
                                 name=f"{m} entropy neurons", marker=dict(size=10, symbol="x")))
    fig.update_layout(title="Last-layer neurons: norm vs LogitVar", xaxis_title="||w_out||",
                      yaxis_title="LogitVar", yaxis_type="log", height=400)
    section = Section("Entropy neurons (paper 3 §4.4)", text=key_values(
        {"IoU(base, post)": summary["iou"], **{f"entropy {m}": v for m, v in summary["entropy"].items()}}),
        figures=[fig])
    return summary, rows, [section]


ANALYSES = {"knowledge": knowledge, "truth": truth_analysis, "refusal": refusal_analysis, "entropy": entropy_analysis}


def run(opts: Options, analyses: list[str]) -> dict:
    """Run the named analyses; write `<name>.parquet`, `summary.json` (one section each) and `report.html`."""
    out = prepare_out_dir(opts.out, opts.overwrite)
    base, post = _load(opts)
    summary, sections = {"base": opts.base, "post": opts.post}, []
    for name in analyses:
        part, rows, secs = ANALYSES[name](base, post, opts)
        write_parquet(out / f"{name}.parquet", rows)
        summary[name] = part
        sections += secs
    write_json(out / "summary.json", summary)
    write_report(out / "report.html", "How post-training reshapes the model (paper 3)", sections, summary)
    return summary
