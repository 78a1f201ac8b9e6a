"""`engramlab organisms`: build, evaluate and list the model organisms."""

from __future__ import annotations

from pathlib import Path

import typer

from engramlab.cli_options import Device, Out, Overwrite, Seed, probability
from engramlab.errors import EngramError

app = typer.Typer(
    help="Model organisms: small Llama LMs trained on real facts (organism:base, organism:chat).", no_args_is_help=True
)


REBUILD = "rebuild the organisms with `engramlab organisms build --out DIR`"


def resolve(ref: str) -> Path:
    """A directory or `organism:NAME` -> the model directory."""
    from engramlab.organisms.registry import is_organism_ref, organism_path

    if is_organism_ref(ref):
        return organism_path(ref)
    path = Path(ref)
    if not ref.strip() or not (path / "config.json").is_file():
        raise EngramError(f"REF {ref!r} is neither organism:NAME nor a model directory with config.json.")
    return path


@app.command()
def build(
    out: Path = typer.Option(
        ..., "--out", help="Folder for tokenizer, checkpoints, base/ and chat/ (resumes if it holds a build)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: Seed = 0,
    quick: bool = typer.Option(False, "--quick", help="A miniature organism in about a minute (smoke test)."),
    layers: int | None = typer.Option(None, "--layers", help="Transformer layers (default 6)."),
    hidden: int | None = typer.Option(
        None, "--hidden", help="Hidden size, a multiple of 16 (8 heads of an even size; default 256)."
    ),
    mlp: int | None = typer.Option(None, "--mlp", help="SwiGLU neurons per layer (default 1536)."),
    base_steps: int | None = typer.Option(
        None,
        "--base-steps",
        help="Pretraining steps (default 3000: ~1 h on 2 CPU cores); 0 with --init-base trains only the later "
        "stages on that base.",
    ),
    focus_steps: int | None = typer.Option(
        None, "--focus-steps", help="TRUE/FALSE focus steps after pretraining (default 250; 0 skips)."
    ),
    chat_steps: int | None = typer.Option(None, "--chat-steps", help="Chat SFT steps (default 300)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Rows of 128 tokens per step, every stage (default 32)."
    ),
    statement_repeats: int | None = typer.Option(
        None,
        "--statement-repeats",
        help="Draws of every TRUE/FALSE training statement per epoch, each with fresh false twins (default 1).",
    ),
    reworded_statements: float | None = typer.Option(
        None,
        "--reworded-statements",
        callback=probability,
        help="Share of the TRUE/FALSE "
        "training statements of facts rewritten afresh each draw in a "
        "training-only wording (default 0).",
    ),
    object_kinds: bool = typer.Option(
        False,
        "--object-kinds",
        help='Also state every object with its kind, true and false ("Kabul is a city."), in the TRUE/FALSE blocks.',
    ),
    init_base: Path | None = typer.Option(
        None,
        "--init-base",
        help="Continue pretraining from this organism "
        "directory (its weights, shape and tokenizer) instead of from scratch.",
    ),
) -> None:
    """Train organism:base and organism:chat from the vendored data, evaluate them and write model cards.

    The defaults rebuild the shipped recipe; on a GPU raise the steps (and the shape) freely. A build resumes only
    with the options it was started with."""
    from engramlab.organisms.build import BuildConfig, quick_config, with_overrides
    from engramlab.organisms.build import build as run_build
    from engramlab.results import check_out_dir

    check_out_dir(out, overwrite=True)  # a file, an unwritable folder; a build folder may resume, checked below
    if device not in ("cpu", "cuda"):
        raise EngramError(f"--device must be cpu or cuda, got {device!r}.")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise EngramError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
    if out.exists() and any(out.iterdir()) and not (out / "build_config.json").is_file():
        raise EngramError(f"--out {out} is not empty and holds no organism build; pick a new folder.")
    overrides = {
        "layers": layers,
        "hidden": hidden,
        "mlp": mlp,
        "base_steps": base_steps,
        "focus_steps": focus_steps,
        "chat_steps": chat_steps,
        "batch_size": batch_size,
        "statement_repeats": statement_repeats,
        "reworded_statements": reworded_statements,
        "object_kinds": object_kinds or None,
    }
    cfg = with_overrides(quick_config(seed) if quick else BuildConfig(seed=seed), **overrides)
    if init_base is not None:
        if any(v is not None for v in (layers, hidden, mlp)):
            raise EngramError("--init-base keeps the shape of the model it continues; drop --layers/--hidden/--mlp.")
        cfg.init_base = str(init_base)
    flags = "".join(
        f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in overrides.items() if v is not None
    )
    flags += f" --init-base {init_base}" if init_base is not None else ""
    command = f"engramlab organisms build --out DIR --seed {seed}" + (" --quick" if quick else "") + flags
    run_build(out, cfg, device=device, command=command + (f" --device {device}" if device != "cpu" else ""))
    typer.echo(f"organisms written to {out}/base and {out}/chat (model cards: README.md in each).")


@app.command("eval")
def eval_cmd(
    ref: str = typer.Argument(..., help="organism:NAME or a model directory."),
    out: Out = ...,
    max_facts: int = typer.Option(200, "--max-facts", min=1, help="Facts per relation evaluated."),
    device: Device = "cpu",
    overwrite: Overwrite = False,
    update_card: bool = typer.Option(
        False,
        "--update-card",
        help="Rewrite the '## Evaluation' section of the organism's model card (its README.md) from this evaluation.",
    ),
) -> None:
    """Fact accuracy, TRUE/FALSE, languages, chat answers and refusal rates of an organism."""
    from engramlab.distributed import on_main
    from engramlab.organisms.build import evaluate_dir, evaluation_span, is_chat_organism, refresh_evaluation_section
    from engramlab.results import check_out_dir

    path = resolve(ref)
    if update_card:
        evaluation_span(path / "README.md")  # a card without the section fails now, not after the evaluation
    on_main(check_out_dir, out, overwrite)
    summary = evaluate_dir(path, out, max_facts=max_facts, overwrite=overwrite, device=device)
    if update_card:
        refresh_evaluation_section(path / "README.md", summary, "chat" if is_chat_organism(path) else "base", max_facts)
        typer.echo(f"model card updated: {path / 'README.md'}")
    show = {
        "fact_accuracy (mean)": summary["fact_accuracy"]["mean"],
        "heldout templates": summary["fact_accuracy_heldout_templates"]["mean"],
        "unseen templates": summary["fact_accuracy_unseen_templates"]["mean"],
        "truefalse_accuracy": summary["truefalse_accuracy"],
        "truefalse AUC": summary["truefalse_detail"]["auc"],
        "  object log-prob AUC (knowledge)": summary["truefalse_detail"]["object_logprob_auc"],
        **{
            f"  TRUE, object {g}": v.get("true", float("nan"))
            for g, v in summary["truefalse_detail"]["by_object_group"].items()
        },
        **{
            f"  TRUE, {split} facts, {wording} wording": v["true"]
            for split, by_wording in summary["truefalse_detail"]["familiarity"].items()
            for wording, v in by_wording.items()
        },
        **{f"language {k}": v["mean"] for k, v in summary["languages"].items()},
        "chat fact accuracy": summary["chat_fact_accuracy"]["mean"],
        "refusal_rate_harmful": summary["refusal_rate_harmful"],
        "refusal_rate_harmless": summary["refusal_rate_harmless"],
    }
    for k, v in show.items():
        typer.echo(f"{k:34s} {v:.3f}")
    typer.echo(f"written: {out}/summary.json")


@app.command("list")
def list_cmd() -> None:
    """The organisms shipped in this checkout."""
    from engramlab.organisms.registry import WEIGHTS_DIR, shipped_organisms
    from engramlab.readers import read_json_object

    names = shipped_organisms()
    if not names:
        typer.echo("no organisms ship in this checkout; build them with `engramlab organisms build --out DIR`.")
    for name in names:
        d = WEIGHTS_DIR / name
        cfg = read_json_object(
            d / "config.json", {"num_hidden_layers": int, "hidden_size": int, "intermediate_size": int}, REBUILD
        )
        size = (d / "model.safetensors").stat().st_size / 1e6 if (d / "model.safetensors").is_file() else 0
        summary = d / "eval" / "summary.json"
        facts = ""
        if summary.is_file():
            s = read_json_object(summary, {"fact_accuracy": dict, "truefalse_accuracy": (int, float)}, REBUILD)
            mean = s["fact_accuracy"].get("mean")
            mean_text = f"{mean:.3f}" if isinstance(mean, (int, float)) else "n/a"
            facts = f", fact accuracy {mean_text}, TRUE/FALSE {s['truefalse_accuracy']:.3f}"
        typer.echo(
            f"organism:{name}  {cfg['num_hidden_layers']} layers x {cfg['hidden_size']}, "
            f"{cfg['intermediate_size']} MLP neurons/layer, {size:.1f} MB{facts}  ({d})"
        )
