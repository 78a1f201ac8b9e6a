"""How `relations find` and `decode atlas` scale over torchrun ranks (issue 21).

    python benchmarks/scaling.py                       # 1B Llama shape, bfloat16, 256 prompts, 1 and 2 ranks
    python benchmarks/scaling.py --atlas-layers 2      # decode 2 layers' neurons only (a CPU without hours)

A Llama-3.2-1B-shaped model with random weights in bfloat16 (16 layers, hidden 2048, MLP 8192, vocab 128256,
1.24B parameters; no download) is saved once, then each configuration runs as its own
`torchrun --nproc_per_node R` launch with one thread per rank (OMP_NUM_THREADS=1), every rank loading the model:

  response pass  `collect_responses` over this rank's batches of the prompts (every gate/up/down unit, last token),
                 the ranks' share of `relations find` (`find.find` does exactly this);
  AP             `score_units`: each column block gathered on one rank and scored there (exact AP);
  atlas          `decode_atlas` of the up-projection neurons, chunks shared out among the ranks (bfloat16 GEMMs).

Times are wall clock between barriers (the slowest rank). Memory is each rank's resident set, sampled every 20 ms
during a phase: "model" right after loading, "peak" the highest value during the response pass and AP. The
same pass on a quarter of the prompts shows whether the peak grows with the prompts (it should not: responses
stream to disk, AP reads column blocks). Targets: response-pass speed-up of 2 ranks x 1 thread over 1 rank x 1
thread >= 1.8; peak - model independent of the number of prompts.

`--atlas-layers K` decodes a K-layer model of the same widths instead (the work per neuron is the same; on a CPU
the full 131,072-neuron x 128,256-token atlas is ~70 TFLOP). Ranks share the machine's cores: on a machine with
fewer free cores than ranks the speed-up measures the contention, not engramlab.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs

WORDS = 4096  # tokenizer words used by the prompts (ids below the model's vocabulary)
SHAPE = {  # Llama 3.2 1B
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def build(folder: Path, layers: int) -> None:
    """Save a random Llama of the 1B shape (with `layers` layers) and a word-level tokenizer to `folder`."""
    config = transformers.LlamaConfig(**{**SHAPE, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    model.save_pretrained(folder)
    del model
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(folder)


def prompts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"w{t}" for t in rng.integers(2, WORDS, rng.integers(8, 20))) for _ in range(n)]


@contextmanager
def rss_peak(box: dict, key: str):
    """Sample this process's resident set every 20 ms inside the block; box[key] = the peak in MB."""
    proc, done = psutil.Process(), threading.Event()
    peak = [proc.memory_info().rss]

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        box[key] = max(peak[0], proc.memory_info().rss) / 2**20


def _touch(model: torch.nn.Module) -> None:
    """Read one element per memory page of every weight: safetensors are memory-mapped, so the weights count in
    the resident set only once touched, and "model" must include them."""
    with torch.no_grad():
        for p in model.parameters():
            p.reshape(-1)[:: 4096 // p.element_size()].sum()


def child(args) -> None:
    """One rank: response pass, AP, atlas; rank 0 prints every rank's numbers as one JSON line."""
    from engramlab import distributed
    from engramlab.decode.atlas import decode_atlas
    from engramlab.models.loading import load_model
    from engramlab.relations.find import score_units
    from engramlab.relations.responses import ResponseMatrix, collect_responses
    from engramlab.relations.units import UnitSpace

    distributed.init_from_env()
    torch.set_num_threads(args.threads)

    def barrier() -> float:
        if distributed.is_running():
            torch.distributed.barrier()
        return time.perf_counter()

    out = {"rank": distributed.rank()}
    loaded = load_model(args.model, device="cpu", dtype="bfloat16")
    _touch(loaded.model)
    out["model_mb"] = psutil.Process().memory_info().rss / 2**20
    space = UnitSpace(loaded.layout, "neurons")
    texts = prompts(args.prompts)
    rows_of = [distributed.batch_rows(len(texts), args.batch, r) for r in range(distributed.world_size())]
    mine = rows_of[distributed.rank()]
    labels = np.arange(len(texts)) % 5  # 4 pseudo-relations of 1/5 of the prompts each, 4x as many negatives
    relations = [
        (np.flatnonzero(labels == r), np.flatnonzero(labels != r)[: 4 * (labels == r).sum()]) for r in range(4)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        matrix = ResponseMatrix(Path(tmp) / "r.f32", len(mine), space.size, "bench")
        with rss_peak(out, "response_peak_mb"):
            start = barrier()
            collect_responses(loaded, [texts[i] for i in mine], space, matrix, "last", args.batch)
            out["response_s"] = barrier() - start
        with rss_peak(out, "ap_peak_mb"):
            start = barrier()
            score_units(matrix, relations, rows_of if distributed.is_running() else None)
            out["ap_s"] = barrier() - start
    out["peak_mb"] = max(out["response_peak_mb"], out["ap_peak_mb"])
    out["units"] = space.size
    if args.atlas_model:
        del loaded, matrix
        atlas_model = load_model(args.atlas_model, device="cpu", dtype="bfloat16")
        _touch(atlas_model.model)
        with rss_peak(out, "atlas_peak_mb"):
            start = barrier()
            atlas = decode_atlas(atlas_model, top_k=10, compute_dtype=torch.bfloat16)
            out["atlas_s"] = barrier() - start
        out["atlas_neurons"] = atlas.n_neurons
    everyone = distributed.gather_objects(out)
    if distributed.is_main_process():
        print(json.dumps(everyone))
    distributed.shutdown()


def launch(args, ranks: int, n_prompts: int, model: Path, atlas: Path | None) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += [__file__, "--child", "--model", str(model), "--prompts", str(n_prompts), "--batch", str(args.batch)]
    command += ["--threads", str(args.threads)] + (["--atlas-model", str(atlas)] if atlas else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "ENGRAMLAB_QUIET": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"torchrun --nproc_per_node {ranks} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="Threads per rank.")
    parser.add_argument("--atlas-layers", type=int, default=SHAPE["num_hidden_layers"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--atlas-model", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama-1b"
        build(model, SHAPE["num_hidden_layers"])
        atlas = model
        if args.atlas_layers != SHAPE["num_hidden_layers"]:
            atlas = Path(tmp) / f"llama-1b-{args.atlas_layers}-layers"
            build(atlas, args.atlas_layers)
        runs = {
            (1, args.prompts): launch(args, 1, args.prompts, model, atlas),
            (2, args.prompts): launch(args, 2, args.prompts, model, atlas),
            (2, args.prompts // 4): launch(args, 2, args.prompts // 4, model, None),
        }
    one, two, fewer = runs[(1, args.prompts)], runs[(2, args.prompts)], runs[(2, args.prompts // 4)]
    print(
        f"machine: {cpu_name()}, {psutil.cpu_count()} logical CPUs, {args.threads} thread(s) per rank; "
        f"torch {torch.__version__}"
    )
    print(
        f"model: Llama-3.2-1B shape, random bfloat16 weights, {one[0]['units']:,} units (gate+up+down); "
        f"{args.prompts} prompts of 8-19 tokens, batches of {args.batch}"
    )
    print(f"{'':24s}{'1 rank':>12s}{'2 ranks':>12s}")
    for key, label in (("response_s", "response pass (s)"), ("ap_s", "AP (s)"), ("atlas_s", "atlas (s)")):
        print(f"{label:24s}{max(r[key] for r in one):12.1f}{max(r[key] for r in two):12.1f}")
    for key, label in (
        ("model_mb", "model RSS/rank (MB)"),
        ("response_peak_mb", "peak, responses (MB)"),
        ("ap_peak_mb", "peak, AP (MB)"),
    ):
        print(f"{label:24s}{max(r[key] for r in one):12.0f}{max(r[key] for r in two):12.0f}")
    speedup = max(r["response_s"] for r in one) / max(r["response_s"] for r in two)
    print(f"response-pass speed-up, 2 ranks x 1 thread over 1 rank x 1 thread: {speedup:.2f}x   (target >= 1.8)")
    atlas_speedup = max(r["atlas_s"] for r in one) / max(r["atlas_s"] for r in two)
    print(f"atlas speed-up ({one[0]['atlas_neurons']:,} up-projection neurons): {atlas_speedup:.2f}x")
    grow = [max(r["peak_mb"] - r["model_mb"] for r in run) for run in (fewer, two)]
    print(
        f"peak - model per rank (2 ranks): {grow[0]:.0f} MB on {args.prompts // 4} prompts, {grow[1]:.0f} MB on "
        f"{args.prompts} prompts   (target: independent of the prompts)"
    )


if __name__ == "__main__":
    main()
