"""The decode study's science check on the shipped organisms (issue 6, "science acceptance").

    python benchmarks/decode_organisms.py [--base organism:base --chat organism:chat --out runs/decode_organisms]

1. Base vs chat: top-1 agreement of every up_proj neuron, per layer and overall (each model its own LM head, as
   in Davies 2025), plus the variants the paper leaves open: a shared head, and the final norm folded in.
2. Concept neurons in the chat organism: for the single-word answers of its fact relations (currencies,
   continents, sports, professions, ...) that some neuron decodes to, the neurons whose up_proj row decodes to that
   word as top-1 (case and spaces ignored); those that also write it (down_proj column's top-10) first, then by
   P(top-1).
3. Steering: each candidate is clamped (up_proj output and post-activation, values 0..--max-value) while the chat
   organism answers a question of the same relation whose true answer is another word; a success is a clamp
   value at which the greedy answer names the neuron's word while the unclamped answer does not.
Prints the figures and writes OUT/summary.json, OUT/compare/ (report.html) and OUT/atlas_chat/ (atlas.html).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from engramlab.data.facts import PHRASINGS, RELATIONS, load_relation
from engramlab.decode import (
    compare_models,
    decode_atlas,
    steer_neuron,
    write_atlas,
    write_comparison,
)
from engramlab.models import load_model


def answer_words() -> dict[str, list[str]]:
    """Single-word answers (objects) of the organisms' fact relations -> the relations that have them."""
    words: dict[str, list[str]] = {}
    for relation in RELATIONS:
        for fact in load_relation(relation).facts:
            if " " not in fact.object and len(fact.object) > 3:
                words.setdefault(fact.object.lower(), [])
                if relation not in words[fact.object.lower()]:
                    words[fact.object.lower()].append(relation)
    return words


def concept_words(atlas, down, limit: int) -> list[tuple[str, str, int, int]]:
    """(word, relation, n neurons, n that also write it): answer words that are some up_proj neuron's top-1
    token, most neurons first."""
    words = answer_words()
    norm = np.array([t.strip().lower() for t in atlas.tokens or []])
    top1 = norm[atlas.top1]  # [L, N]
    writes = (norm[down.ids] == top1[..., None]).any(axis=-1)
    counts = Counter(top1.reshape(-1).tolist())
    write_counts = Counter(top1[writes].tolist())
    found = [w for w in counts if w in words]
    found.sort(key=lambda w: (-write_counts[w], -counts[w], w))
    return [(w, words[w][0], counts[w], write_counts[w]) for w in found[:limit]]


def question_for(relation: str, avoid: str) -> tuple[str, str]:
    """A question of `relation` whose true answer is not `avoid`: (question, true answer)."""
    for fact in load_relation(relation).facts:
        if fact.object.lower() != avoid.lower():
            return PHRASINGS[relation].question.replace("{}", fact.subject), fact.object
    raise ValueError(relation)


def neurons_for_word(atlas, down, word: str, limit: int) -> list[tuple[int, int, float, bool]]:
    """(layer, neuron, P(top-1), writes) of the neurons whose up_proj top-1 token is `word` (case and spaces
    ignored); neurons that also write it (their down_proj column's top-10 holds it) first, then by P(top-1)."""
    norm = np.array([t.strip().lower() for t in atlas.tokens or []])
    hit = norm[atlas.top1] == word.lower()
    if not hit.any():
        return []
    writes = (norm[down.ids] == word.lower()).any(axis=-1)  # [L, N]
    strength = atlas.probs[:, :, 0] if atlas.probs is not None else atlas.scores[:, :, 0]
    layers, neurons = np.nonzero(hit)
    order = np.lexsort((-strength[layers, neurons], ~writes[layers, neurons]))[:limit]
    return [
        (int(layers[i]), int(neurons[i]), float(strength[layers[i], neurons[i]]), bool(writes[layers[i], neurons[i]]))
        for i in order
    ]


def says(text: str, word: str) -> bool:
    """The answer's first sentence names `word` (as a whole word, any case)."""
    return re.search(rf"\b{re.escape(word)}\b", text.split(".")[0], re.IGNORECASE) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="organism:base")
    parser.add_argument("--chat", default="organism:chat")
    parser.add_argument("--out", type=Path, default=Path("runs/decode_organisms"))
    parser.add_argument("--words", type=int, default=12, help="concept words tried")
    parser.add_argument("--per-word", type=int, default=2, help="candidate neurons tried per word")
    parser.add_argument("--values", default="5,10,20,40,80,160,320")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    values = [float(v) for v in args.values.split(",")]

    start = time.perf_counter()
    base = load_model(args.base, device="cpu")
    chat = load_model(args.chat, device="cpu")
    summary: dict = {"base": args.base, "chat": args.chat}

    result = compare_models(base, chat, top_k=10)
    summary["compare"] = write_comparison(result, args.out / "compare", overwrite=True)
    variants = {
        "own heads (default)": result.agreement,
        "shared head: base": compare_models(base, chat, shared_head="a", top_k=1).agreement,
        "shared head: chat": compare_models(base, chat, shared_head="b", top_k=1).agreement,
        "fold-norm, own heads": compare_models(base, chat, fold_norm=True, top_k=1).agreement,
    }
    summary["agreement_variants"] = variants
    print(
        f"base vs chat: {result.n_neurons:,} up_proj neurons; top-1 agreement {result.agreement:.4f} "
        f"(chance {result.chance_agreement:.4f}), top-10 overlap {result.overlap_at_k:.4f}"
    )
    print("  per layer: " + "  ".join(f"{i}:{x:.3f}" for i, x in enumerate(result.agreement_per_layer)))
    for name, value in variants.items():
        print(f"  {name:24s} {value:.4f}")

    atlas = decode_atlas(chat, top_k=10, softmax=True)
    down = decode_atlas(chat, site="down", top_k=10)
    write_atlas(atlas, args.out / "atlas_chat", overwrite=True)
    trials = []
    words = concept_words(atlas, down, args.words)
    summary["concept_words"] = [{"word": w, "relation": r, "neurons": n, "also_write": k} for w, r, n, k in words]
    print(
        "answer words that are up_proj top-1 tokens (word: neurons, of which also write it): "
        + ", ".join(f"{w}: {n}/{k}" for w, _, n, k in words)
    )
    for word, relation, _, _ in words:
        question, truth = question_for(relation, word)
        for layer, neuron, strength, writes in neurons_for_word(atlas, down, word, args.per_word):
            for site in ("up", "act"):
                res = steer_neuron(
                    chat, layer, neuron, values, question, site=site, chat=True, max_new_tokens=args.max_new_tokens
                )
                answers = res.continuation
                works = [v for v, text in zip(values, answers[1:], strict=True) if says(text, word)]
                trial = {
                    "relation": relation,
                    "word": word,
                    "layer": layer,
                    "neuron": neuron,
                    "p_top1": strength,
                    "writes_word": writes,
                    "site": site,
                    "question": question,
                    "truth": truth,
                    "baseline": answers[0],
                    "baseline_says_word": says(answers[0], word),
                    "first_value": works[0] if works else None,
                    "answers": dict(zip(["none", *map(str, values)], answers, strict=True)),
                    "prob_top_token": dict(zip(["none", *map(str, values)], res.prob, strict=True)),
                    "natural_last": res.natural_last,
                }
                trial["success"] = bool(works) and not trial["baseline_says_word"]
                trials.append(trial)
                mark = "YES" if trial["success"] else "no "
                print(
                    f"{mark} {word!r:14} neuron {layer}:{neuron} ({site}{', writes it' if writes else ''}) | "
                    f"{question!r} -> base {answers[0]!r}; "
                    + (
                        f"clamp {works[0]:g} -> {answers[1 + values.index(works[0])]!r}"
                        if works
                        else f"clamp {values[-1]:g} -> {answers[-1]!r}"
                    ),
                    flush=True,
                )
    summary["steering"] = trials
    summary["steering_successes"] = sum(t["success"] for t in trials)
    summary["steering_trials"] = len(trials)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(
        f"{summary['steering_successes']} of {len(trials)} clamp trials made the chat organism name the "
        f"neuron's word; wrote {args.out}/summary.json ({summary['seconds']} s)"
    )


if __name__ == "__main__":
    main()
