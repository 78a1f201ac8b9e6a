"""`engramlab relations ...`: thin typer commands over `engramlab.relations.study`.

The options every relations command shares are declared once, as the parameters of `_shared_options`;
`study_command` gives each command those parameters plus its own and hands it a ready `StudyOptions`, so a command
function holds only what is its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from engramlab.cli_options import (
    DEFAULT_MODEL,
    BatchSize,
    Device,
    Dtype,
    MaxMemory,
    Model,
    OffloadFolder,
    Out,
    Overwrite,
    Resume,
    Seed,
    int_list,
    layer_ranges,
    probability,
    shared_options_command,
)
from engramlab.relations import study
from engramlab.relations.gate import MIN_SHARE, MIN_VALIDATED, warning_lines

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
MinValidated = Annotated[
    int,
    typer.Option(
        "--min-validated",
        min=1,
        help="Knowledge gate: a relation needs this many identification prompts the model answers correctly.",
    ),
]
MinValidatedShare = Annotated[
    float,
    typer.Option(
        "--min-validated-share",
        callback=probability,
        help="Knowledge gate: ... and this share of its identification prompts (0-1).",
    ),
]
StudyLayers = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Study only these layers' units, e.g. 10-20 or 0,3,5-9 (default: every layer; with --neurons: the "
        "find's).",
    ),
]
RandomSeeds = Annotated[int, typer.Option("--random-seeds", min=0, help="Random-unit controls.")]


def _shared_options(
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/rsn"),
    relations: Relations = "all",
    relation_file: RelationFile = None,
    k: K = None,
    response: Response = "last",
    units: Units = "neurons",
    max_prompts: MaxPrompts = 1000,
    eval_subjects: EvalSubjects = None,
    heldout_templates: Heldout = None,
    neurons: Neurons = None,
    min_validated: MinValidated = MIN_VALIDATED,
    min_validated_share: MinValidatedShare = MIN_SHARE,
    layers: StudyLayers = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    seed: Seed = 0,
    batch_size: BatchSize = 32,
    overwrite: Overwrite = False,
    resume: Resume = False,
) -> None:
    """The options of every `relations` command, declared once (their defaults are `StudyOptions`')."""


def _study_options(given: dict) -> study.StudyOptions:
    given["relation_files"] = given.pop("relation_file", None) or []
    given["layers"] = layer_ranges(given["layers"])
    return study.StudyOptions(**given)


study_command = shared_options_command(app, _shared_options, _study_options)


def _show(summary: dict, keys: tuple[str, ...], out: Path) -> None:
    shown = {k: summary[k] for k in keys if k in summary}
    console.print_json(json.dumps(shown, default=str))
    console.print(f"wrote {out}/summary.json and {out}/report.html")
    for line in warning_lines(summary.get("excluded_relations", {})):
        typer.echo(line, err=True)
    for language, excluded in summary.get("excluded_by_language", {}).items():
        for name, why in excluded.items():
            typer.echo(
                f"warning: relation {name!r} in {language} left out of its means by the knowledge gate: {why}.",
                err=True,
            )


@study_command("find", "runs/rsn-find", without=("eval_subjects", "neurons"))
def find_cmd(opts: study.StudyOptions) -> None:
    """Rank every FFN unit by AP for each relation; write the top-k table and the layer histogram."""
    _show(study.run_find(opts), ("relations", "k", "counts", "mean_ap_top_k", "excluded_relations"), opts.out)


@study_command("deactivate", "runs/rsn")
def deactivate_cmd(
    opts: study.StudyOptions,
    random_seeds: RandomSeeds = 10,
    diagnose: bool = typer.Option(
        True, "--diagnose/--no-diagnose", help="Also run the template control (subject vs template AP)."
    ),
    diagnose_top: int = typer.Option(
        100, "--diagnose-top", min=1, help="Top units per relation in the template control."
    ),
) -> None:
    """Zero each relation's top-k units: accuracy before/after, random controls, seen vs held-out templates."""
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
            "excluded_relations",
        ),
        opts.out,
    )


@study_command("diagnose", "runs/rsn-diagnose", without=("eval_subjects",))
def diagnose_cmd(
    opts: study.StudyOptions,
    top: int = typer.Option(100, "--top", min=1, help="Top units per relation to diagnose."),
) -> None:
    """Template control: each top unit's AP from subject tokens only vs template tokens only."""
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
            "excluded_relations",
        ),
        opts.out,
    )


@study_command("perplexity", "runs/rsn-perplexity", without=("eval_subjects",))
def perplexity_cmd(
    opts: study.StudyOptions,
    random_seeds: RandomSeeds = 10,
    max_objects: int = typer.Option(50, "--max-objects", min=1, help="Distinct objects (sentences) per relation."),
) -> None:
    """Perplexity probe: one sentence per relation ending in its objects, before/after zeroing, random controls."""
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
            "excluded_relations",
        ),
        opts.out,
    )


@study_command("sweep", "runs/rsn-sweep", without=("k",))
def sweep_cmd(
    opts: study.StudyOptions,
    ks: str = typer.Option("", "--ks", help="Comma-separated k values (default: the paper's, up to the model size)."),
) -> None:
    """Accuracy vs k (target vs random units, same vs other relations) and the cumulativity test."""
    k_values = int_list(ks, "--ks") if ks.strip() else None
    _show(
        study.run_sweep(opts, k_values),
        ("k_values", "cumulativity_micro", "cumulativity_macro", "excluded_relations"),
        opts.out,
    )


@study_command("matrix", "runs/rsn-matrix")
def matrix_cmd(opts: study.StudyOptions) -> None:
    """The relations x relations accuracy-drop matrix (interference), as a heatmap."""
    _show(
        study.run_matrix(opts),
        ("k", "mean_relative_drop_target", "mean_relative_drop_offtarget", "interference_pairs", "excluded_relations"),
        opts.out,
    )


@study_command("overlap", "runs/rsn-overlap", without=("eval_subjects",))
def overlap_cmd(opts: study.StudyOptions) -> None:
    """Pairwise overlap (IoU) of the relations' unit sets and versatility (units shared by several relations)."""
    _show(study.run_overlap(opts), ("k", "mean_iou", "versatility", "excluded_relations"), opts.out)


@study_command("multilingual", "runs/rsn-multilingual", without=("relation_file",))
def multilingual_cmd(opts: study.StudyOptions, languages: str = typer.Option("de,es,fr", "--languages")) -> None:
    """Units found on English prompts, zeroed on prompts in other languages: accuracy drop per language."""
    langs = [x.strip() for x in languages.split(",") if x.strip()]
    _show(
        study.run_multilingual(opts, langs),
        ("k", "languages", "excluded_by_language", "excluded_relations"),
        opts.out,
    )
