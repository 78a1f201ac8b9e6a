"""The relation-neuron study end to end: load, find (or reuse a find), analyse, write tables, summary and report.

Each `run_*` function is what one `engramlab relations ...` command does; the CLI only parses options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engramlab.data.facts import PAPER1_RELATIONS, RELATIONS
from engramlab.distributed import on_main
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel, check_device_and_dtype, load_model, parse_max_memory
from engramlab.relations import effects, plots
from engramlab.relations.find import (
    FindResult,
    expert_concentration,
    find,
    load_identification,
    sample_rows,
    top_units_table,
)
from engramlab.relations.gate import MIN_SHARE, MIN_VALIDATED, KnowledgeGate, require_two
from engramlab.relations.perplexity import MAX_OBJECTS, perplexity
from engramlab.relations.prompts import frames_in, load_relations_for_study, split_templates, template_frames
from engramlab.relations.responses import RESPONSE_MODES
from engramlab.relations.template_control import DEFAULT_TOP, TemplateControl, template_control
from engramlab.relations.units import UNIT_KINDS, UnitSpace
from engramlab.report import Section, key_values, table, write_report
from engramlab.results import RunMarker, check_out_dir, prepare_out_dir, write_json, write_parquet

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
    heldout_templates: str | None = None  # None: the frames' own split (p1b, stmt2); "none"; or "frame,frame"
    neurons: Path | None = None  # reuse a previous `relations find` folder
    device: str = "auto"
    dtype: str = "auto"
    max_memory: str | None = None  # accelerate device_map caps, e.g. "0=20GiB,cpu=64GiB" (see load_model)
    offload_folder: Path | None = None  # disk offload for the weights that fit nowhere else
    seed: int = 0
    batch_size: int = 32
    overwrite: bool = False
    resume: bool = False
    min_validated: int = MIN_VALIDATED  # knowledge gate (gate.py): validated prompts a relation needs
    min_validated_share: float = MIN_SHARE  # ... and the share of its candidates
    layers: list[int] | None = None  # study only these layers' units (`--layers 10-20`); None: every layer

    def layer_list(self) -> list[int] | None:
        """`layers` sorted, without repeats (None: every layer)."""
        if self.layers is None:
            return None
        if not self.layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers):
            raise EngramError(f"--layers must list layer numbers >= 0, got {self.layers!r}.")
        return sorted(set(self.layers))

    def check(self) -> None:
        """Every check that needs neither the model nor a file: run before anything is loaded or written."""
        for name, value in (("--max-prompts", self.max_prompts), ("--eval-subjects", self.eval_subjects)):
            if value is not None and value < 1:
                raise EngramError(f"{name} must be >= 1, got {value}.")
        if self.k is not None and self.k < 1:
            raise EngramError(f"--k must be >= 1, got {self.k}.")
        if self.batch_size < 1 or self.seed < 0:
            raise EngramError(f"--batch-size must be >= 1 and --seed >= 0, got {self.batch_size} and {self.seed}.")
        if self.response not in RESPONSE_MODES:
            raise EngramError(
                f"--response {self.response!r} is not supported; choose one of: {', '.join(RESPONSE_MODES)}."
            )
        if self.units not in UNIT_KINDS:
            raise EngramError(f"--units {self.units!r} is not supported; choose one of: {', '.join(UNIT_KINDS)}.")
        self.gate()  # its own range checks
        self.layer_list()
        check_device_and_dtype(self.device, self.dtype)

    def gate(self) -> KnowledgeGate:
        return KnowledgeGate(self.min_validated, self.min_validated_share)

    def run_marker(self, command: str, extra: dict[str, Any]) -> RunMarker:
        """What `--resume` must match: the command and every option that decides its results."""
        skip = ("out", "overwrite", "resume", "device", "batch_size")
        options = {k: v for k, v in asdict(self).items() if k not in skip}
        return RunMarker(f"relations {command}", {**options, **extra}, self.resume)


def relation_names(spec: str) -> list[str]:
    if spec in RELATION_SETS:
        return list(RELATION_SETS[spec])
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in RELATIONS]
    if unknown:
        raise EngramError(
            f"--relations: unknown relation {unknown[0]!r}; choose 'all', 'paper' or names from: "
            f"{', '.join(RELATIONS)}."
        )
    return names


@dataclass
class Study:
    opts: StudyOptions
    out: Path
    loaded: LoadedModel
    relations: dict
    found: FindResult
    space: UnitSpace
    find_dir: Path  # the folder holding the find result (`out` or `--neurons`)


def prepare(opts: StudyOptions, command: str, extra: dict[str, Any] | None = None, ks: list[int] = ()) -> Study:
    """Output folder, model, relations (templates split by `--heldout-templates`), and the find result (computed
    into `out` or read from `--neurons`, whose template split is then the default and must not be contradicted).

    Order: every option, relation file and `--neurons` folder is checked, then --out (without writing), then the
    model is loaded and k (and `ks`) checked against its units; only then is --out created and written, so a run
    that fails on its input leaves nothing behind. `command` and `extra` (the command's own options) go into the
    run marker that `--resume` checks."""
    opts.check()
    run = opts.run_marker(command, extra or {})
    names = relation_names(opts.relations) if opts.relations else []
    relations = load_relations_for_study(names, opts.relation_files)
    found = None
    if opts.neurons is not None:
        found = _reused_find(opts, relations)
        if opts.layers is not None and opts.layer_list() != found.layers:
            raise EngramError(
                f"--layers {opts.layer_list()} differs from the layers of --neurons {opts.neurons} "
                f"({'all' if found.layers is None else found.layers}); leave --layers out to use the find's."
            )
        relations = _split_like({n: r for n, r in relations.items() if n in found.relations}, found, opts)
        _check_ks(opts, ks, found.n_units)
    else:
        relations = split_templates(relations, opts.heldout_templates)
    on_main(check_out_dir, opts.out, opts.overwrite, run)  # under torchrun: rank 0 checks, every rank stops if refused
    loaded = load_model(
        opts.model,
        device=opts.device,
        dtype=opts.dtype,
        max_memory=parse_max_memory(opts.max_memory),
        offload_folder=opts.offload_folder,
    )
    layers = found.layers if found is not None else opts.layer_list()
    space = UnitSpace(loaded.layout, found.units if found is not None else opts.units, layers)
    if found is not None and space.size != found.ap.shape[1]:
        raise EngramError(
            f"--neurons {opts.neurons} was computed on a model with {found.ap.shape[1]} units; "
            f"{opts.model} has {space.size}."
        )
    _check_ks(opts, ks, space.size)
    on_main(prepare_out_dir, opts.out, opts.overwrite, run)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)  # every rank sees the folder rank 0 prepared (its caches go there)
    if found is None:
        found = find(
            loaded,
            relations,
            out,
            k=opts.k,
            response=opts.response,
            units=opts.units,
            max_prompts=opts.max_prompts,
            seed=opts.seed,
            batch_size=opts.batch_size,
            gate=opts.gate(),
            layers=layers,
        )
        write_parquet(out / "neurons.parquet", top_units_table(found, space))
        find_dir = out
    else:
        find_dir = Path(opts.neurons)
    return Study(
        opts, out, loaded, {n: relations[n] for n in found.relations if n in relations}, found, space, find_dir
    )


def _reused_find(opts: StudyOptions, relations: dict) -> FindResult:
    """The `--neurons` find result, gated with this run's thresholds, for the requested relations."""
    found = FindResult.load(opts.neurons)
    missing = [n for n in relations if n not in found.relations and n not in found.excluded]
    if missing:
        raise EngramError(f"--neurons {opts.neurons} has no neurons for relation {missing[0]!r}.")
    found = found.gated(opts.gate())
    require_two([n for n in relations if n in found.relations], found.excluded, opts.model)
    if opts.k:
        found.k = opts.k
    return found


def _check_ks(opts: StudyOptions, ks: list[int], n_units: int) -> None:
    """--k (and the sweep's --ks) must not exceed the units there are to choose from."""
    for option, k in [("--k", opts.k), *(("--ks", k) for k in ks)]:
        if k is not None and k > n_units:
            raise EngramError(f"{option} {k} exceeds the {n_units:,} units ({opts.units}) of {opts.model}.")


def _check_counts(**values: tuple[int, int]) -> None:
    """Command options that count something: each (value, minimum)."""
    for name, (value, minimum) in values.items():
        if value < minimum:
            raise EngramError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}.")


def _split_like(relations: dict, found: FindResult, opts: StudyOptions) -> dict:
    """Split templates as `--heldout-templates` says or, by default, as the reused find did; refuse a split
    that calls a template "held out" although the units were selected on it (or the reverse)."""
    spec = opts.heldout_templates
    if spec is None and found.heldout_templates is not None:
        known = template_frames(relations)
        spec = ",".join(f for f in found.heldout_templates if f in known) or "none"
    split = split_templates(relations, spec)
    if found.selection_templates is None:  # a find folder from before the split was recorded
        return split
    used = set(found.selection_templates)
    for frame in frames_in(split, "heldout"):
        if frame in used:
            raise EngramError(
                f"--heldout-templates {spec}: frame {frame!r} was used for selection by --neurons "
                f"{opts.neurons}; run `relations find` with the same --heldout-templates."
            )
    for frame in frames_in(split, "selection"):
        if frame not in used:
            raise EngramError(
                f"--heldout-templates {spec}: frame {frame!r} was held out of selection by --neurons "
                f"{opts.neurons}; run `relations find` with the same --heldout-templates."
            )
    return split


def _find_sections(study: Study) -> list[Section]:
    found = study.found
    counts = [{"relation": n, **c} for n, c in found.counts.items()]
    text = (
        f"<p>{found.n_units:,} units ({found.units}), response = {found.response}, k = {found.k}. "
        "AP chance level = 0.2 (1 positive : 4 negatives).</p>"
    )
    return [
        Section(
            "Relation-specific units (paper 1 §2.2)",
            text=text,
            tables=[table(counts)],
            figures=[
                plots.ap_by_rank(found),
                plots.layer_histogram(found, study.space),
                *([plots.expert_histogram(found, study.space)] if study.space.has_experts else []),
            ],
        )
    ]


def _finish(study: Study, title: str, summary: dict, sections: list[Section]) -> dict:
    summary = {
        "model": study.opts.model,
        "units": study.found.units,
        "response": study.found.response,
        "n_units": study.found.n_units,
        **summary,
        "excluded_relations": study.found.excluded,
        "knowledge_gate": {"min_validated": study.opts.min_validated, "min_share": study.opts.min_validated_share},
    }
    write_json(study.out / "summary.json", summary)
    write_report(study.out / "report.html", title, _gate_sections(study) + _find_sections(study) + sections, summary)
    return summary


def _gate_sections(study: Study) -> list[Section]:
    """The knowledge gate's exclusions, first in the report so that no mean below is read without them."""
    excluded = study.found.excluded
    if not excluded:
        return []
    rows = [{"relation": n, **{k: e[k] for k in ("validated", "candidates", "reason")}} for n, e in excluded.items()]
    text = (
        f"<p><b>{len(excluded)} requested relation(s) excluded</b>: the model answers too few of their "
        f"identification prompts (the gate needs at least {study.opts.min_validated} validated prompts and "
        f"{study.opts.min_validated_share:.0%} of the candidates). They take no part in selection, negatives or any "
        "mean on this page.</p>"
    )
    return [Section("Knowledge gate: excluded relations", text=text, tables=[table(rows)])]


def run_find(opts: StudyOptions) -> dict:
    study = prepare(opts, "find")
    found = study.found
    top_ap = {n: float(np.nanmean(found.ap[r][found.top(n)])) for r, n in enumerate(found.relations)}
    return _finish(
        study,
        "Relation-specific neurons: find",
        {
            "relations": found.relations,
            "k": found.k,
            "counts": found.counts,
            "selection_templates": found.selection_templates,
            "heldout_templates": found.heldout_templates,
            "mean_ap_top_k": top_ap,
            **({"layers": found.layers} if found.layers is not None else {}),
            **({"experts": experts} if (experts := expert_concentration(found, study.space)) else {}),
            "seconds": found.seconds,
        },
        [],
    )


def run_deactivate(opts: StudyOptions, n_random: int = 10, diagnose: bool = True, top: int = DEFAULT_TOP) -> dict:
    """`relations deactivate`, with the template control on the top `top` units unless `diagnose` is off."""
    _check_counts(n_random=(n_random, 0), top=(top, 1))
    study = prepare(opts, "deactivate", {"random_seeds": n_random, "diagnose": diagnose, "diagnose_top": top})
    # the find's prompts are read (and checked) before any result is written
    prompts = _find_prompts(study) if diagnose else None
    result = effects.deactivate(
        study.loaded,
        study.found,
        study.relations,
        study.space,
        opts.k,
        n_random,
        opts.seed,
        opts.eval_subjects,
        opts.batch_size,
    )
    write_parquet(study.out / "deactivation.parquet", result.rows)
    names = study.found.relations
    groups = ("heldout", "seen") if result.summary["heldout_templates"] else ("seen",)
    sections = [
        Section(
            "Deactivation (paper 1 §4.2.1)",
            text=_drop_text(result.summary),
            figures=[plots.deactivation_bars(result.per_relation, g) for g in groups],
        ),
        Section(
            "Inter-relation effects (paper 1 §4.2.2)",
            figures=[
                plots.drop_heatmap(result.matrix, names, "Relative accuracy drop (acc_orig - acc_deact) / acc_orig")
            ],
        ),
    ]
    summary = result.summary
    if prompts is not None:
        control = _template_control(study, top, prompts)
        summary = {**summary, "template_control": _control_headline(control)}
        sections.append(_control_section(control))
    return _finish(study, "Relation-specific neurons: deactivation", summary, sections)


def _drop_text(summary: dict) -> str:
    keys = (
        "mean_drop_target",
        "mean_drop_random",
        "mean_drop_target_seen_templates",
        "mean_drop_target_heldout_templates",
        "mean_drop_random_heldout_templates",
        "mean_drop_offtarget",
    )
    text = key_values(
        {
            "selection templates": ", ".join(summary["selection_templates"]),
            "held-out templates": ", ".join(summary["heldout_templates"]) or "none",
            **{k: summary[k] for k in keys},
        }
    )
    if "heldout_note" in summary:
        text = f"<p>{summary['heldout_note']}</p>" + text
    return text


def _identification(study: Study) -> tuple:
    """(candidates, validated) P_det: from this run's find when there was one (every torchrun rank holds it, so no
    rank reads a file rank 0 is writing), else read back from the `--neurons` folder (the gate's relations only)."""
    return study.found.identification or load_identification(study.find_dir, study.found.relations)


def _find_prompts(study: Study) -> tuple:
    """The find's validated prompts and its (positive, negative) rows per relation, read back from the find folder
    and checked against find.json: done before any result of this run is written."""
    candidates, validated = _identification(study)
    rows, counts = sample_rows(validated, study.found.relations, candidates, study.found.seed)
    for name in study.found.relations:
        if counts[name] != study.found.counts.get(name):
            raise EngramError(
                f"{study.find_dir}: identification_prompts.parquet does not match find.json for "
                f"relation {name!r}; run `relations find` again."
            )
    return validated, rows


def _template_control(study: Study, top: int, prompts: tuple) -> TemplateControl:
    """The template control on the find's own validated prompts and negatives (`_find_prompts`); writes
    template_control.parquet."""
    validated, rows = prompts
    control = template_control(study.loaded, study.found, validated, rows, top, study.opts.batch_size)
    write_parquet(study.out / "template_control.parquet", control.rows)
    return control


def _control_headline(control: TemplateControl) -> dict:
    return {k: v for k, v in control.summary.items() if k != "per_relation"}


def _control_section(control: TemplateControl) -> Section:
    text = (
        "<p>AP of each relation's top units recomputed from the mean over the subject's tokens only and over "
        "the template's tokens only (same positives and negatives as selection). A unit is a template detector "
        f"when ap_template exceeds ap_subject by more than {control.summary['margin']}, a subject detector in "
        "the reverse case. Chance AP = 0.2.</p>"
    )
    per_relation = [{"relation": n, **s} for n, s in control.per_relation.items()]
    return Section(
        "Template control: subject-only vs template-only AP (issue 5)",
        text=text + key_values(_control_headline(control)),
        tables=[table(per_relation)],
        figures=[plots.template_scatter(control.rows)],
    )


def run_diagnose(opts: StudyOptions, top: int = DEFAULT_TOP) -> dict:
    """`relations diagnose`: the template control alone (find first unless `--neurons` is given)."""
    _check_counts(top=(top, 1))
    study = prepare(opts, "diagnose", {"top": top})
    control = _template_control(study, top, _find_prompts(study))
    return _finish(
        study,
        "Relation-specific neurons: template control",
        {"relations": study.found.relations, "k": study.found.k, **control.summary},
        [_control_section(control)],
    )


def run_perplexity(opts: StudyOptions, n_random: int = 10, max_objects: int = MAX_OBJECTS) -> dict:
    """`relations perplexity`: paper 1 §5.5's probe sentences before / after zeroing, with random controls."""
    _check_counts(n_random=(n_random, 0), max_objects=(max_objects, 1))
    study = prepare(opts, "perplexity", {"random_seeds": n_random, "max_objects": max_objects})
    _, validated = _identification(study)
    result = perplexity(
        study.loaded, study.found, validated, study.space, opts.k, n_random, opts.seed, max_objects, opts.batch_size
    )
    write_parquet(study.out / "perplexity.parquet", result.rows)
    headline = {k: v for k, v in result.summary.items() if k not in ("per_relation", "relations")}
    per_relation = [{"relation": n, **s} for n, s in result.per_relation.items()]
    text = (
        "<p>One fixed sentence per relation ends with the object; perplexity pools the NLL of every predicted "
        "token of the relation's sentences (object: the object's tokens only). Paper 1 Table 2 reads its "
        "numbers as no systematic degradation.</p>"
    )
    sections = [
        Section(
            "Perplexity probe (paper 1 §5.5)",
            text=text + key_values(headline),
            tables=[table(per_relation)],
            figures=[plots.perplexity_bars(result.per_relation)],
        )
    ]
    return _finish(study, "Relation-specific neurons: perplexity probe", result.summary, sections)


def run_matrix(opts: StudyOptions) -> dict:
    study = prepare(opts, "matrix")
    result = effects.deactivate(
        study.loaded,
        study.found,
        study.relations,
        study.space,
        opts.k,
        0,
        opts.seed,
        opts.eval_subjects,
        opts.batch_size,
    )
    names = study.found.relations
    rows = [
        {"units_of": a, "evaluated": b, "relative_drop": float(result.matrix[i, j])}
        for i, a in enumerate(names)
        for j, b in enumerate(names)
    ]
    write_parquet(study.out / "matrix.parquet", rows)
    summary = {
        "relations": names,
        "k": result.summary["k"],
        "matrix": result.matrix.tolist(),
        "mean_relative_drop_target": result.summary["mean_relative_drop_target"],
        "mean_relative_drop_offtarget": result.summary["mean_relative_drop_offtarget"],
        "interference_pairs": [(names[i], names[j]) for i, j in zip(*np.nonzero(result.matrix < 0), strict=True)],
    }
    sections = [
        Section(
            "Inter-relation accuracy drop (paper 1 Fig. 4)",
            figures=[plots.drop_heatmap(result.matrix, names, "Relative accuracy drop")],
        )
    ]
    return _finish(study, "Relation-specific neurons: interference matrix", summary, sections)


def run_sweep(opts: StudyOptions, ks: list[int] | None = None) -> dict:
    if ks is not None and (not ks or min(ks) < 1):
        raise EngramError(f"--ks values must be >= 1, got {ks}.")
    study = prepare(opts, "sweep", {"ks": ks}, ks or [])
    result = effects.sweep(
        study.loaded,
        study.found,
        study.relations,
        study.space,
        ks,
        opts.seed,
        opts.eval_subjects,
        batch_size=opts.batch_size,
    )
    write_parquet(study.out / "sweep.parquet", result.rows)
    write_parquet(study.out / "cumulativity.parquet", result.cumulativity)
    sections = [
        Section("Accuracy vs k (paper 1 §5.1)", figures=[plots.sweep_lines(result.rows)]),
        Section(
            "Cumulative effect (paper 1 Table 3)",
            text=key_values({k: v for k, v in result.summary.items() if k.startswith("cumulativity")}),
            tables=[table(result.cumulativity)],
        ),
    ]
    return _finish(study, "Relation-specific neurons: k-sweep", result.summary, sections)


def run_overlap(opts: StudyOptions) -> dict:
    study = prepare(opts, "overlap")
    result = effects.overlap(study.found, opts.k)
    write_parquet(study.out / "overlap.parquet", result["pairs"])
    sections = [
        Section(
            "Overlap and versatility (paper 1 Fig. 2, §5.2)",
            text=key_values({"mean_iou": result["mean_iou"], **result["versatility"]}),
            figures=[plots.overlap_heatmap(result["pairs"], study.found.relations)],
        )
    ]
    return _finish(study, "Relation-specific neurons: overlap", result, sections)


def run_multilingual(opts: StudyOptions, languages: list[str], n_random: int = 3) -> dict:
    from engramlab.data.multilingual import LANGUAGES, MULTILINGUAL_RELATIONS, relation_in

    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown or not languages:
        first = repr(unknown[0]) if unknown else "(none given)"
        raise EngramError(f"--languages: no shipped templates for {first}; available: {', '.join(LANGUAGES)}.")
    _check_counts(n_random=(n_random, 0))
    study = prepare(opts, "multilingual", {"languages": languages})
    shared = [n for n in MULTILINGUAL_RELATIONS if n in study.found.relations]
    if not shared:
        raise EngramError(
            f"--relations must include one of the translated relations: {', '.join(MULTILINGUAL_RELATIONS)}."
        )
    translated = {lang: {n: relation_in(n, lang) for n in shared} for lang in languages}
    translated = {"en": {n: study.relations[n] for n in shared}, **translated}
    rows, summary = effects.multilingual(
        study.loaded,
        study.found,
        translated,
        study.space,
        opts.k,
        n_random,
        opts.seed,
        opts.eval_subjects,
        opts.batch_size,
        opts.gate(),
    )
    write_parquet(study.out / "multilingual.parquet", rows)
    sections = [
        Section("Cross-lingual transfer (paper 1 §5.2)", tables=[table(rows)], figures=[plots.language_bars(rows)])
    ]
    return _finish(study, "Relation-specific neurons: other languages", summary, sections)
