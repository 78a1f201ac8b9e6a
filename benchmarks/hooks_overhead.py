"""Cost of recording every MLP neuron, mean-reduced on the fly, as a ratio to a plain forward.

    python benchmarks/hooks_overhead.py [--layers 10 --hidden 768 --intermediate 2048 --batch 8 --seq 128]

Builds a randomly initialised Llama-shaped model (~95M parameters by default; no download), then times, in one
run interleaved in rotating order so that machine noise hits all alike:
  plain      model(**batch)
  act        + record("mlp.act", all layers, positions="nonpad", reduce="mean")        (down_proj's input)
  rsn-sites  + record(["mlp.gate", "mlp.up", "mlp.down"], all layers, same reduction)  (paper 1's neurons)
and prints the median time of each and the ratios to plain. Target (issue 3): act/plain <= 1.10 on CPU.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from _machine import cpu_name, interleaved_medians, print_ratios, recording_variants  # benchmarks/ on sys.path
from engramlab.models import HookEngine


def build(args) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=max(512, args.seq),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(args.device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = build(args)
    engine = HookEngine(model)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, : args.seq // 4] = 0  # half the rows left-padded, so the masking path is exercised
    batch = {"input_ids": ids, "attention_mask": mask}

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    with torch.inference_mode():
        medians = interleaved_medians(recording_variants(engine, model, batch, "rsn-sites"), args.repeats, sync)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(
        f"model: Llama-shaped, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"vocab {args.vocab}, {n_params / 1e6:.1f}M parameters, float32"
    )
    print(
        f"batch {args.batch} x {args.seq} tokens; device {args.device} ({device}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}"
    )
    print_ratios(medians)


if __name__ == "__main__":
    main()
