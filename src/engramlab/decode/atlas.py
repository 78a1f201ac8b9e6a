"""The neuron atlas: every MLP neuron's weight vector decoded through the LM head into its top-k tokens.

Davies 2025, "Decoding specialised feature neurons in LLMs with the final projection layer" (arXiv 2501.02688),
§A.1 of the spec in `shared/papers/lmhead_decoding_and_posttraining.md`: the object decoded is row i of the
up-projection weight, w_i ∈ R^H, and its token scores are the logits W_U · w_i with the raw LM head (no bias).

Choices the paper leaves open (§A.2), made here and named by argument:

- `site`: `"up"` (rows of up_proj, the paper's object; fc_in for non-gated MLPs), `"gate"` (rows of gate_proj) or
  `"down"` (columns of down_proj: the direction the neuron writes into the residual stream). All three come from
  `ModelLayout.neuron_vectors`, so GPT-2's transposed Conv1D, fused gate_up halves and batched experts need no
  special case here.
- `fold_norm`: decode lm_head(final_norm(w_i)) with the model's own final norm module instead of W_U · w_i. For a
  Llama RMSNorm this is W_U (g ⊙ w_i / rms(w_i)); the gain g changes the ranking, the scalar rms does not. The raw
  top-1 is computed alongside, so `Atlas.top1_changed_by_fold_norm` says how much the choice matters (§A.2.1).
- `softmax`: probabilities over the whole vocabulary, p = exp(s - logsumexp(s)) per row (§A.2.2).

Speed (§A.2.6): the decode is a handful of large GEMMs [chunk, H] x [H, V] over the neurons of all layers, each
followed by an on-device `torch.topk`; the [L·N, V] score tensor never exists. The chunk size comes from free
memory. Ties are deterministic: ranks are ordered by (score desc, token id asc), exactly as a stable descending
sort of each row would order them (`naive_decode` below is that reference, one neuron at a time).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from engramlab import distributed
from engramlab.errors import EngramError, first_line
from engramlab.models.arch import expert_of_neuron, routed_experts
from engramlab.models.loading import is_offloaded, onloaded

DECODE_SITES = ("up", "gate", "down")
_CPU_BUDGET = 0.25  # fraction of available RAM the [chunk, V] score block (and its scratch) may use
_CUDA_BUDGET = 0.5  # fraction of free GPU memory
_MAX_ROWS = {"cpu": 2048, "cuda": 16384}  # beyond this the GEMM is already at full speed


# ------------------------------------------------------------------------------------------------------------------
# What is decoded: weight matrices out of a model.


def neuron_vectors(layout, site: str = "up", layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """One `[N, H]` tensor per layer of `layers` (default: `atlas_layers`): the vector of each neuron at `site`
    (views of the weights where possible).

    up: rows of up_proj (fc_in; the up half of a fused gate_up_proj); gate: rows of gate_proj; down: columns of
    down_proj. In a MoE layer the rows are every expert's neurons, expert by expert, then the shared expert's.
    """
    if site not in DECODE_SITES:
        raise EngramError(f"--site {site!r} is not a decode site; choose one of: {', '.join(DECODE_SITES)}.")
    chosen = atlas_layers(layout, layers)
    if site == "gate" and not all(layout.has_site("mlp.gate", layer) for layer in chosen):
        raise EngramError(f"--site gate does not exist in {layout.family}: its MLP is not gated (use up or down).")
    return [layout.neuron_vectors(layer, site).detach() for layer in chosen]


def atlas_layers(layout, layers: Sequence[int] | None = None) -> list[int]:
    """The layers an atlas decodes: `layers`, or every layer that has an MLP (a hybrid's Mamba and attention
    layers have none). The atlas is `[layers, neurons, k]`, so they must have one width; when they do not (DeepSeek's
    dense first layers before its MoE layers) the refusal names the groups to choose from."""
    if layers is None:
        chosen = layout.mlp_layers
    else:
        chosen = sorted({layout.check_layer(layer) for layer in layers})
        missing = [layer for layer in chosen if layer not in layout.mlp_layers]
        if missing:
            raise EngramError(
                f"{layout.family} layer {missing[0]} has no MLP to decode (a recurrent or attention layer)."
            )
    if not chosen:
        raise EngramError(f"{layout.family} has no MLP in any layer: there are no neurons to decode.")
    widths = {layer: layout.site_width("mlp.up", layer) for layer in chosen}
    if len(set(widths.values())) > 1:
        groups = "; ".join(f"layers {_ranges(ls)}: {w:,} neurons" for w, ls in _by_width(widths).items())
        raise EngramError(
            f"layers of {layout.family} have different MLP widths ({groups}); the atlas needs one width: choose "
            f"one group with --layers (layers= in Python)."
        )
    return chosen


def _by_width(widths: dict[int, int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for layer, width in widths.items():
        groups.setdefault(width, []).append(layer)
    return groups


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (what --layers takes)."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def unembedding(layout) -> torch.Tensor:
    """The LM head's weight W_U, `[V, H]` (its bias, if any, is not part of the decode)."""
    return layout.lm_head.weight.detach()


# ------------------------------------------------------------------------------------------------------------------
# The decode itself: pure functions over weight matrices.


@dataclass
class Decoded:
    """Top-k of every neuron, rows in (layer, neuron) order. Tensors on CPU."""

    ids: torch.Tensor  # [L*N, k] int64, rank order
    scores: torch.Tensor  # [L*N, k] float32
    probs: torch.Tensor | None = None  # [L*N, k] float32 when softmax
    top1_raw: torch.Tensor | None = None  # [L*N] int64 raw-head argmax when a norm was folded in
    chunk_size: int = 0


@contextmanager
def small_ops(device: torch.device) -> Iterator[None]:
    """One CPU thread for the small per-chunk bookkeeping ([chunk, k] sorts and copies). On a busy machine
    PyTorch's thread pool makes such tiny ops wait on a barrier (measured: 90 ms instead of 1.5 ms per chunk on
    2 shared cores); the large GEMM and top-k keep every thread. No-op on GPUs."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_EXTRA = 8  # candidates beyond k: bf16 scores tie at the k-th place in ~1/3 of rows, but rarely 8 deep


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of `scores` [R, V], ordered by (score desc, column asc): what a stable descending sort of
    each row gives.

    `torch.topk` orders ties arbitrarily and may return any of several entries tied at the k-th value, so it is
    asked for k + 8 candidates, which are put in (score desc, column asc) order. That order is exact unless the
    k-th value also equals the last candidate's (the tie may continue past the candidates); only those rows are
    resolved on their whole row.
    """
    vocab = scores.shape[1]
    n_cand = min(k + _EXTRA, vocab)
    vals, ids = torch.topk(scores, n_cand, dim=1, largest=True, sorted=True)  # [R, k+8]
    with small_ops(scores.device):
        if torch.isnan(vals[:, 0]).any():
            raise EngramError(
                "the decoded scores contain NaN: the model's weights hold NaN or overflow in this "
                "dtype (try --dtype float32)."
            )
        # (score desc, id asc): sort by id, then a stable sort by score
        ids, order = ids.sort(dim=1)
        vals = vals.gather(1, order)
        vals, order = vals.sort(dim=1, descending=True, stable=True)
        ids = ids.gather(1, order)
        vals, ids, last = vals[:, :k].contiguous(), ids[:, :k].contiguous(), vals[:, -1]
        if n_cand == vocab:
            return vals, ids
        unsure = vals[:, k - 1] == last  # the tie at the k-th value may reach past the candidates
        any_unsure = bool(unsure.any())
    if any_unsure:
        rows = unsure.nonzero().squeeze(1)  # [r]
        sub = scores[rows]  # [r, V]: copies of the few unsure rows
        threshold = vals[rows, k - 1 : k]  # [r, 1]
        above = sub > threshold  # all of them are among the candidates, in order
        n_above = above.sum(dim=1, keepdim=True)  # < k
        equal = sub == threshold
        # the tied entries kept: the (k - n_above) smallest columns
        take = equal & (equal.cumsum(dim=1, dtype=torch.int32) <= (k - n_above))
        cols = take.nonzero()[:, 1]  # row-major: ascending columns within each row
        rank = torch.arange(k, device=scores.device)[None]  # [1, k]
        fill = rank >= n_above  # [r, k] slots that hold tied entries
        new_ids = ids[rows].clone()
        new_ids[fill] = cols
        ids[rows] = new_ids
        vals[rows] = torch.where(fill, threshold.expand(-1, k), vals[rows])
    return vals, ids


def decode_vectors(
    vectors: Sequence[torch.Tensor],
    unembed: torch.Tensor,
    top_k: int = 10,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    softmax: bool = False,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
    progress: Callable[[Iterator, int], Iterator] | None = None,
) -> Decoded:
    """Decode every row of `vectors` (one `[N_l, H]` tensor per layer) through `unembed` `[V, H]`.

    scores = W_U · norm(w) (norm = identity unless given), then top-k per row (see `topk_rows`). With `norm`, the
    raw argmax W_U · w is returned too (`top1_raw`). Rows are processed in chunks of `chunk_size` neurons (None:
    chosen from free memory), chunks may span layers, and the per-layer tensors are never stacked.
    """
    if not vectors:
        raise EngramError("nothing to decode: the model has no layers.")
    vocab, hidden = unembed.shape
    if not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise EngramError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {top_k}.")
    for layer, v in enumerate(vectors):
        if v.dim() != 2 or v.shape[1] != hidden:
            raise EngramError(
                f"layer {layer}: neuron vectors have shape {list(v.shape)}, expected [N, {hidden}] "
                f"to match the LM head [{vocab}, {hidden}]."
            )
    device = unembed.device
    dtype = compute_dtype or _compute_dtype(unembed.dtype, device)
    total = sum(int(v.shape[0]) for v in vectors)
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab, dtype, device, softmax=softmax)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise EngramError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    chunk_size = min(chunk_size, total)

    w_t = unembed.to(dtype).T  # [H, V], a view when no cast is needed
    buf = torch.empty(chunk_size, vocab, dtype=dtype, device=device)  # reused: no page faults per chunk
    ids_out = torch.empty(total, top_k, dtype=torch.long, device=device)
    vals_out = torch.empty(total, top_k, dtype=torch.float32, device=device)
    probs_out = torch.empty(total, top_k, dtype=torch.float32, device=device) if softmax else None
    raw_out = torch.empty(total, dtype=torch.long, device=device) if norm is not None else None

    chunks = iter_chunks(vectors, chunk_size, device)
    if progress is not None:
        chunks = progress(chunks, -(-total // chunk_size))
    with torch.no_grad():
        for start, x in chunks:
            n = x.shape[0]
            block = buf[:n]  # [n, V]
            x = x.to(device)
            if norm is not None:
                torch.matmul(x.to(dtype), w_t, out=block)
                raw_out[start : start + n] = block.argmax(dim=1)  # first maximum = smallest id among ties
                x = norm(x)
            torch.matmul(x.to(dtype), w_t, out=block)
            vals, ids = topk_rows(block, top_k)
            lse = torch.logsumexp(block.float(), dim=1, keepdim=True) if softmax else None  # [n, 1]
            with small_ops(device):
                ids_out[start : start + n] = ids
                vals_out[start : start + n] = vals.float()
                if softmax:
                    probs_out[start : start + n] = torch.exp(vals.float() - lse)
    return Decoded(
        ids=ids_out.cpu(),
        scores=vals_out.cpu(),
        probs=None if probs_out is None else probs_out.cpu(),
        top1_raw=None if raw_out is None else raw_out.cpu(),
        chunk_size=chunk_size,
    )


def iter_chunks(
    vectors: Sequence[torch.Tensor], chunk_size: int, device: torch.device | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first global row, `[c, H]` rows) over the layers' rows in order; a chunk that spans two layers is the
    concatenation of two slices (a copy of c rows), every other chunk is a view. With `device`, pieces are moved
    there first (layers spread over several GPUs)."""
    offsets = np.cumsum([0] + [int(v.shape[0]) for v in vectors])
    total = int(offsets[-1])
    for start in range(0, total, chunk_size):
        end = min(start + chunk_size, total)
        pieces = []
        for layer, v in enumerate(vectors):
            lo, hi = max(start, offsets[layer]), min(end, offsets[layer + 1])
            if lo < hi:
                piece = v[lo - offsets[layer] : hi - offsets[layer]]
                pieces.append(piece if device is None else piece.to(device))
        yield start, pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def auto_chunk_size(vocab: int, dtype: torch.dtype, device: torch.device, softmax: bool = False) -> int:
    """Neurons per chunk so that the `[chunk, V]` score block and its scratch fit in a fraction of free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free * _CUDA_BUDGET
    else:
        import psutil

        budget = psutil.virtual_memory().available * _CPU_BUDGET
    elem = torch.empty((), dtype=dtype).element_size()
    # block + topk/tie scratch (+ an fp32 copy and its exp for logsumexp)
    per_row = vocab * (elem * 2 + (8 if softmax else 0))
    rows = int(budget // per_row)
    rows = min(rows, _MAX_ROWS.get(device.type, _MAX_ROWS["cuda"]))
    if rows >= 64:
        rows -= rows % 64  # GEMM-friendly
    return max(rows, 1)


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The weights' dtype, except half precision on CPU (slow matmuls there) which is computed in float32."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def naive_decode(
    vectors: Sequence[torch.Tensor],
    unembed: torch.Tensor,
    top_k: int,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one neuron at a time, a full stable sort of its V scores. `[L*N, k]` ids and scores."""
    ids, scores = [], []
    with torch.no_grad():
        for v in vectors:
            for w in v:
                x = w if norm is None else norm(w[None])[0]
                s = unembed @ x  # [V]
                order = torch.sort(s, descending=True, stable=True).indices[:top_k]
                ids.append(order)
                scores.append(s[order])
    return torch.stack(ids), torch.stack(scores)


# ------------------------------------------------------------------------------------------------------------------
# The atlas of a loaded model.


@dataclass
class Atlas:
    """Top-k tokens of every neuron of one model at one site. Arrays are `[L, N, k]`, ranks in (score desc,
    token id asc) order."""

    ids: np.ndarray  # [L, N, k] int64
    scores: np.ndarray  # [L, N, k] float32 (logits W_U · w, or W_U · norm(w) with fold_norm)
    site: str
    top_k: int
    fold_norm: bool
    vocab_size: int
    tokens: list[str] | None = None  # decoded string of every vocab id (None without a tokenizer)
    probs: np.ndarray | None = None  # [L, N, k] float32 with softmax
    top1_raw: np.ndarray | None = None  # [L, N] raw-head top-1 with fold_norm
    seconds: float = 0.0
    device: str = "cpu"
    model: str = ""
    head: str = ""  # the model whose LM head decoded the vectors (differs from `model` with a shared head)
    chunk_size: int = 0
    meta: dict = field(default_factory=dict)
    layers: tuple[int, ...] | None = None  # the model layer of each block of rows; None: layers 0 .. L-1
    experts: tuple[tuple[int, int], ...] | None = None  # MoE: (routed experts, neurons per expert) of each block

    @property
    def n_layers(self) -> int:
        return int(self.ids.shape[0])

    @property
    def layer_ids(self) -> list[int]:
        """The model layer of each of the atlas's `L` blocks."""
        return list(range(self.n_layers)) if self.layers is None else list(self.layers)

    @property
    def n_neurons_per_layer(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.n_neurons_per_layer

    def expert_of(self) -> np.ndarray | None:
        """`[L*N]` int32: the routed expert of each neuron (neuron j of a MoE layer belongs to expert j // width),
        -1 for a dense or shared-expert neuron; None for a model without routed experts."""
        if self.experts is None:
            return None
        neuron = np.arange(self.n_neurons_per_layer)
        return np.concatenate([expert_of_neuron(neuron, n, width) for n, width in self.experts]).astype(np.int32)

    @property
    def top1(self) -> np.ndarray:
        """`[L, N]` top token id of every neuron."""
        return self.ids[:, :, 0]

    @property
    def top1_changed_by_fold_norm(self) -> float | None:
        """Fraction of neurons whose top-1 token differs between lm_head(final_norm(w)) and W_U · w."""
        if self.top1_raw is None:
            return None
        return float(np.mean(self.top1_raw != self.top1))

    def token(self, token_id: int) -> str:
        if self.tokens is None or not 0 <= token_id < len(self.tokens):
            return f"<id {token_id}>"
        return self.tokens[token_id]

    def neuron(self, layer: int, index: int) -> list[tuple[int, str, float]]:
        """(token id, token, score) of one neuron's top-k; `layer` is the model's layer number."""
        if layer not in self.layer_ids:
            raise EngramError(f"layer {layer} is not in this atlas (its layers: {_ranges(self.layer_ids)}).")
        block = self.layer_ids.index(layer)
        return [
            (int(t), self.token(int(t)), float(s))
            for t, s in zip(self.ids[block, index], self.scores[block, index], strict=True)
        ]

    def summary(self) -> dict:
        out = {
            "model": self.model,
            "n_layers": self.n_layers,
            "n_neurons_per_layer": self.n_neurons_per_layer,
            "n_neurons": self.n_neurons,
            "vocab_size": self.vocab_size,
            "site": self.site,
            "top_k": self.top_k,
            "fold_norm": self.fold_norm,
            "softmax": self.probs is not None,
            "seconds": round(self.seconds, 4),
            "neurons_per_second": round(self.n_neurons / self.seconds, 1) if self.seconds > 0 else None,
            "device": self.device,
            "chunk_size": self.chunk_size,
        }
        if self.layers is not None:
            out["layers"] = _ranges(self.layer_ids)
        if self.head and self.head != self.model:
            out["head"] = self.head
        if self.fold_norm:
            out["top1_changed_by_fold_norm"] = self.top1_changed_by_fold_norm
        return {**out, **self.meta}


def decode_atlas(
    loaded,
    site: str = "up",
    top_k: int = 10,
    fold_norm: bool = False,
    softmax: bool = False,
    chunk_size: int | None = None,
    head=None,
    compute_dtype: torch.dtype | None = None,
    progress: bool = False,
    layers: Sequence[int] | None = None,
) -> Atlas:
    """Decode every neuron of `loaded` (a `LoadedModel`) at `site` through its LM head.

    `head`: another `LoadedModel` whose LM head (and final norm, with `fold_norm`) decodes this model's vectors,
    for `decode compare --shared-head`. `layers`: the layers to decode (default: every layer with an MLP; see
    `atlas_layers`). Returns an `Atlas` (arrays on CPU) with timing in `seconds`.
    """
    layout = loaded.layout
    head_layout = (head or loaded).layout
    chosen = atlas_layers(layout, layers)
    vectors = neuron_vectors(layout, site, chosen)
    n_layers, per_layer = len(vectors), int(vectors[0].shape[0])
    offloaded = is_offloaded(loaded.model) or is_offloaded((head or loaded).model)
    tracker = None
    if progress:
        from engramlab.progress import track

        def tracker(items, total):
            return track(items, f"decoding {site} neurons", total=total)

    with onloaded(head_layout.lm_head):  # W_U stays in memory for the whole decode (a no-op unless offloaded)
        unembed = unembedding(head_layout)
        norm = _norm_fn(head_layout.final_norm) if fold_norm else None
        device = unembed.device
        _sync(device)
        start = time.perf_counter()
        decode = partial(
            decode_vectors, unembed=unembed, top_k=top_k, norm=norm, softmax=softmax, compute_dtype=compute_dtype
        )
        if offloaded:
            decoded = _decode_offloaded(layout, site, chosen, decode, chunk_size)
        elif distributed.is_running():
            decoded = _decode_sharded(vectors, decode, chunk_size, tracker)
        else:
            decoded = decode(vectors, chunk_size=chunk_size, progress=tracker)
        _sync(device)
    seconds = time.perf_counter() - start
    shape = (n_layers, per_layer, top_k)
    tokenizer = getattr(head or loaded, "tokenizer", None) or getattr(loaded, "tokenizer", None)
    return Atlas(
        ids=decoded.ids.numpy().reshape(shape),
        scores=decoded.scores.numpy().reshape(shape),
        probs=None if decoded.probs is None else decoded.probs.numpy().reshape(shape),
        top1_raw=None if decoded.top1_raw is None else decoded.top1_raw.numpy().reshape(shape[:2]),
        site=site,
        top_k=top_k,
        fold_norm=fold_norm,
        vocab_size=int(unembed.shape[0]),
        tokens=token_strings(tokenizer, int(unembed.shape[0])),
        seconds=seconds,
        device=str(device),
        model=str(getattr(loaded, "ref", "")),
        head=str(getattr(head or loaded, "ref", "")),
        chunk_size=decoded.chunk_size,
        layers=None if chosen == list(range(layout.n_layers)) else tuple(chosen),
        experts=_routed_experts(layout, chosen),
    )


def _routed_experts(layout, layers: list[int]) -> tuple[tuple[int, int], ...] | None:
    """(routed experts, neurons per expert) of each layer, (0, 0) for a dense one; None when no layer has any."""
    experts = tuple(routed_experts(layout.mlp(layer)) for layer in layers)
    return experts if any(n for n, _ in experts) else None


def _decode_offloaded(layout, site: str, layers: list[int], decode: Callable, chunk_size: int | None) -> Decoded:
    """A model whose weights are partly offloaded (accelerate's device_map with CPU or disk): one layer at a time,
    its weights brought onto the execution device for that layer only, so memory holds one layer's vectors."""
    parts = []
    for layer in layers:
        with onloaded(layout.layers[layer]):  # the layer's weights (its MLP's among them), for this layer only
            parts.append(decode(neuron_vectors(layout, site, [layer]), chunk_size=chunk_size))
    return Decoded(
        ids=torch.cat([p.ids for p in parts]),
        scores=torch.cat([p.scores for p in parts]),
        probs=None if parts[0].probs is None else torch.cat([p.probs for p in parts]),
        top1_raw=None if parts[0].top1_raw is None else torch.cat([p.top1_raw for p in parts]),
        chunk_size=parts[0].chunk_size,
    )


def _decode_sharded(vectors: Sequence[torch.Tensor], decode: Callable, chunk_size: int | None, tracker) -> Decoded:
    """Under torchrun: each rank decodes a contiguous run of whole chunks (the same chunks one process would, at
    the chunk size of the rank with the least memory), and the ranks' rows are gathered back in (layer, neuron)
    order on every rank, so every rank holds the one merged atlas."""
    total = sum(int(v.shape[0]) for v in vectors)
    if chunk_size is None:
        unembed = decode.keywords["unembed"]
        dtype = decode.keywords["compute_dtype"] or _compute_dtype(unembed.dtype, unembed.device)
        chunk_size = auto_chunk_size(unembed.shape[0], dtype, unembed.device, decode.keywords["softmax"])
    chunk_size = min(min(distributed.gather_objects(chunk_size)), total)
    n_chunks, world, rank = -(-total // chunk_size), distributed.world_size(), distributed.rank()
    lo = min(n_chunks * rank // world * chunk_size, total)
    hi = min(n_chunks * (rank + 1) // world * chunk_size, total)
    offsets = np.cumsum([0] + [int(v.shape[0]) for v in vectors])
    mine = [
        v[max(lo, a) - a : min(hi, b) - a]
        for v, a, b in zip(vectors, offsets[:-1], offsets[1:], strict=True)
        if max(lo, a) < min(hi, b)
    ]  # this rank's rows [lo, hi), as views per layer
    part = decode(mine, chunk_size=chunk_size, progress=tracker) if mine else None
    parts = [p for p in distributed.gather_objects(part) if p is not None]

    def cat(name: str) -> torch.Tensor | None:
        pieces = [getattr(p, name) for p in parts]
        return None if pieces[0] is None else torch.cat(pieces)

    return Decoded(
        ids=cat("ids"), scores=cat("scores"), probs=cat("probs"), top1_raw=cat("top1_raw"), chunk_size=chunk_size
    )


def _norm_fn(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply the model's own final norm to weight rows, in the norm's dtype (as the model would)."""
    param = next(module.parameters(), None)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if param is None:
            return module(x)
        return module(x.to(param.dtype))

    return apply


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_strings(tokenizer, vocab_size: int) -> list[str] | None:
    """The decoded string of every id 0..V-1, computed once in one batch (ids past the tokenizer: `<id N>`)."""
    if tokenizer is None:
        return None
    n = min(len(tokenizer), vocab_size)
    strings = tokenizer.batch_decode(
        [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return list(strings) + [f"<id {i}>" for i in range(n, vocab_size)]


# ------------------------------------------------------------------------------------------------------------------
# Files: atlas.parquet (streamed in row groups), summary.json, atlas.html.

ATLAS_FILE = "atlas.parquet"
ROWS_PER_GROUP = 1 << 20


def atlas_schema(with_probs: bool, with_experts: bool = False) -> pa.Schema:
    fields = [
        pa.field("layer", pa.int32()),
        pa.field("neuron", pa.int32()),
        *([pa.field("expert", pa.int32())] if with_experts else []),  # MoE: the routed expert, -1 for none
        pa.field("rank", pa.int32()),
        pa.field("token_id", pa.int32()),
        pa.field("token", pa.dictionary(pa.int32(), pa.string())),
        pa.field("score", pa.float32()),
    ]
    if with_probs:
        fields.append(pa.field("prob", pa.float32()))
    return pa.schema(fields)


def atlas_record_batches(atlas: Atlas, rows_per_group: int = ROWS_PER_GROUP) -> Iterator[pa.RecordBatch]:
    """The atlas as tidy rows (one per neuron x rank), a bounded number of rows at a time. The token column is
    dictionary-encoded from the per-id strings decoded once (`Atlas.tokens`): no Python work per row."""
    k, per_layer = atlas.top_k, atlas.n_neurons_per_layer
    layer_ids = np.asarray(atlas.layer_ids, dtype=np.int32)
    expert_of = atlas.expert_of()  # [L*N] or None
    vocab = pa.array(
        atlas.tokens if atlas.tokens is not None else [f"<id {i}>" for i in range(atlas.vocab_size)], pa.string()
    )
    schema = atlas_schema(atlas.probs is not None, atlas.experts is not None)
    ids = atlas.ids.reshape(-1, k)
    scores = atlas.scores.reshape(-1, k)
    probs = None if atlas.probs is None else atlas.probs.reshape(-1, k)
    step = max(1, rows_per_group // k)
    for start in range(0, ids.shape[0], step):
        stop = min(start + step, ids.shape[0])
        flat = np.arange(start, stop, dtype=np.int64)  # global neuron index
        token_ids = ids[start:stop].reshape(-1)
        used, inverse = np.unique(token_ids, return_inverse=True)  # a compact dictionary per row group
        columns = [
            pa.array(np.repeat(layer_ids[flat // per_layer], k)),
            pa.array(np.repeat(flat % per_layer, k).astype(np.int32)),
            *([pa.array(np.repeat(expert_of[flat], k))] if expert_of is not None else []),
            pa.array(np.tile(np.arange(k, dtype=np.int32), stop - start)),
            pa.array(token_ids.astype(np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(inverse.astype(np.int32)), vocab.take(pa.array(used))),
            pa.array(scores[start:stop].reshape(-1).astype(np.float32)),
        ]
        if probs is not None:
            columns.append(pa.array(probs[start:stop].reshape(-1).astype(np.float32)))
        yield pa.RecordBatch.from_arrays(columns, schema=schema)


def write_atlas(
    atlas: Atlas,
    out: str | os.PathLike,
    overwrite: bool = False,
    explorer: bool = True,
    rows_per_group: int = ROWS_PER_GROUP,
    extra: dict | None = None,
) -> dict:
    """Write `atlas.parquet` (row group by row group, atomically), `summary.json` and (with `explorer`) the
    self-contained `atlas.html`. Returns the summary."""
    from engramlab.results import atomic_path, prepare_out_dir, write_json

    if not distributed.is_main_process():  # under torchrun every rank holds the merged atlas; rank 0 writes it
        return {**atlas.summary(), "rows": atlas.n_neurons * atlas.top_k, **(extra or {})}
    out_dir = prepare_out_dir(out, overwrite)
    start = time.perf_counter()
    schema = atlas_schema(atlas.probs is not None, atlas.experts is not None)
    with atomic_path(out_dir / ATLAS_FILE) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in atlas_record_batches(atlas, rows_per_group):
            writer.write_batch(batch, row_group_size=rows_per_group)
    summary = {
        **atlas.summary(),
        "rows": atlas.n_neurons * atlas.top_k,
        "write_seconds": round(time.perf_counter() - start, 3),
        **(extra or {}),
    }
    if explorer:
        from engramlab.decode.explorer import write_explorer

        summary["explorer"] = write_explorer(atlas, out_dir / "atlas.html")
    write_json(out_dir / "summary.json", summary)
    return summary


def load_atlas(path: str | os.PathLike) -> Atlas:
    """Read an atlas written by `write_atlas` (a folder or its atlas.parquet) back into arrays."""
    import json

    path = Path(path)
    folder, file = (path, path / ATLAS_FILE) if path.is_dir() else (path.parent, path)
    if not file.is_file():
        raise EngramError(f"{file} does not exist; write one with `engramlab decode atlas --out {folder}`.")
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowInvalid) as err:
        raise EngramError(f"cannot read {file}: {first_line(err)}") from err
    missing = {"layer", "neuron", "rank", "token_id", "token", "score"} - set(table.column_names)
    if missing:
        raise EngramError(f"{file} is not an atlas: it lacks the column(s) {', '.join(sorted(missing))}.")
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    table = table.sort_by([("layer", "ascending"), ("neuron", "ascending"), ("rank", "ascending")])
    layer_ids = pc.unique(table["layer"]).to_pylist()
    n_layers = len(layer_ids)
    per_layer = int(pc.max(table["neuron"]).as_py()) + 1
    k = int(pc.max(table["rank"]).as_py()) + 1
    if table.num_rows != n_layers * per_layer * k:
        raise EngramError(
            f"{file} has {table.num_rows} rows, not layers x neurons x ranks = "
            f"{n_layers} x {per_layer} x {k}; it is incomplete."
        )
    shape = (n_layers, per_layer, k)
    ids = table["token_id"].to_numpy().astype(np.int64).reshape(shape)
    vocab_size = int(summary.get("vocab_size", int(ids.max()) + 1))
    tokens = [f"<id {i}>" for i in range(vocab_size)]
    token_col = table["token"].combine_chunks()
    token_col = token_col.dictionary_decode() if pa.types.is_dictionary(token_col.type) else token_col
    used, first = np.unique(ids.reshape(-1), return_index=True)
    for token_id, text in zip(used.tolist(), token_col.take(pa.array(first)).to_pylist(), strict=True):
        tokens[token_id] = text
    return Atlas(
        ids=ids,
        scores=table["score"].to_numpy().astype(np.float32).reshape(shape),
        probs=table["prob"].to_numpy().astype(np.float32).reshape(shape) if "prob" in table.column_names else None,
        site=summary.get("site", "up"),
        top_k=k,
        fold_norm=bool(summary.get("fold_norm", False)),
        vocab_size=vocab_size,
        tokens=tokens,
        seconds=float(summary.get("seconds") or 0.0),
        device=summary.get("device", ""),
        model=summary.get("model", ""),
        layers=None if layer_ids == list(range(n_layers)) else tuple(int(i) for i in layer_ids),
        experts=_experts_from_column(table, shape) if "expert" in table.column_names else None,
    )


def _experts_from_column(table: pa.Table, shape: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    """(routed experts, neurons per expert) of each block, read back from the rank-0 rows' expert column."""
    expert = table["expert"].to_numpy().reshape(shape)[:, :, 0]  # [L, N]
    return tuple((int(row.max()) + 1, int((row == 0).sum())) if (row >= 0).any() else (0, 0) for row in expert)


__all__ = [
    "ATLAS_FILE",
    "DECODE_SITES",
    "Atlas",
    "Decoded",
    "atlas_layers",
    "atlas_record_batches",
    "auto_chunk_size",
    "decode_atlas",
    "decode_vectors",
    "iter_chunks",
    "load_atlas",
    "naive_decode",
    "neuron_vectors",
    "token_strings",
    "topk_rows",
    "unembedding",
    "write_atlas",
]
