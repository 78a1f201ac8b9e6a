"""Evaluation of an organism: fact recall, true/false judgement, languages, chat answers and refusals.

- Fact accuracy (paper 1 §2.3): greedy decoding of 2 new tokens after the prompt; correct when the stripped,
  lower-cased generation is a prefix of the object (or the object a prefix of it, for one-token objects followed
  by punctuation). Reported per relation for the trained templates (`selection`), the `heldout` templates (trained,
  kept out of neuron selection) and the `unseen` templates (never trained).
- TRUE/FALSE (paper 3): 4-shot prompt, answer = argmax over the logits of " TRUE" and " FALSE", on held-out
  statements about known facts, per relation and by object group (`truefalse_breakdown`); next to it the AUC of the
  model's own probability of each stated object, i.e. whether the knowledge to judge is there; geometry-of-truth
  held-out parts reported per set.
- Languages: fact accuracy of each translated relation in de, es, fr (selection templates).
- Chat: fact questions of held-out chat subjects in the chat template (8 new tokens, prefix rule on the object);
  refusal rate (paper 3's phrase list) on held-out AdvBench goals and held-out harmless instructions.

Under torchrun the batches of every loop are shared out among the ranks and gathered back
(`engramlab.distributed.map_batches`): the same numbers as one process, rank 0 writes them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from engramlab.data import chat, statements
from engramlab.data.facts import FRAMES, RELATIONS, Prompt, load_relation, prefix_correct
from engramlab.data.multilingual import LANGUAGES, MULTILINGUAL_RELATIONS, relation_in
from engramlab.distributed import map_batches


@torch.no_grad()
def greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 2,
    batch_size: int = 128,
    chat_template: bool = False,
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of `prompts`, batched with left padding (per call: the
    caller's tokenizer is left as it is, so a build does not ship the evaluation's padding side)."""
    device = next(model.parameters()).device

    def run(i: int) -> list[str]:
        batch = list(prompts[i : i + batch_size])
        if chat_template:
            batch = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in batch
            ]
            enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        else:
            enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left")
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>") if chat_template else tokenizer.eos_token_id,
        )
        return tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    return [text for texts in map_batches(range(0, len(prompts), batch_size), run) for text in texts]


def prompt_correct(model, tokenizer, prompts: Sequence[Prompt]) -> list[bool]:
    """Paper 1's recall rule for each prompt (2 greedy tokens, prefix match on the object)."""
    gens = greedy(model, tokenizer, [p.text for p in prompts])
    return [prefix_correct(g, p.object) for g, p in zip(gens, prompts, strict=True)]


def _mean(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def _sample(items: list, n: int | None, key: str) -> list:
    if n is None or len(items) <= n:
        return items
    return random.Random(key).sample(items, n)


def fact_accuracy(
    model,
    tokenizer,
    relations: Sequence[str] = RELATIONS,
    templates: str = "selection",
    max_facts: int | None = 200,
    language: str = "en",
    subjects: str = "all",
) -> dict:
    """{"per_relation": {name: acc}, "mean": acc, "per_frame": {frame: acc}} over up to `max_facts` facts per
    relation (fixed sample); `per_frame` pools the relations by template frame (p1, stmt, qa, ...)."""
    per, by_frame = {}, {}
    for name in relations:
        rel = relation_in(name, language)
        facts = _sample(rel.facts_in(subjects), max_facts, f"{name}/{language}")
        prompts = [
            Prompt(t.prompt(f.subject), f.subject, f.object, name, t)
            for f in facts
            for t in rel.templates_in(templates)
        ]
        correct = prompt_correct(model, tokenizer, prompts)
        per[name] = _mean(correct)
        for p, ok in zip(prompts, correct, strict=True):
            by_frame.setdefault(p.template.frame, []).append(ok)
    return {
        "per_relation": per,
        "mean": _mean_over_known(per),
        "per_frame": {frame: _mean(flags) for frame, flags in by_frame.items()},
        "no_prompts": [name for name, acc in per.items() if math.isnan(acc)],
    }


def _mean_over_known(per_relation: dict[str, float]) -> float:
    """Mean accuracy over the relations that had prompts to answer: a relation with none (no template of the
    requested split, or no fact in that language) has no accuracy, and is listed under "no_prompts" rather than
    averaged in as NaN."""
    values = [acc for acc in per_relation.values() if not math.isnan(acc)]
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def truefalse_scores(model, tokenizer, stmts: Sequence[statements.Statement], batch_size: int = 64) -> list[float]:
    """Paper 3 4-shot judgement: logit(" TRUE") - logit(" FALSE") at the last position of each prompt (> 0: TRUE)."""
    t_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" TRUE"))[0]
    f_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" FALSE"))[0]
    device = next(model.parameters()).device

    def run(i: int) -> list[float]:
        batch = stmts[i : i + batch_size]
        enc = tokenizer(
            [statements.truefalse_prompt(s) for s in batch], return_tensors="pt", padding=True, padding_side="left"
        ).to(device)
        logits = model(**enc).logits[:, -1].float()  # (B, V)
        return (logits[:, t_id] - logits[:, f_id]).tolist()

    return [d for part in map_batches(range(0, len(stmts), batch_size), run) for d in part]


@torch.no_grad()
def object_logprobs(model, tokenizer, stmts: Sequence[statements.Statement], batch_size: int = 64) -> list[float]:
    """Log-probability of each fact statement's stated object (its first token) after the statement's own prefix.

    No shots, no label: it measures whether the model's knowledge separates true from false statements at all, so
    a weak TRUE/FALSE judgement can be told apart from missing knowledge. Statements without an object get nan.
    """
    device = next(model.parameters()).device
    rows: list[tuple[int, list[int], int]] = []  # (statement index, prefix ids, first object token id)
    for i, s in enumerate(stmts):
        tail = f" {s.object}."
        if not s.object or not s.text.endswith(tail):
            continue
        full = tokenizer(s.text)["input_ids"]
        n_prefix = len(tokenizer(s.text[: -len(tail)])["input_ids"])
        rows.append((i, full[:n_prefix], full[n_prefix]))

    def run(start: int) -> list[float]:
        batch = rows[start : start + batch_size]
        width = max(len(ids) for _, ids, _ in batch)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for _, x, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for _, x, _ in batch], device=device)
        logp = model(input_ids=ids, attention_mask=mask).logits[:, -1].float().log_softmax(-1)  # (B, V)
        return [row[target].item() for (_, _, target), row in zip(batch, logp, strict=True)]

    out = [float("nan")] * len(stmts)
    starts = range(0, len(rows), batch_size)
    for start, values in zip(starts, map_batches(starts, run), strict=True):
        for (i, _, _), value in zip(rows[start : start + batch_size], values, strict=True):
            out[i] = value
    return out


def truefalse_accuracy(model, tokenizer, stmts: Sequence[statements.Statement], batch_size: int = 64) -> float:
    """Paper 3 4-shot TRUE/FALSE accuracy: argmax of logit(" TRUE") vs logit(" FALSE") at the last position (nan
    for no statements)."""
    return _mean(judged_correct(stmts, truefalse_scores(model, tokenizer, stmts, batch_size)))


def judged_correct(stmts: Sequence[statements.Statement], scores: Sequence[float]) -> list[bool]:
    """Whether each judgement (score > 0: TRUE) matches the statement's label."""
    return [(d > 0) == s.label for s, d in zip(stmts, scores, strict=True)]


# The frames TRUE/FALSE statements are trained in, and those no training document uses (split "unseen").
TRAINED_WORDING = statements.STATEMENT_FRAMES
NEW_WORDING = tuple(frame for frame, split in FRAMES.items() if split == "unseen")


def familiarity_control(model, tokenizer, per_relation: int = 10, relations: Sequence[str] = RELATIONS) -> dict:
    """Share judged TRUE, {split: {wording: {"true": r, "false": r}}}, for true and false statements about train-
    and held-out-subject facts in the trained statement wordings and in a never-trained one. Trained wordings of
    train facts are the exact strings labelled TRUE in training; if they score far above the same facts in the new
    wording, the judgement recognises strings rather than checking facts."""
    out: dict = {}
    for split in ("train", "heldout"):
        for wording, frames in (("trained", TRAINED_WORDING), ("new", NEW_WORDING)):
            stmts = [
                s
                for name in relations
                for s in statements.wording_statements(load_relation(name), split, frames, per_relation)
            ]
            said_true = [d > 0 for d in truefalse_scores(model, tokenizer, stmts)]
            out.setdefault(split, {})[wording] = {
                label: _mean([t for s, t in zip(stmts, said_true, strict=True) if s.label == (label == "true")])
                for label in ("true", "false")
            }
    return out


def truefalse_breakdown(
    stmts: Sequence[statements.Statement], scores: Sequence[float], object_logprob: Sequence[float] | None = None
) -> dict:
    """Accuracy of the held-out statements by relation and by label and `statements.object_group`, and the AUC of
    the scores (all statements and per relation); with `object_logprob` (`object_logprobs`) also the AUC of the
    model's own probability of the stated object, the knowledge a judgement could read.

    A model that checks the fact scores the groups alike; a gap between TRUE statements whose object is
    "heldout_only" and those "true_in_training" measures a label learnt per object word instead.
    """
    from sklearn.metrics import roc_auc_score

    correct = judged_correct(stmts, scores)

    def auc(subset: list[int], values: Sequence[float]) -> float:
        subset = [i for i in subset if not math.isnan(values[i])]
        labels = [stmts[i].label for i in subset]
        return float(roc_auc_score(labels, [values[i] for i in subset])) if len(set(labels)) == 2 else float("nan")

    by_relation: dict[str, list[int]] = {}
    by_group: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(stmts):
        by_relation.setdefault(s.source, []).append(i)
        by_group.setdefault(statements.object_group(s) or "no_object", {}).setdefault(
            "true" if s.label else "false", []
        ).append(i)
    everything = list(range(len(stmts)))
    detail = {
        "auc": auc(everything, scores),
        "by_relation": {
            r: {"accuracy": _mean([correct[i] for i in idx]), "auc": auc(idx, scores)} for r, idx in by_relation.items()
        },
        "by_object_group": {
            g: {lab: _mean([correct[i] for i in idx]) for lab, idx in by.items()}
            | {f"n_{lab}": len(idx) for lab, idx in by.items()}
            for g, by in sorted(by_group.items())
        },
    }
    if object_logprob is not None:
        detail["object_logprob_auc"] = auc(everything, object_logprob)
        for r, idx in by_relation.items():
            detail["by_relation"][r]["object_logprob_auc"] = auc(idx, object_logprob)
    return detail


def chat_fact_accuracy(model, tokenizer, max_per_relation: int = 40) -> dict:
    per = {}
    for name in RELATIONS:
        ex = _sample(chat.fact_questions("heldout", (name,)), max_per_relation, f"chat/{name}")
        gens = greedy(model, tokenizer, [e.user for e in ex], max_new_tokens=8, chat_template=True)
        per[name] = sum(prefix_correct(g.rstrip("."), e.gold) for g, e in zip(gens, ex, strict=True)) / len(ex)
    return {"per_relation": per, "mean": _mean_over_known(per)}


def refusal_rate(model, tokenizer, instructions: Sequence[str]) -> tuple[float, list[str]]:
    gens = greedy(model, tokenizer, instructions, max_new_tokens=16, chat_template=True)
    return sum(chat.is_refusal(g) for g in gens) / max(1, len(gens)), gens


def quick_eval(model, tokenizer, chat_model: bool = False) -> dict:
    """A small fixed sample, cheap enough to run during training."""
    acc = fact_accuracy(model, tokenizer, templates="selection", max_facts=25)["mean"]
    out = {
        "fact": acc,
        "truefalse": truefalse_accuracy(model, tokenizer, statements.truefalse_heldout(per_relation=10)),
    }
    if chat_model:
        out["chat_fact"] = chat_fact_accuracy(model, tokenizer, max_per_relation=8)["mean"]
        out["refuse_harmful"] = refusal_rate(model, tokenizer, chat.advbench_split()[1][:40])[0]
        out["refuse_harmless"] = refusal_rate(
            model, tokenizer, [e.user for e in chat.harmless_examples("heldout", 40)]
        )[0]
    return out


def full_eval(
    model, tokenizer, chat_model: bool, max_facts: int | None = 200, small: bool = False
) -> tuple[dict, dict]:
    """The `organisms eval` numbers: (summary, tables) — tables are lists of row dicts for parquet.

    `small` shrinks every set to a handful of items (miniature organisms in tests).
    """
    n_tf, n_got, n_chat, n_ref = (2, 4, 2, 8) if small else (50, 200, 40, None)
    summary: dict = {}
    rows = []
    for split in ("selection", "heldout", "unseen"):
        res = fact_accuracy(model, tokenizer, templates=split, max_facts=max_facts)
        key = "fact_accuracy" if split == "selection" else f"fact_accuracy_{split}_templates"
        summary[key] = res
        rows += [
            {"relation": r, "language": "en", "templates": split, "accuracy": a} for r, a in res["per_relation"].items()
        ]
    held = statements.truefalse_heldout(per_relation=n_tf)
    scores = truefalse_scores(model, tokenizer, held)
    correct = judged_correct(held, scores)
    summary["truefalse_accuracy"] = _mean(correct)
    logprobs = object_logprobs(model, tokenizer, held)
    summary["truefalse_detail"] = truefalse_breakdown(held, scores, logprobs)
    summary["truefalse_detail"]["familiarity"] = familiarity_control(model, tokenizer, 1 if small else 10)
    summary["truefalse_by_set"] = {
        g: truefalse_accuracy(model, tokenizer, _sample(statements.got_statements(g, "heldout"), n_got, g))
        for g in statements.GOT_SETS
    }
    summary["truefalse_n"] = len(held)
    langs = {}
    for lang in LANGUAGES:
        res = fact_accuracy(model, tokenizer, MULTILINGUAL_RELATIONS, "selection", max_facts, lang)
        langs[lang] = res
        rows += [
            {"relation": r, "language": lang, "templates": "selection", "accuracy": a}
            for r, a in res["per_relation"].items()
        ]
    summary["languages"] = langs
    summary["chat_fact_accuracy"] = chat_fact_accuracy(model, tokenizer, n_chat)
    harmful = chat.advbench_split()[1][:n_ref]
    harmless = [e.user for e in chat.harmless_examples("heldout", n_ref or 100)]
    summary["refusal_rate_harmful"], gen_harmful = refusal_rate(model, tokenizer, harmful)
    summary["refusal_rate_harmless"], gen_harmless = refusal_rate(model, tokenizer, harmless)
    summary["refusal_n"] = {"harmful": len(harmful), "harmless": len(harmless)}
    summary["chat_model"] = chat_model
    generations = [
        {"kind": "harmful", "instruction": i, "generation": g, "refusal": chat.is_refusal(g)}
        for i, g in zip(harmful, gen_harmful, strict=True)
    ]
    generations += [
        {"kind": "harmless", "instruction": i, "generation": g, "refusal": chat.is_refusal(g)}
        for i, g in zip(harmless, gen_harmless, strict=True)
    ]
    judged = [
        {
            "statement": s.text,
            "label": s.label,
            "relation": s.source,
            "object_group": statements.object_group(s),
            "logit_true_minus_false": d,
            "correct": ok,
            "object_logprob": lp,
        }
        for s, d, ok, lp in zip(held, scores, correct, logprobs, strict=True)
    ]
    return summary, {"fact_accuracy": rows, "generations": generations, "truefalse": judged}
