"""Tiny random models of any causal-LM family of the installed transformers, for the census and tests.

`tiny_config(model_type)` starts from the family's default config (its real, large shape) and shrinks every size
it knows by name, in the spirit of transformers' own model testers (hidden 64, 4 heads, intermediate 96 — not a
multiple of the hidden size, so a transposed weight cannot hide — 4 experts with 2 per token, 256 tokens). Layer
lists are cut to a few layers that keep one of each layer kind (first dense layers and MoE layers, sliding and
full attention, attention and recurrent mixers), with every per-layer list and index list remapped to match.
Sub-configs (text, vision) are shrunk the same way. No download: only configuration classes are used.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, EXPERT_INTERMEDIATE, EXPERTS, TOP_K, VOCAB = (
    64,
    4,
    2,
    16,
    96,
    48,
    4,
    2,
    256,
)
MAX_LAYERS = 4

# Size fields by name -> tiny value (applied when the default is larger, or None for the fields in FILL_NONE).
SIZES = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embedding_dim", "dim", "word_embed_proj_dim"), HIDDEN),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads"), HEADS),
    **dict.fromkeys(("decoder_attention_heads", "encoder_attention_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "kv_n_heads", "multi_query_group_num"), KV_HEADS),
    "num_query_groups": KV_HEADS,
    **dict.fromkeys(("head_dim", "kv_channels", "attention_head_dim", "d_head", "dim_head"), HEAD_DIM),
    "rotary_dim": HEAD_DIM // 2,
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "decoder_ffn_dim"), INTERMEDIATE),
    **dict.fromkeys(("encoder_ffn_dim", "d_inner", "dff", "dim_ff", "intermediate_size_mlp"), INTERMEDIATE),
    **dict.fromkeys(("dense_intermediate_size", "feed_forward_size"), INTERMEDIATE),
    **dict.fromkeys(
        ("moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size"), EXPERT_INTERMEDIATE
    ),
    **dict.fromkeys(
        ("shared_experts_intermediate_size", "shared_intermediate_size", "moe_shared_expert_intermediate_size"),
        EXPERT_INTERMEDIATE,
    ),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "moe_top_k"), TOP_K),
    "n_shared_experts": 1,
    "zero_expert_num": 2,
    **dict.fromkeys(("n_group", "num_expert_group"), 2),
    "topk_group": 1,
    **{"kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM},
    **{"index_head_dim": 16, "index_n_heads": 2, "index_topk": 8},
    **dict.fromkeys(("vocab_size", "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), VOCAB),
    **dict.fromkeys(("sliding_window", "attention_window_size", "sliding_window_size", "window_size"), 32),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), 16),
    **{"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_num_heads": 4},
    **dict.fromkeys(("mamba_d_state", "ssm_state_size", "state_size", "mamba_chunk_size", "chunk_size"), 16),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim"), 32),
    **{"n_groups": 1, "mamba_dt_rank": 8, "attention_hidden_size": 2 * HIDDEN},
}
FILL_NONE = {"head_dim", "num_experts", "n_routed_experts", "num_local_experts", "num_experts_per_tok"}
FILL_NONE |= {"moe_intermediate_size", "num_key_value_heads", "n_shared_experts"}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "block_types", "no_rope_layers")
PER_LAYER_LISTS += ("attention_layers", "layer_rope_theta", "intermediate_size", "activation_sparsity_pattern")
INDEX_LISTS = ("moe_layers", "full_attn_idxs", "mlp_only_layers", "cross_attention_layers", "hybrid_layer_ids")
INDEX_LISTS += ("ple_layer_ids", "attn_layer_indices")
FIRST_DENSE = ("first_k_dense_replace", "num_dense_layers")


def _layer_count(d: dict) -> tuple[str | None, int | None]:
    for key in LAYER_COUNTS:
        if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
            return key, d[key]
    for key in PER_LAYER_LISTS:
        if isinstance(d.get(key), list):
            return None, len(d[key])
    return None, None


def _kept_layers(d: dict, n: int) -> list[int]:
    """The first layer of every kind (per-layer lists, first dense layers, attention layers), at least 2."""
    keep = {0, 1}
    for key in PER_LAYER_LISTS:
        values = d.get(key)
        if isinstance(values, list) and len(values) == n:
            first: dict[str, int] = {}
            for i, value in enumerate(values):
                first.setdefault(repr(value), i)
            keep |= set(first.values())
    for key in FIRST_DENSE:
        k = d.get(key)
        if isinstance(k, int) and 0 < k < n:
            keep |= {0, k}
    for key in INDEX_LISTS:
        values = d.get(key)
        if isinstance(values, list) and values and all(isinstance(v, int) for v in values):
            keep.add(min(values))
    return sorted(i for i in keep if i < n)[:MAX_LAYERS]


def shrink(d: dict) -> dict:
    """Overrides that make the config dict `d` tiny (sizes, token ids, kept layers and their per-layer lists)."""
    out: dict = {}
    key, n = _layer_count(d)
    keep = _kept_layers(d, n) if n else None
    for name, value in d.items():
        if isinstance(value, bool):
            continue
        if name in SIZES and (
            (isinstance(value, int) and value > SIZES[name]) or (value is None and name in FILL_NONE)
        ):
            out[name] = SIZES[name]
        elif name.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            out[name] = VOCAB - 1 - ("pad" in name)
        elif name.endswith("token_id") and isinstance(value, list):
            out[name] = [min(v, VOCAB - 1) for v in value]
    patterns = [d[k] for k in PER_LAYER_LISTS if isinstance(d.get(k), list) and n and 1 < len(d[k]) < n]
    if key and patterns and len(patterns[0]) <= MAX_LAYERS:  # a repeating pattern (RecurrentGemma): one period
        keep = list(range(len(patterns[0])))
    if d.get("attn_layer_indices", 0) is None and n and n > 1:  # Bamba: no attention layer by default; make one
        out["attn_layer_indices"] = [1]
    if keep:
        if key:
            out[key] = len(keep)
        for name in PER_LAYER_LISTS:
            values = d.get(name)
            if isinstance(values, list) and len(values) == n:
                out[name] = [values[i] for i in keep]
        for name in INDEX_LISTS:
            values = d.get(name)
            if isinstance(values, list) and all(isinstance(v, int) for v in values):
                out[name] = [keep.index(v) for v in values if v in keep]
        if isinstance(d.get("per_layer_config"), dict):
            out["per_layer_config"] = {
                f"{keep.index(int(i)):02d}": c for i, c in d["per_layer_config"].items() if int(i) in keep
            }
        for name in FIRST_DENSE:
            if isinstance(d.get(name), int) and d[name] > 0:
                out[name] = sum(1 for i in keep if i < d[name])
    for name in ("num_key_value_heads", "num_kv_heads"):  # keep multi-head attention multi-head (MLA needs it)
        if name in out and d.get(name) == d.get("num_attention_heads"):
            out[name] = SIZES["num_attention_heads"]
    if "kv_lora_rank" in d:  # multi-head latent attention: head_dim is the rotary part
        out["head_dim"] = SIZES["qk_rope_head_dim"]
        if "qk_head_dim" in d:
            out["qk_head_dim"] = SIZES["qk_rope_head_dim"] + SIZES["qk_nope_head_dim"]
    for name in ("attn_layer_period", "expert_layer_period"):
        if isinstance(d.get(name), int):
            out[name] = 2
    for name in ("attn_layer_offset", "expert_layer_offset"):
        if isinstance(d.get(name), int):
            out[name] = 1
    return out


def tiny_config(model_type: str):
    """The family's default config with every known size shrunk (sub-configs too)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    overrides = shrink(config.to_dict())
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            values = sub.to_dict()
            values.update(shrink(values))
            overrides[name] = values
    return AutoConfig.for_model(model_type, **overrides)


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random `AutoModelForCausalLM` of the family, in eval mode, float32."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()
