"""Memory and speed of the relation-neuron statistics pass (`relations find`).

    python benchmarks/relations_memory.py [--prompts 512 --layers 8 --hidden 512 --intermediate 1536]

1. Peak RSS of the response pass + AP scoring on N and 4N prompts, each in a fresh process (so one run's
   peak cannot hide the other's). Target (issue 5): ratio <= 1.2 — memory must not grow with the prompts,
   unlike the reference code that keeps every activation.
2. Throughput of the response pass (all gate/up/down outputs, mean over tokens, streamed to disk) against a
   plain forward over the same prompts, interleaved in one process. Target: >= 0.8.

The model is a randomly initialised Llama-shaped model (no download); the prompts are random token strings of
realistic length; the statistics path is the real one (`collect_responses`, `score_units`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from engramlab.models import from_hf
from engramlab.relations.find import score_units
from engramlab.relations.responses import ResponseMatrix, collect_responses
from engramlab.relations.units import UnitSpace

VOCAB = 4096


def build(args):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "left"
    return from_hf(model, fast)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{t}" for t in rng.integers(2, VOCAB, rng.integers(8, 20))) for _ in range(n)]


def stats_pass(args, n_prompts: int) -> dict:
    """Responses of every unit on n prompts, streamed to disk, then AP for 4 pseudo-relations."""
    loaded = build(args)
    space = UnitSpace(loaded.layout)
    texts = prompts(n_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        matrix = ResponseMatrix(Path(tmp) / "r.f32", len(texts), space.size, "bench")
        start = time.perf_counter()
        collect_responses(loaded, texts, space, matrix, "mean", args.batch)
        labels = np.arange(len(texts)) % 5
        rows = [(np.flatnonzero(labels == r), np.flatnonzero(labels != r)) for r in range(4)]
        score_units(matrix, rows)
        seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"prompts": n_prompts, "units": space.size, "peak_rss_mb": peak_mb, "seconds": seconds}


def throughput(args) -> dict:
    loaded = build(args)
    space = UnitSpace(loaded.layout)
    texts = prompts(args.prompts, seed=1)
    tok = loaded.tokenizer
    batches = [
        tok(texts[i : i + args.batch], return_tensors="pt", padding=True) for i in range(0, len(texts), args.batch)
    ]

    def plain():
        with torch.inference_mode():
            for b in batches:
                loaded.model(**b)

    def responses():
        with tempfile.TemporaryDirectory() as tmp:
            collect_responses(
                loaded,
                texts,
                space,
                ResponseMatrix(Path(tmp) / "r.f32", len(texts), space.size, "t"),
                "mean",
                args.batch,
            )

    times = {"plain": [], "responses": []}
    for repeat in range(args.repeats):
        for name, fn in (
            (("plain", plain), ("responses", responses))
            if repeat % 2 == 0
            else (("responses", responses), ("plain", plain))
        ):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    plain_s, resp_s = statistics.median(times["plain"]), statistics.median(times["responses"])
    return {"plain_s": plain_s, "responses_s": resp_s, "throughput_ratio": plain_s / resp_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(stats_pass(args, args.child)))
        return
    import os

    os.environ["ENGRAMLAB_QUIET"] = "1"
    runs = []
    for n in (args.prompts, 4 * args.prompts):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(n),
            "--layers",
            str(args.layers),
            "--hidden",
            str(args.hidden),
            "--intermediate",
            str(args.intermediate),
            "--batch",
            str(args.batch),
        ]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    speed = throughput(args)
    print(
        f"model: Llama-shaped, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}; "
        f"{runs[0]['units']:,} units (gate+up+down); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for r in runs:
        print(f"{r['prompts']:6d} prompts: peak RSS {r['peak_rss_mb']:8.1f} MB, {r['seconds']:.1f} s")
    print(f"peak RSS ratio 4x/1x prompts: {runs[1]['peak_rss_mb'] / runs[0]['peak_rss_mb']:.3f}   (target <= 1.2)")
    print(
        f"response pass {speed['responses_s']:.2f} s vs plain forward {speed['plain_s']:.2f} s: "
        f"throughput ratio {speed['throughput_ratio']:.3f}   (target >= 0.8)"
    )


if __name__ == "__main__":
    main()
