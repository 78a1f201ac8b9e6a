"""Cost of a full (layer x position) residual patching map as a multiple of one forward pass of the same batch.

    python benchmarks/patching.py [--pairs 4 --repeats 5 --batch-size 64]

Paper 3's knowledge-location maps (Du et al. 2025, spec §B.2) patch the TRUE run's `resid_post` into the FALSE
run at every (layer, position) over the last n_toks tokens: done one cell at a time that is L x n_toks forwards
per pair. engramlab batches the patched runs (one row per cell) and runs only the patched tail of the prompt on
a shared KV cache of its unpatched few-shot prefix (`engramlab.posttrain.patching`).

For two model sizes — the shipped organism (organism:base, 6 layers, hidden 256) and a tiny random Llama with
the organism's tokenizer (2 layers, hidden 64) — and the same `--pairs` true/false city pairs in the few-shot
"This statement is:" prompt, this times, interleaved in rotating order so that machine noise hits both alike:
  forward   one plain forward of the pairs' FALSE prompts as one batch
  map       `patching_map` over the same pairs (every layer x the last n_toks positions, clean runs included)
and prints the median of each, the map's cost in forwards of the batch, and that cost divided by the number of
patched cells (layers x n_toks). Target (issue 7): <= 1.2 forwards per patched cell.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from engramlab.data.statements import got_statements, truefalse_prompt
from engramlab.models import from_hf, load_model
from engramlab.posttrain.patching import pairs_by_last_word, patching_map

TARGET = 1.2  # forwards per patched (layer, position) cell


def tiny_llama(tokenizer, layers: int, hidden: int) -> torch.nn.Module:
    """A random Llama sharing the organism's tokenizer, so that both sizes patch the same prompts."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def time_pair(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run interleaved in rotating order after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    names = list(fns)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="true/false pairs patched (the batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="patched rows per forward")
    parser.add_argument("--tiny-layers", type=int, default=2)
    parser.add_argument("--tiny-hidden", type=int, default=64)
    args = parser.parse_args()

    organism = load_model("organism:base", device="cpu", dtype="float32")
    tok = organism.require_tokenizer()
    tiny = from_hf(tiny_llama(tok, args.tiny_layers, args.tiny_hidden), tok, ref="tiny random Llama")
    pairs = pairs_by_last_word(got_statements("cities", "all"), tok, args.pairs, seed=0)
    false_batch = tok([truefalse_prompt(p.false) for p in pairs], return_tensors="pt", padding=True)

    print(
        f"device cpu ({cpu_name()}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(pairs)} city pairs, prompts of {false_batch['input_ids'].shape[1]} tokens; "
        f"{args.batch_size} patched rows per forward; median of {args.repeats}"
    )
    for lm in (organism, tiny):
        config = lm.model.config
        n_params = sum(p.numel() for p in lm.model.parameters())
        result = {}

        @torch.inference_mode()
        def forward(lm=lm):
            lm.model(**false_batch)

        def full_map(lm=lm, result=result):
            result["map"] = patching_map(lm, lm, pairs, batch_size=args.batch_size)

        medians = time_pair({"forward": forward, "map": full_map}, args.repeats)
        cells = result["map"].effect.size
        forwards = medians["map"] / medians["forward"]
        print(
            f"{lm.ref}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{n_params / 1e6:.2f}M parameters, float32"
        )
        print(
            f"  forward {medians['forward'] * 1000:8.1f} ms   map {medians['map'] * 1000:8.1f} ms   "
            f"patched cells {cells} ({config.num_hidden_layers} layers x {result['map'].effect.shape[1]} positions)"
        )
        print(
            f"  map = {forwards:.1f} forwards of the batch = {forwards / cells:.3f} per patched cell "
            f"(target <= {TARGET})"
        )


if __name__ == "__main__":
    main()
