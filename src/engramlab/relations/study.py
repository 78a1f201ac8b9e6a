"""The relation-neuron study end to end: load, find (or reuse a find), analyse, write tables, summary and report.

Each `run_*` function is what one `engramlab relations ...` command does; the CLI only parses options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engramlab.data.facts import PAPER1_RELATIONS, RELATIONS
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel, load_model
from engramlab.relations import effects, plots
from engramlab.relations.find import FindResult, find, top_units_table
from engramlab.relations.prompts import load_relations_for_study
from engramlab.relations.units import UnitSpace
from engramlab.report import Section, key_values, table, write_report
from engramlab.results import prepare_out_dir, write_json, write_parquet

RELATION_SETS = {"all": RELATIONS, "paper": PAPER1_RELATIONS}


@dataclass
class StudyOptions:
    """Options shared by every `relations` command (see `engramlab relations --help`)."""

    model: str = "organism:base"
    out: Path = Path("runs/rsn")
    relations: str = "all"  # "all", "paper", or a comma-separated list of relation names
    relation_files: list[str] = field(default_factory=list)
    k: int | None = None
    response: str = "last"  # engramlab's default; the paper's is "mean" (README explains why)
    units: str = "neurons"
    max_prompts: int | None = 1000
    eval_subjects: int | None = None
    neurons: Path | None = None  # reuse a previous `relations find` folder
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int = 32
    overwrite: bool = False
    resume: bool = False


def relation_names(spec: str) -> list[str]:
    if spec in RELATION_SETS:
        return list(RELATION_SETS[spec])
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in RELATIONS]
    if unknown:
        raise EngramError(f"--relations: unknown relation {unknown[0]!r}; choose 'all', 'paper' or names from: "
                          f"{', '.join(RELATIONS)}.")
    return names


@dataclass
class Study:
    opts: StudyOptions
    out: Path
    loaded: LoadedModel
    relations: dict
    found: FindResult
    space: UnitSpace


def prepare(opts: StudyOptions) -> Study:
    """Output folder, model, relations, and the find result (computed into `out` or read from `--neurons`)."""
    out = opts.out
    if not opts.resume:
        out = prepare_out_dir(out, opts.overwrite)
    else:
        out.mkdir(parents=True, exist_ok=True)
    names = relation_names(opts.relations) if opts.relations else []
    relations = load_relations_for_study(names, opts.relation_files)
    loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype)
    if opts.neurons is not None:
        found = FindResult.load(opts.neurons)
        missing = [n for n in relations if n not in found.relations]
        if missing:
            raise EngramError(f"--neurons {opts.neurons} has no neurons for relation {missing[0]!r}.")
        if opts.k:
            found.k = opts.k
    else:
        found = find(loaded, relations, out, k=opts.k, response=opts.response, units=opts.units,
                     max_prompts=opts.max_prompts, seed=opts.seed, batch_size=opts.batch_size)
        write_parquet(out / "neurons.parquet", top_units_table(found, UnitSpace(loaded.layout, found.units)))
    space = UnitSpace(loaded.layout, found.units)
    if space.size != found.ap.shape[1]:
        raise EngramError(f"--neurons {opts.neurons} was computed on a model with {found.ap.shape[1]} units; "
                          f"{opts.model} has {space.size}.")
    return Study(opts, out, loaded, {n: relations[n] for n in found.relations if n in relations}, found, space)


def _find_sections(study: Study) -> list[Section]:
    found = study.found
    counts = [{"relation": n, **c} for n, c in found.counts.items()]
    text = (f"<p>{found.n_units:,} units ({found.units}), response = {found.response}, k = {found.k}. "
            "AP chance level = 0.2 (1 positive : 4 negatives).</p>")
    return [Section("Relation-specific units (paper 1 §2.2)", text=text, tables=[table(counts)],
                    figures=[plots.ap_by_rank(found), plots.layer_histogram(found, study.space)])]


def _finish(study: Study, title: str, summary: dict, sections: list[Section]) -> dict:
    summary = {"model": study.opts.model, "units": study.found.units, "response": study.found.response,
               "n_units": study.found.n_units, **summary}
    write_json(study.out / "summary.json", summary)
    write_report(study.out / "report.html", title, _find_sections(study) + sections, summary)
    return summary


def run_find(opts: StudyOptions) -> dict:
    study = prepare(opts)
    found = study.found
    top_ap = {n: float(np.nanmean(found.ap[r][found.top(n)])) for r, n in enumerate(found.relations)}
    return _finish(study, "Relation-specific neurons: find",
                   {"relations": found.relations, "k": found.k, "counts": found.counts,
                    "mean_ap_top_k": top_ap, "seconds": found.seconds}, [])


def run_deactivate(opts: StudyOptions, n_random: int = 10) -> dict:
    study = prepare(opts)
    result = effects.deactivate(study.loaded, study.found, study.relations, study.space, opts.k, n_random,
                                opts.seed, opts.eval_subjects, opts.batch_size)
    write_parquet(study.out / "deactivation.parquet", result.rows)
    names = study.found.relations
    sections = [Section("Deactivation (paper 1 §4.2.1)", text=_drop_text(result.summary),
                        figures=[plots.deactivation_bars(result.per_relation, "heldout"),
                                 plots.deactivation_bars(result.per_relation, "seen")]),
                Section("Inter-relation effects (paper 1 §4.2.2)",
                        figures=[plots.drop_heatmap(result.matrix, names, "Relative accuracy drop "
                                                    "(acc_orig - acc_deact) / acc_orig")])]
    return _finish(study, "Relation-specific neurons: deactivation", result.summary, sections)


def _drop_text(summary: dict) -> str:
    keys = ("mean_drop_target", "mean_drop_random", "mean_drop_target_seen_templates",
            "mean_drop_target_heldout_templates", "mean_drop_random_heldout_templates", "mean_drop_offtarget")
    return key_values({k: summary[k] for k in keys})


def run_matrix(opts: StudyOptions) -> dict:
    study = prepare(opts)
    result = effects.deactivate(study.loaded, study.found, study.relations, study.space, opts.k, 0, opts.seed,
                                opts.eval_subjects, opts.batch_size)
    names = study.found.relations
    rows = [{"units_of": a, "evaluated": b, "relative_drop": float(result.matrix[i, j])}
            for i, a in enumerate(names) for j, b in enumerate(names)]
    write_parquet(study.out / "matrix.parquet", rows)
    summary = {"relations": names, "k": result.summary["k"], "matrix": result.matrix.tolist(),
               "mean_relative_drop_target": result.summary["mean_relative_drop_target"],
               "mean_relative_drop_offtarget": result.summary["mean_relative_drop_offtarget"],
               "interference_pairs": [(names[i], names[j]) for i, j in zip(*np.nonzero(result.matrix < 0))]}
    sections = [Section("Inter-relation accuracy drop (paper 1 Fig. 4)",
                        figures=[plots.drop_heatmap(result.matrix, names, "Relative accuracy drop")])]
    return _finish(study, "Relation-specific neurons: interference matrix", summary, sections)


def run_sweep(opts: StudyOptions, ks: list[int] | None = None) -> dict:
    study = prepare(opts)
    result = effects.sweep(study.loaded, study.found, study.relations, study.space, ks, opts.seed,
                           opts.eval_subjects, batch_size=opts.batch_size)
    write_parquet(study.out / "sweep.parquet", result.rows)
    write_parquet(study.out / "cumulativity.parquet", result.cumulativity)
    sections = [Section("Accuracy vs k (paper 1 §5.1)", figures=[plots.sweep_lines(result.rows)]),
                Section("Cumulative effect (paper 1 Table 3)", text=key_values(
                    {k: v for k, v in result.summary.items() if k.startswith("cumulativity")}),
                    tables=[table(result.cumulativity)])]
    return _finish(study, "Relation-specific neurons: k-sweep", result.summary, sections)


def run_overlap(opts: StudyOptions) -> dict:
    study = prepare(opts)
    result = effects.overlap(study.found, opts.k)
    write_parquet(study.out / "overlap.parquet", result["pairs"])
    sections = [Section("Overlap and versatility (paper 1 Fig. 2, §5.2)",
                        text=key_values({"mean_iou": result["mean_iou"], **result["versatility"]}),
                        figures=[plots.overlap_heatmap(result["pairs"], study.found.relations)])]
    return _finish(study, "Relation-specific neurons: overlap", result, sections)


def run_multilingual(opts: StudyOptions, languages: list[str], n_random: int = 3) -> dict:
    from engramlab.data.facts import load_relation
    from engramlab.data.multilingual import LANGUAGES, MULTILINGUAL_RELATIONS

    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise EngramError(f"--languages: no shipped templates for {unknown[0]!r}; available: {', '.join(LANGUAGES)}.")
    study = prepare(opts)
    shared = [n for n in MULTILINGUAL_RELATIONS if n in study.found.relations]
    if not shared:
        raise EngramError("--relations must include one of the translated relations: "
                          f"{', '.join(MULTILINGUAL_RELATIONS)}.")
    translated = {lang: {n: load_relation(n, lang) for n in shared} for lang in languages}
    translated = {"en": {n: study.relations[n] for n in shared}, **translated}
    rows, summary = effects.multilingual(study.loaded, study.found, translated, study.space, opts.k, n_random,
                                         opts.seed, opts.eval_subjects, opts.batch_size)
    write_parquet(study.out / "multilingual.parquet", rows)
    sections = [Section("Cross-lingual transfer (paper 1 §5.2)", tables=[table(rows)],
                        figures=[plots.language_bars(rows)])]
    return _finish(study, "Relation-specific neurons: other languages", summary, sections)
