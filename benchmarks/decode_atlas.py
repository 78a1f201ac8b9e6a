"""Speed of the neuron atlas (Davies 2025) against a bare GEMM and a naive per-neuron loop.

    python benchmarks/decode_atlas.py  # Llama-shaped, fits a laptop: 8 x 4096 neurons, H 512, V 32000
    python benchmarks/decode_atlas.py --shape llama3-8b    # 32 x 14336 neurons, H 4096, V 128256, bf16 (a GPU)

Random weights (no download), built directly as the tensors the atlas reads: one [N, H] up_proj weight per layer
and the LM head [V, H]. In one run, on the same weights and the same chunking:
  gemm   every chunk's matmul [chunk, H] x [H, V] into a reused buffer, nothing else (the lower bound);
  atlas  `decode_vectors`: the same matmuls + on-device top-k with exact tie handling (what `decode atlas` runs);
  loop   the naive per-neuron loop (W_U · w, then topk), timed on a sample of neurons and extrapolated;
gemm and atlas alternate over --repeats rounds (medians reported) so machine noise hits both alike.
Target (issue 6): atlas / gemm <= 1.5. Optionally (--write) the time to write atlas.parquet from the result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from engramlab.decode.atlas import (
    Atlas,
    auto_chunk_size,
    decode_vectors,
    iter_chunks,
    write_atlas,
)

SHAPES = {
    "cpu": {"layers": 8, "intermediate": 4096, "hidden": 512, "vocab": 32000, "dtype": "float32", "sample": 512},
    "llama3-8b": {
        "layers": 32,
        "intermediate": 14336,
        "hidden": 4096,
        "vocab": 128256,
        "dtype": "bfloat16",
        "sample": 2000,
    },
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_gemm(vectors, unembed, chunk: int, dtype) -> float:
    device = unembed.device
    w_t = unembed.to(dtype).T
    buf = torch.empty(chunk, unembed.shape[0], dtype=dtype, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _, x in iter_chunks(vectors, chunk):
            torch.matmul(x.to(dtype), w_t, out=buf[: x.shape[0]])
    sync(device)
    return time.perf_counter() - start


def atlas_time(vectors, unembed, chunk: int, top_k: int, dtype):
    device = unembed.device
    sync(device)
    start = time.perf_counter()
    decoded = decode_vectors(vectors, unembed, top_k, chunk_size=chunk, compute_dtype=dtype)
    sync(device)
    return time.perf_counter() - start, decoded


def naive_loop(vectors, unembed, top_k: int, sample: int, dtype) -> float:
    """Seconds per neuron of `W_U @ w` + `topk`, one neuron at a time, on `sample` neurons spread over the layers."""
    device = unembed.device
    u = unembed.to(dtype)
    per_layer = max(1, sample // len(vectors))
    rows = [(layer, i) for layer in range(len(vectors)) for i in range(per_layer)]
    with torch.no_grad():
        for layer, i in rows[:8]:  # warm-up
            torch.topk(u @ vectors[layer][i].to(dtype), top_k)
        sync(device)
        start = time.perf_counter()
        for layer, i in rows:
            torch.topk(u @ vectors[layer][i].to(dtype), top_k)
        sync(device)
    return (time.perf_counter() - start) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="cpu (default on CPU) or llama3-8b (default on CUDA)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: from free memory, as the atlas")
    parser.add_argument("--sample", type=int, help="neurons timed in the naive loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="also time writing atlas.parquet")
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = dict(SHAPES[args.shape or ("llama3-8b" if device.type == "cuda" else "cpu")])
    for key in ("layers", "intermediate", "hidden", "vocab", "dtype", "sample"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    dtype = DTYPES[shape["dtype"]]
    if device.type == "cpu" and dtype != torch.float32:
        print(f"note: {shape['dtype']} matmuls are slow on CPU; the atlas computes in float32 there")
        dtype = torch.float32

    gen = torch.Generator(device=device).manual_seed(0)
    hidden, vocab = shape["hidden"], shape["vocab"]
    # Llama-like init scales: up rows ~ N(0, 1/H), LM head ~ N(0, 0.02)
    vectors = [
        torch.randn(shape["intermediate"], hidden, device=device, generator=gen, dtype=dtype) / hidden**0.5
        for _ in range(shape["layers"])
    ]
    unembed = torch.randn(vocab, hidden, device=device, generator=gen, dtype=dtype) * 0.02
    total = shape["layers"] * shape["intermediate"]
    chunk = args.chunk_size or auto_chunk_size(vocab, dtype, device)
    chunk = min(chunk, total)

    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print(
        f"shape: {shape['layers']} layers x {shape['intermediate']} neurons = {total:,} neurons, hidden {hidden}, "
        f"vocab {vocab:,}, {str(dtype).removeprefix('torch.')}, top-{args.top_k}, chunk {chunk} neurons"
    )
    flops = 2 * total * hidden * vocab
    print(f"GEMM work: {flops / 1e12:.2f} TFLOP")

    # warm-up (allocator, BLAS threads, CUDA kernels)
    bare_gemm([v[: min(chunk, v.shape[0])] for v in vectors[:1]], unembed, chunk, dtype)
    decode_vectors(
        [vectors[0][: min(chunk, vectors[0].shape[0])]], unembed, args.top_k, chunk_size=chunk, compute_dtype=dtype
    )

    gemm_times, atlas_times, decoded = [], [], None
    for r in range(args.repeats):
        order = ("gemm", "atlas") if r % 2 == 0 else ("atlas", "gemm")
        for name in order:
            if name == "gemm":
                gemm_times.append(bare_gemm(vectors, unembed, chunk, dtype))
            else:
                seconds, decoded = atlas_time(vectors, unembed, chunk, args.top_k, dtype)
                atlas_times.append(seconds)
        print(f"  round {r + 1}: gemm {gemm_times[-1]:.3f} s, atlas {atlas_times[-1]:.3f} s", flush=True)
    gemm, atlas = statistics.median(gemm_times), statistics.median(atlas_times)
    per_neuron = naive_loop(vectors, unembed, args.top_k, shape["sample"], dtype)
    loop = per_neuron * total

    print(f"bare GEMM     {gemm:9.3f} s   ({flops / gemm / 1e12:.2f} TFLOP/s)")
    print(f"atlas         {atlas:9.3f} s   ({total / atlas:,.0f} neurons/s)")
    print(
        f"naive loop    {loop:9.1f} s   (extrapolated from {shape['sample']} neurons, {per_neuron * 1e3:.3f} ms each)"
    )
    print(f"atlas / GEMM  {atlas / gemm:9.2f}   (target <= 1.5)")
    print(f"loop / atlas  {loop / atlas:9.1f}")

    if args.write:
        k = args.top_k
        atlas_obj = Atlas(
            ids=decoded.ids.numpy().reshape(shape["layers"], -1, k),
            scores=decoded.scores.numpy().reshape(shape["layers"], -1, k),
            site="up",
            top_k=k,
            fold_norm=False,
            vocab_size=vocab,
            seconds=atlas,
            device=str(device),
        )
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_atlas(atlas_obj, tmp, overwrite=True, explorer=False)
            parquet = time.perf_counter() - start
            start = time.perf_counter()
            write_atlas(atlas_obj, tmp, overwrite=True, explorer=True)
            with_html = time.perf_counter() - start
        print(f"write parquet {parquet:9.3f} s   ({total * k:,} rows); with atlas.html {with_html:.3f} s")


if __name__ == "__main__":
    main()
