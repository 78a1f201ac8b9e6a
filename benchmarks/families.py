"""Layout discovery on an 8B-shaped model and the cost of recording every expert neuron of a MoE model.

    python benchmarks/families.py [--layers 4 --hidden 512 --expert-intermediate 1024 --experts 8 --batch 4 --seq 128]

Two measurements in one run (issue 20's targets):
1. discovery: `engramlab.models.discover` on a Llama-3-8B-shaped model (32 layers, hidden 4096, intermediate
   14336, vocab 128256) built on the meta device (no memory, no weights); median of 20 calls. Target < 50 ms.
2. experts: a randomly initialised Mixtral-shaped model (8 experts, 2 per token), timed interleaved in rotating order:
     plain    model(**batch)
     act      + record("mlp.act", all layers, positions="nonpad", reduce="mean")   (every expert neuron)
     neurons  + record(["mlp.gate", "mlp.up", "mlp.down"], all layers, same reduction)
   median of each and the ratio to plain. Target act/plain <= 1.15.
3. list experts: the same shape with its experts kept as a list of modules (transformers 4's Mixtral block, built
   by tests/list_moe.py), where recording runs the block's capture / compute / replay forward
   (`engramlab.models.expert_list`); the same three variants. No target in the issue; printed for the record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from _machine import cpu_name, interleaved_medians, print_ratios, recording_variants  # benchmarks/ on sys.path
from engramlab.models import HookEngine, discover

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the list-of-experts models live there
from list_moe import tiny_list_moe


def discovery_ms(repeats: int) -> tuple[float, int]:
    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        spec = discover(model)
        times.append(time.perf_counter() - start)
    assert len(spec.layer_specs) == 32 and spec.layer_specs[0].neurons == 14336
    return statistics.median(times) * 1000, n_params


def build_moe(args) -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.expert_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    ms, n_meta = discovery_ms(20)
    print(f"discovery: Llama-3-8B-shaped model on the meta device ({n_meta / 1e9:.2f}B parameters): {ms:.1f} ms")

    model = build_moe(args)
    engine = HookEngine(model)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, : args.seq // 4] = 0  # half the rows left-padded, so the masking path is exercised
    batch = {"input_ids": ids, "attention_mask": mask}
    neurons = engine.layout.site_width("mlp.act")

    with torch.inference_mode():
        medians = interleaved_medians(recording_variants(engine, model, batch, "neurons"), args.repeats)

    print(
        f"experts: Mixtral-shaped, {args.layers} layers, hidden {args.hidden}, {args.experts} experts x "
        f"{args.expert_intermediate} neurons (2 per token) = {neurons:,} neurons per layer, "
        f"{n_params / 1e6:.1f}M parameters, float32, experts implementation {model.config._experts_implementation}"
    )
    print(
        f"batch {args.batch} x {args.seq} tokens; CPU ({cpu_name()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}"
    )
    print_ratios(medians, width=8)

    listed = tiny_list_moe(
        "list_mixtral",
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        width=args.expert_intermediate,
        vocab=args.vocab,
    )
    engine = HookEngine(listed)
    with torch.inference_mode():
        medians = interleaved_medians(recording_variants(engine, listed, batch, "neurons"), args.repeats)
    print(f"list experts: the same shape, experts kept as {args.experts} modules per layer (transformers 4 Mixtral)")
    print_ratios(medians, width=8)


if __name__ == "__main__":
    main()
