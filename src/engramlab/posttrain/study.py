"""Base vs post-trained model, four analyses (paper 3): what each `engramlab posttrain` command runs and writes.

Defaults are sized for CPU and the shipped organisms; every count is an option. Choices the paper leaves to the
implementation (spec B.1-B.6) are fixed here and written into `summary.json`:
- knowledge: geometry-of-truth cities plus the organism's own country_capital and city_country statements (one
  map per template), 24 pairs each, maps base, post and both cross-model directions. The headline `pearson_r`
  averages the datasets whose pairs both models tell apart (`signal`: clean metric above the corrupted one,
  one-sided paired t-test over pairs, p < 0.05); `pearson_r_all` averages all. `knowledge_variant` picks one of
  `patching.VARIANTS` (`sft` patches statements from the chat organism's SFT data instead; `noise` has no
  cross-model maps). The paper's `tulu_extracted` set (Tulu-3 SFT data) is not available offline.
- truth: probe layer = the layer where the base model's mean leave-one-dataset-out probe accuracy peaks (or
  `truth_layer`); intervention layers = that layer and the two before it (the paper uses 5 layers ending at the
  probe layer of a 32-layer model); statements are the held-out split of each set (never trained by the
  organisms). The NIE is measured at the paper's positions (`truth_token="period"`: the token before the final
  "." and the "."; `"object"`: direction and intervention at the token before the "." only, geometry-of-truth's
  `noperiod`) and, as a diagnostic, at the final prompt token (`nie_last_token`).
- refusal: direction at `resid_pre` of the middle layer, last prompt token, from 64 harmful and 64 harmless
  training instructions; evaluated on held-out instructions. Addition adds c x r with r the un-normalised mean
  difference (c = 1 by default), so the scale needs no tuning per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engramlab.data import chat, statements
from engramlab.data.facts import load_relation
from engramlab.distributed import on_main
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel, check_device_and_dtype, load_model
from engramlab.posttrain import entropy, patching, refusal, truth
from engramlab.report import Section, esc, key_values, write_report
from engramlab.results import check_out_dir, prepare_out_dir, write_json, write_parquet

TRUTH_SETS = ("cities", "neg_cities", "sp_en_trans", "larger_than", "smaller_than", "facts")
TRUTH_TOKENS = ("period", "object")
SIGNAL_ALPHA = 0.05  # knowledge: a dataset counts in the headline r if both models tell its pairs apart
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
    knowledge_variant: str = "truefalse"  # knowledge: one of patching.VARIANTS
    noise_scale: float = 0.05  # knowledge, noise variant: noise std as a fraction of |embedding| (the paper's)
    per_set: int = 150  # truth: statements per dataset
    truth_layer: int | None = None  # truth: probe layer (None: where the base model's LOO accuracy peaks)
    truth_token: str = "period"  # truth: "period" (the paper's) or "object" (geometry-of-truth's noperiod)
    n_refusal_train: int = 64
    n_refusal_eval: int = 40
    refusal_layer: int | None = None
    refusal_coeff: float = 1.0
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        patching.check_variant(self.knowledge_variant)
        if self.truth_token not in TRUTH_TOKENS:
            raise EngramError(f"--token {self.truth_token!r} is unknown; choose one of: {', '.join(TRUTH_TOKENS)}.")
        counts = {
            "--seed": (self.seed, 0),
            "--batch-size": (self.batch_size, 1),
            "--max-pairs": (self.max_pairs, 2),
            "--per-set": (self.per_set, 4),
            "n_refusal_train": (self.n_refusal_train, 1),
            "n_refusal_eval": (self.n_refusal_eval, 1),
            "max_new_tokens": (self.max_new_tokens, 1),
        }
        for name, (value, minimum) in counts.items():
            if value < minimum:
                raise EngramError(f"{name} must be >= {minimum}, got {value}.")
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise EngramError(f"--noise-scale must be a finite number > 0, got {self.noise_scale}.")
        if not math.isfinite(self.refusal_coeff):
            raise EngramError(f"--coeff must be a finite number, got {self.refusal_coeff}.")
        check_device_and_dtype(self.device, self.dtype)


def _load(opts: Options) -> tuple[LoadedModel, LoadedModel]:
    base = load_model(opts.base, device=opts.device, dtype=opts.dtype, option="--base")
    post = load_model(opts.post, device=opts.device, dtype=opts.dtype, option="--post")
    for option, layer in (("--layer", opts.truth_layer), ("--layer", opts.refusal_layer)):
        if layer is not None and not -base.layout.n_layers <= layer < base.layout.n_layers:
            raise EngramError(
                f"{option} {layer} is out of range: {opts.base} has layers 0..{base.layout.n_layers - 1}."
            )
    neurons = [[spec.neurons for spec in m.layout.spec.layer_specs] for m in (base, post)]  # per layer (MoE mixes)
    if (
        base.layout.n_layers != post.layout.n_layers
        or base.layout.site_width("resid_pre") != post.layout.site_width("resid_pre")
        or neurons[0] != neurons[1]
    ):
        raise EngramError(
            f"--base {opts.base} and --post {opts.post} differ in shape; paper 3 compares a model "
            "with its own post-trained version."
        )
    return base, post


# ------------------------------------------------------------------------------------------------ knowledge


def _knowledge_sets(opts: Options) -> dict[str, tuple[list[statements.Statement], list[statements.Statement] | None]]:
    """{name: (statements, few-shot examples or None for the default ones)} for the chosen variant."""
    if opts.knowledge_variant == "sft":
        stmts = patching.sft_statements(opts.max_pairs * 4, opts.seed)
        shots = [stmts[0], stmts[3], stmts[2], stmts[1]]  # 2 TRUE, 2 FALSE, mixed order, not patched
        return {"sft": (stmts[4:], shots)}
    # one dataset per statement template, as in the paper: positions are aligned from the end of the prompt
    sets = {"cities": (statements.got_statements("cities", "all"), None)}
    sets.update({name: (patching.fact_pairs(load_relation(name), 60, opts.seed), None) for name in FACT_RELATIONS[:2]})
    return sets


def knowledge(base: LoadedModel, post: LoadedModel, opts: Options) -> tuple[dict, list[dict], list[Section]]:
    tok = base.require_tokenizer()
    variant = opts.knowledge_variant
    kinds = {"base": (base, base), "post": (post, post)}
    if variant != "noise":  # cross-model patching: one model's clean states into the other's corrupted run
        kinds.update({"base_to_post": (base, post), "post_to_base": (post, base)})
    summary, rows, figures = {"variant": variant}, [], []
    for name, (stmts, shots) in _knowledge_sets(opts).items():
        pairs = patching.pairs_by_last_word(
            stmts, tok, opts.max_pairs, opts.seed, render=lambda s, shots=shots: patching.prompt_for(variant, s, shots)
        )
        if len(pairs) < 2:
            continue
        try:
            maps = {
                k: patching.patching_map(
                    src,
                    tgt,
                    pairs,
                    shots=shots,
                    batch_size=opts.batch_size * 4,
                    variant=variant,
                    noise_scale=opts.noise_scale,
                    seed=opts.seed,
                )
                for k, (src, tgt) in kinds.items()
            }
        except EngramError as err:  # e.g. no_question pairs whose prompts all predict the same token
            summary.setdefault("skipped", {})[name] = str(err)
            continue
        norm = {k: m.normalised for k, m in maps.items()}
        diff = norm["base"] - norm["post"]
        pooled_diff = np.abs(patching.pool(diff, maps["post"].knowledge))  # [L, 3]
        summary[name] = {
            "pairs": maps["base"].n_pairs,
            # a map locates knowledge only where the model tells the pairs apart (clean metric above the
            # corrupted one, one-sided paired t-test over pairs at 5%), in both models
            "p_value": {k: maps[k].p_value for k in ("base", "post")},
            "signal": bool(all(maps[k].p_value < SIGNAL_ALPHA for k in ("base", "post"))),
            "pearson_r": patching.pearson(norm["base"], norm["post"]),
            "pearson_r_raw": patching.pearson(maps["base"].effect, maps["post"].effect),
            "max_abs_diff": float(np.abs(diff).max()),
            # the paper's pooled comparison: |base - post| of the normalised maps, max over layers per group
            "max_abs_diff_by_group": {
                g: float(np.nanmax(pooled_diff[:, j])) if np.isfinite(pooled_diff[:, j]).any() else float("nan")
                for j, g in enumerate(patching.GROUPS)
            },
            "clean": {k: {"clean": m.clean, "corrupted": m.corrupted} for k, m in maps.items()},
            # how much of the clean-corrupted gap the best single patch restores, per map
            "restored": {k: _restored(m) for k, m in maps.items()},
        }
        for kind, m in maps.items():
            for layer in range(m.effect.shape[0]):
                for pos, token in enumerate(m.tokens):
                    rows.append(
                        {
                            "dataset": name,
                            "variant": variant,
                            "map": kind,
                            "layer": layer,
                            "position": pos - len(m.tokens),
                            "token": token,
                            "knowledge": bool(m.knowledge[pos]),
                            "effect": float(m.effect[layer, pos]),
                            "normalised": float(norm[kind][layer, pos]),
                        }
                    )
        figures.append(_maps_figure(f"{name} ({variant})", maps, norm))
    datasets = [v for k, v in summary.items() if isinstance(v, dict) and "pearson_r" in v]
    if not datasets:
        raise EngramError(
            f"no dataset could be patched with --variant {variant}: "
            f"{summary.get('skipped', 'too few true/false pairs of equal token length')}"
        )
    with_signal = [v["pearson_r"] for v in datasets if v["signal"]]
    summary["pearson_r"] = float(np.nanmean(with_signal)) if with_signal else float("nan")
    # the knowledge gate of this analysis: a dataset whose pairs a model does not tell apart locates nothing
    summary["excluded_datasets"] = {
        name: f"no signal: a model does not tell its pairs apart (one-sided paired t-test p >= {SIGNAL_ALPHA})"
        for name, v in summary.items()
        if isinstance(v, dict) and "signal" in v and not v["signal"]
    } | {name: f"skipped: {why}" for name, why in summary.get("skipped", {}).items()}
    summary["pearson_r_all"] = float(np.nanmean([v["pearson_r"] for v in datasets]))
    return (
        summary,
        rows,
        [
            Section(
                f"Knowledge locations: activation patching, variant {variant} (paper 3 §4.1)",
                text=f"<p>{_VARIANT_TEXT[variant]} Every (layer, position) of the residual "
                "stream is patched from the clean run into the corrupted one; maps are "
                "normalised as in the paper (binned, one-sided).</p>" + _excluded_text(summary["excluded_datasets"]),
                figures=figures,
            )
        ],
    )


_VARIANT_TEXT = {
    "truefalse": "Clean run: the TRUE statement in the few-shot prompt; corrupted: its FALSE twin; metric "
    "logit(TRUE) - logit(FALSE).",
    "no_question": "Bare statements cut before the object word, no few-shot question; metric: logit of the clean "
    "prompt's argmax token minus the corrupted prompt's.",
    "noise": "Clean run: a statement in the few-shot prompt; corrupted: the same with Gaussian noise on the "
    "subject's embeddings; metric logit(TRUE) - logit(FALSE), sign-flipped for false statements.",
    "sft": "Statements from the chat organism's own SFT answers (sums, opposites, first letters), asked as in "
    "truefalse with 4 shots from the same set.",
}


def _excluded_text(excluded: dict[str, str]) -> str:
    """The datasets left out of the headline pearson_r, for the report."""
    if not excluded:
        return ""
    items = "".join(f"<li>{esc(name)}: {esc(why)}</li>" for name, why in excluded.items())
    return f"<p><b>Left out of pearson_r</b> (no knowledge to locate):</p><ul>{items}</ul>"


def _restored(m: patching.PatchingMap) -> float:
    gap = m.clean - m.corrupted
    return float((m.effect.max() - m.corrupted) / gap) if gap else float("nan")


def _maps_figure(name: str, maps: dict, norm: dict) -> go.Figure:
    kinds = list(maps)
    fig = make_subplots(
        rows=1, cols=len(kinds), subplot_titles=[k.replace("_", " -> ") for k in kinds], shared_yaxes=True
    )
    for i, kind in enumerate(kinds, start=1):
        fig.add_trace(
            go.Heatmap(
                z=norm[kind],
                x=[f"{j}:{t}" for j, t in enumerate(maps[kind].tokens)],
                zmin=0,
                zmax=1,
                colorscale="Blues",
                showscale=i == len(kinds),
            ),
            row=1,
            col=i,
        )
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
    drop_period = opts.truth_token == "object"
    labels = {n: np.array([s.label for s in st]) for n, st in sets.items()}
    acts = {
        m: {
            n: truth.statement_acts(lm, [s.text for s in st], layers, opts.batch_size, drop_period)
            for n, st in sets.items()
        }
        for m, lm in (("base", base), ("post", post))
    }
    loo = {
        m: {layer: truth.leave_one_out({n: acts[m][n][layer] for n in sets}, labels) for layer in layers} for m in acts
    }
    mean_loo = {m: [float(np.mean(list(loo[m][layer].values()))) for layer in layers] for m in acts}
    layer = int(np.argmax(mean_loo["base"])) if opts.truth_layer is None else base.layout.check_layer(opts.truth_layer)
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
    # intervention on the few-shot prompt, all four (direction source -> target model) pairs, at the paper's
    # positions and, as a diagnostic, at the final token where the answer is read out
    int_layers = list(range(max(0, layer - 2), layer + 1))
    positions = "object" if drop_period else "statement"
    eval_stmts = sets["facts"][:40] + sets["cities"][:40]
    y_eval = np.array([s.label for s in eval_stmts])
    nie, nie_last = {}, {}
    for tgt_name, tgt in (("base", base), ("post", post)):
        pd_base = truth.prob_difference(tgt, eval_stmts, batch_size=opts.batch_size)
        for src in directions:
            key = f"{src}_dir_on_{tgt_name}"
            for where, results in ((positions, nie), ("last", nie_last)):
                pd_int = truth.prob_difference(
                    tgt, eval_stmts, directions[src], int_layers, batch_size=opts.batch_size, positions=where
                )
                results[key] = truth.nie(pd_base, pd_int, y_eval)
    summary = {
        "layer": layer,
        "token": opts.truth_token,
        "intervention_layers": int_layers,
        "intervention_positions": positions,
        "cosine": truth.cosine(directions["base"], directions["post"]),
        "direction_norm": {m: float(np.linalg.norm(d)) for m, d in directions.items()},
        "probe_acc": probe_acc,
        "loo_acc_by_layer": mean_loo,
        "loo_acc_at_layer": {m: loo[m][layer] for m in loo},
        "nie": nie,
        "nie_last_token": nie_last,
        "n_intervention_statements": len(eval_stmts),
        "statements_per_set": {n: len(s) for n, s in sets.items()},
    }
    rows = [
        {"model": m, "layer": lay, "held_out": n, "accuracy": a}
        for m in loo
        for lay in layers
        for n, a in loo[m][lay].items()
    ]
    fig = go.Figure([go.Scatter(x=layers, y=mean_loo[m], mode="lines+markers", name=m) for m in mean_loo])
    fig.update_layout(
        title="Leave-one-dataset-out probe accuracy by layer",
        xaxis_title="layer",
        yaxis_title="accuracy",
        yaxis_range=[0, 1],
        height=360,
    )
    nie_fig = go.Figure(
        [
            go.Bar(x=list(nie), y=[v["nie"] for v in nie.values()], name=f"{positions} positions (paper)"),
            go.Bar(x=list(nie_last), y=[v["nie"] for v in nie_last.values()], name="final token"),
        ]
    )
    nie_fig.update_layout(
        title=f"Truth-direction intervention at layers {int_layers}: NIE (direction source -> target model)", height=340
    )
    section = Section(
        "Truthfulness direction (paper 3 §4.2)",
        text=key_values(
            {
                "layer": layer,
                "cosine(base, post)": summary["cosine"],
                **probe_acc,
                **{f"NIE {k}": v["nie"] for k, v in nie.items()},
                **{f"NIE at the final token {k}": v["nie"] for k, v in nie_last.items()},
            }
        ),
        figures=[fig, nie_fig],
    )
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
        directions[name] = refusal.refusal_direction(
            lm,
            refusal.chat_prompts(lm, harmful_train),
            refusal.chat_prompts(lm, harmless_train),
            layer,
            opts.batch_size,
        )
    prompts_harmful = refusal.chat_prompts(post, harmful_test)
    prompts_harmless = refusal.chat_prompts(post, harmless_test)

    def rate(prompts, intervention=None):
        texts = refusal.generate(post, prompts, opts.max_new_tokens, opts.batch_size, intervention)
        return refusal.refusal_rate(texts), texts

    results, rows = {}, []
    for label, prompts in (("harmful", prompts_harmful), ("harmless", prompts_harmless)):
        results[f"refusal_rate_{label}"], texts = rate(prompts)
        rows += [{"set": label, "direction": "none", "intervention": "none", "text": t} for t in texts]
    for src, d in directions.items():
        suffix = "" if src == "post" else "_base_direction"
        r, texts = rate(prompts_harmful, lambda d=d: refusal.ablation(post, d))
        results[f"refusal_rate_harmful_ablated{suffix}"] = r
        rows += [{"set": "harmful", "direction": src, "intervention": "ablate", "text": t} for t in texts]
        r, texts = rate(prompts_harmless, lambda d=d: refusal.addition(post, d, layer, opts.refusal_coeff))
        results[f"refusal_rate_harmless_added{suffix}"] = r
        rows += [{"set": "harmless", "direction": src, "intervention": "add", "text": t} for t in texts]
    # backward transfer: the post direction steering the base model
    base_harmless = refusal.chat_prompts(base, harmless_test)
    texts = refusal.generate(
        base,
        base_harmless,
        opts.max_new_tokens,
        opts.batch_size,
        lambda: refusal.addition(base, directions["post"], layer, opts.refusal_coeff),
    )
    results["base_refusal_rate_harmless_added_post_direction"] = refusal.refusal_rate(texts)
    summary = {
        "layer": layer,
        "coeff": opts.refusal_coeff,
        "cosine": truth.cosine(directions["base"], directions["post"]),
        "direction_norm": {k: float(np.linalg.norm(v)) for k, v in directions.items()},
        "n_eval": {"harmful": len(harmful_test), "harmless": len(harmless_test)},
        **results,
    }
    bars = go.Figure(go.Bar(x=list(results), y=list(results.values())))
    bars.update_layout(
        title="Refusal rate of the post model (and base, last bar) under interventions", yaxis_range=[0, 1], height=380
    )
    section = Section(
        "Refusal direction (paper 3 §4.3)",
        text=key_values({"layer": layer, "cosine(base, post)": summary["cosine"], **results}),
        figures=[bars],
    )
    return summary, rows, [section]


# ------------------------------------------------------------------------------------------------ entropy


def entropy_analysis(base: LoadedModel, post: LoadedModel, opts: Options) -> tuple[dict, list[dict], list[Section]]:
    texts = [s.text for s in statements.fact_statements(load_relation("country_capital"), "all")[:32]]
    found = {m: entropy.entropy_neurons(lm) for m, lm in (("base", base), ("post", post))}
    effects = {
        m: entropy.entropy_effect(lm, found[m].selected, texts, opts.batch_size)
        for m, lm in (("base", base), ("post", post))
    }
    summary = {
        "layer": found["base"].layer,
        "iou": entropy.iou(found["base"].selected, found["post"].selected),
        "neurons": {m: f.selected.tolist() for m, f in found.items()},
        "entropy": {m: e["entropy"] for m, e in effects.items()},
        "mean_abs_entropy_delta_when_ablated": {m: float(np.mean(np.abs(e["delta"]))) for m, e in effects.items()},
    }
    rows = [
        {
            "model": m,
            "neuron": int(i),
            "norm": float(f.norm[i]),
            "logit_var": float(f.logit_var[i]),
            "selected": bool(i in set(f.selected.tolist())),
        }
        for m, f in found.items()
        for i in range(f.norm.size)
    ]
    fig = go.Figure()
    for m, f in found.items():
        fig.add_trace(go.Scatter(x=f.norm, y=f.logit_var, mode="markers", name=m, marker={"size": 4, "opacity": 0.5}))
        fig.add_trace(
            go.Scatter(
                x=f.norm[f.selected],
                y=f.logit_var[f.selected],
                mode="markers",
                name=f"{m} entropy neurons",
                marker={"size": 10, "symbol": "x"},
            )
        )
    fig.update_layout(
        title="Last-layer neurons: norm vs LogitVar",
        xaxis_title="||w_out||",
        yaxis_title="LogitVar",
        yaxis_type="log",
        height=400,
    )
    section = Section(
        "Entropy neurons (paper 3 §4.4)",
        text=key_values(
            {"IoU(base, post)": summary["iou"], **{f"entropy {m}": v for m, v in summary["entropy"].items()}}
        ),
        figures=[fig],
    )
    return summary, rows, [section]


ANALYSES = {"knowledge": knowledge, "truth": truth_analysis, "refusal": refusal_analysis, "entropy": entropy_analysis}


def run(opts: Options, analyses: list[str]) -> dict:
    """Run the named analyses; write `<name>.parquet`, `summary.json` (one section each) and `report.html`."""
    on_main(check_out_dir, opts.out, opts.overwrite)  # under torchrun: rank 0 checks, every rank stops if refused
    base, post = _load(opts)
    on_main(prepare_out_dir, opts.out, opts.overwrite)
    out = Path(opts.out)
    summary, sections = {"base": opts.base, "post": opts.post}, []
    for name in analyses:
        part, rows, secs = ANALYSES[name](base, post, opts)
        write_parquet(out / f"{name}.parquet", rows)
        summary[name] = part
        sections += secs
    write_json(out / "summary.json", summary)
    write_report(out / "report.html", "How post-training reshapes the model (paper 3)", sections, summary)
    return summary
