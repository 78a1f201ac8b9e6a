"""`engramlab relations ...`: thin typer commands over `engramlab.relations.study`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from engramlab.cli_options import DEFAULT_MODEL, BatchSize, Device, Dtype, MaxMemory, OffloadFolder, Overwrite, Seed
from engramlab.relations import study

app = typer.Typer(help="Relation-specific neurons (Liu et al., EMNLP 2025).", no_args_is_help=True)
console = Console()

Relations = Annotated[
    str,
    typer.Option("--relations", help="'all' (18 shipped relations), 'paper' (paper 1's 12), or comma-separated names."),
]
RelationFile = Annotated[
    list[str] | None, typer.Option("--relation-file", help="An LRE-format JSON relation (repeatable).")
]
K = Annotated[int | None, typer.Option("--k", min=1, help="Units per relation (default: min(3000, 2.5% of units)).")]
Response = Annotated[
    str,
    typer.Option(
        "--response", help="last (default: the last prompt token) or mean (the paper's mean over prompt tokens)."
    ),
]
Units = Annotated[str, typer.Option("--units", help="neurons (gate/up/down outputs) or channels (gate/up pair once).")]
MaxPrompts = Annotated[int, typer.Option("--max-prompts", min=1, help="Identification prompts per relation.")]
EvalSubjects = Annotated[
    int | None, typer.Option("--eval-subjects", min=1, help="Cap on eval subjects per relation (default: all, 50).")
]
Heldout = Annotated[
    str | None,
    typer.Option(
        "--heldout-templates",
        help="Template frames held out of selection, comma-separated (p1, stmt, qa, p1b, stmt2, "
        "zs); 'none' = select on every template (the paper). Default: p1b,stmt2, or with "
        "--neurons the split that find used.",
    ),
]
Neurons = Annotated[
    Path | None, typer.Option("--neurons", help="Reuse the units of a previous `relations find` folder.")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out (reuses its cache).")]
Out = Annotated[Path, typer.Option("--out", help="Folder for summary.json, parquet tables and report.html.")]
Model = Annotated[str, typer.Option("--model", help="Local HF model directory, organism:NAME, or a Hub id.")]


def _options(**kwargs) -> study.StudyOptions:
    return study.StudyOptions(**kwargs)


def _show(summary: dict, keys: tuple[str, ...], out: Path) -> None:
    shown = {k: summary[k] for k in keys if k in summary}
    console.print_json(json.dumps(shown, default=str))
    console.print(f"wrote {out}/summary.json and {out}/report.html")


@app.command("find")
def find_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn-find"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    heldout_templates: Heldout = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Rank every FFN unit by AP for each relation; write the top-k table and the layer histogram."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        relation_files=relation_file or [],
        k=k,
        response=response,
        units=units,
        max_prompts=max_prompts,
        heldout_templates=heldout_templates,
        device=device,
        dtype=dtype,
        max_memory=max_memory,
        offload_folder=offload_folder,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    _show(study.run_find(opts), ("relations", "k", "counts", "mean_ap_top_k"), out)


@app.command("deactivate")
def deactivate_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    eval_subjects: EvalSubjects = None,
    random_seeds: int = typer.Option(10, "--random-seeds", min=0, help="Random-unit controls."),
    heldout_templates: Heldout = None,
    diagnose: bool = typer.Option(
        True, "--diagnose/--no-diagnose", help="Also run the template control (subject vs template AP)."
    ),
    diagnose_top: int = typer.Option(
        100, "--diagnose-top", min=1, help="Top units per relation in the template control."
    ),
    neurons: Neurons = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Zero each relation's top-k units: accuracy before/after, random controls, seen vs held-out templates."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        relation_files=relation_file or [],
        k=k,
        response=response,
        units=units,
        max_prompts=max_prompts,
        eval_subjects=eval_subjects,
        heldout_templates=heldout_templates,
        neurons=neurons,
        device=device,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    summary = study.run_deactivate(opts, random_seeds, diagnose, diagnose_top)
    _show(
        summary,
        (
            "k",
            "mean_drop_target",
            "mean_drop_random",
            "mean_drop_target_seen_templates",
            "mean_drop_target_heldout_templates",
            "heldout_note",
            "mean_drop_offtarget",
            "template_control",
        ),
        out,
    )


@app.command("diagnose")
def diagnose_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn-diagnose"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    top: int = typer.Option(100, "--top", min=1, help="Top units per relation to diagnose."),
    heldout_templates: Heldout = None,
    neurons: Neurons = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Template control: each top unit's AP from subject tokens only vs template tokens only."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        relation_files=relation_file or [],
        k=k,
        response=response,
        units=units,
        max_prompts=max_prompts,
        heldout_templates=heldout_templates,
        neurons=neurons,
        device=device,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    _show(
        study.run_diagnose(opts, top),
        (
            "top",
            "n_units",
            "median_ap",
            "median_ap_subject",
            "median_ap_template",
            "share_template_detectors",
            "share_subject_detectors",
        ),
        out,
    )


@app.command("perplexity")
def perplexity_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn-perplexity"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    random_seeds: int = typer.Option(10, "--random-seeds", min=0, help="Random-unit controls."),
    max_objects: int = typer.Option(50, "--max-objects", min=1, help="Distinct objects (sentences) per relation."),
    heldout_templates: Heldout = None,
    neurons: Neurons = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Perplexity probe: one sentence per relation ending in its objects, before/after zeroing, random controls."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        relation_files=relation_file or [],
        k=k,
        response=response,
        units=units,
        max_prompts=max_prompts,
        heldout_templates=heldout_templates,
        neurons=neurons,
        device=device,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    _show(
        study.run_perplexity(opts, random_seeds, max_objects),
        (
            "k",
            "ppl_ratio_target",
            "ppl_ratio_random",
            "object_ppl_ratio_target",
            "object_ppl_ratio_random",
            "relations_ppl_up_target",
            "relations_object_ppl_up_target",
            "n_relations",
        ),
        out,
    )


@app.command("sweep")
def sweep_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn-sweep"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    ks: str = typer.Option("", "--ks", help="Comma-separated k values (default: the paper's, up to the model size)."),
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    eval_subjects: EvalSubjects = None,
    heldout_templates: Heldout = None,
    neurons: Neurons = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Accuracy vs k (target vs random units, same vs other relations) and the cumulativity test."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        relation_files=relation_file or [],
        response=response,
        units=units,
        max_prompts=max_prompts,
        eval_subjects=eval_subjects,
        heldout_templates=heldout_templates,
        neurons=neurons,
        device=device,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    _show(study.run_sweep(opts, _int_list(ks, "--ks")), ("k_values", "cumulativity_micro", "cumulativity_macro"), out)


@app.command("matrix")
def matrix_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn-matrix"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    eval_subjects: EvalSubjects = None,
    heldout_templates: Heldout = None,
    neurons: Neurons = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """The relations x relations accuracy-drop matrix (interference), as a heatmap."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        relation_files=relation_file or [],
        k=k,
        response=response,
        units=units,
        max_prompts=max_prompts,
        eval_subjects=eval_subjects,
        heldout_templates=heldout_templates,
        neurons=neurons,
        device=device,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    _show(
        study.run_matrix(opts),
        ("k", "mean_relative_drop_target", "mean_relative_drop_offtarget", "interference_pairs"),
        out,
    )


@app.command("overlap")
def overlap_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn-overlap"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    heldout_templates: Heldout = None,
    neurons: Neurons = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Pairwise overlap (IoU) of the relations' unit sets and versatility (units shared by several relations)."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        relation_files=relation_file or [],
        k=k,
        response=response,
        units=units,
        max_prompts=max_prompts,
        heldout_templates=heldout_templates,
        neurons=neurons,
        device=device,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    _show(study.run_overlap(opts), ("k", "mean_iou", "versatility"), out)


@app.command("multilingual")
def multilingual_cmd(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn-multilingual"),
    relations: Relations = "all",
    languages: str = typer.Option("de,es,fr", "--languages"),
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    eval_subjects: EvalSubjects = None,
    heldout_templates: Heldout = None,
    neurons: Neurons = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """Units found on English prompts, zeroed on prompts in other languages: accuracy drop per language."""
    opts = _options(
        model=model,
        out=out,
        relations=relations,
        k=k,
        response=response,
        units=units,
        max_prompts=max_prompts,
        eval_subjects=eval_subjects,
        heldout_templates=heldout_templates,
        neurons=neurons,
        device=device,
        dtype=dtype,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
        resume=resume,
    )
    langs = [x.strip() for x in languages.split(",") if x.strip()]
    _show(study.run_multilingual(opts, langs), ("k", "languages"), out)


def _int_list(text: str, option: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from engramlab.errors import EngramError

        raise EngramError(f"{option} {text!r}: give comma-separated whole numbers, e.g. 10,100,1000.") from None
    return values
