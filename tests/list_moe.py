"""Tiny causal LMs whose MoE layers keep their experts as a list of modules, as transformers 4 and remote-code models
do (transformers 5 ships none: it stores experts as batched tensors). Four routing codes, written after the
originals' structure, on a Llama decoder:

- `list_mixtral`: Mixtral (transformers 4) - w1/w3/w2 experts, softmax top-2 renormalised, one-hot expert mask,
  `index_add_`; the block returns (hidden, router_logits), unwrapped by a holder module as Mixtral's layer did.
- `list_qwen2_moe`: Qwen2-MoE (transformers 4) - top-2 without renormalising, a shared expert scaled by a sigmoid
  gate, and a dense first layer.
- `list_deepseek`: DeepSeek-V2 remote code - a gate module holding the router weight itself, tokens sorted by expert
  and split (`moe_infer`), a routed scaling factor, shared experts.
- `list_switch`: non-gated fc1/fc2 GELU experts with biases, top-1 routing, outputs written by index.

Importing this module registers the four model types with transformers' Auto classes, so `save_pretrained` and
engramlab's `load_model` work on them as on any local checkpoint. Copied beside a checkpoint and named in its
config's `auto_map`, the file is also that checkpoint's remote code (`trust_remote_code=True`), as DeepSeek-V2's is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

STYLES = ("list_mixtral", "list_qwen2_moe", "list_deepseek", "list_switch")


class GatedExpert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), with the projection names of the family."""

    def __init__(self, hidden: int, width: int, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(hidden, width, bias=False))
        setattr(self, names[1], nn.Linear(hidden, width, bias=False))
        setattr(self, names[2], nn.Linear(width, hidden, bias=False))
        self.act_fn = ACT2FN["silu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class PlainExpert(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, width), nn.Linear(width, hidden)
        self.act = ACT2FN["gelu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixtralStyleBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.num_experts = config.num_experts_per_tok, config.num_local_experts
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        width = config.moe_intermediate_size
        self.experts = nn.ModuleList(
            GatedExpert(config.hidden_size, width, ("w1", "w3", "w2")) for _ in range(self.num_experts)
        )

    def forward(self, hidden_states: torch.Tensor):
        batch, length, hidden = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden)
        router_logits = self.gate(hidden_states)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, N]
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            if token.shape[0] == 0:
                continue
            current = hidden_states[None, token].reshape(-1, hidden)
            out = self.experts[e](current) * weights[token, slot, None]
            final.index_add_(0, token, out.to(hidden_states.dtype))
        return final.reshape(batch, length, hidden), router_logits


class FirstOutput(nn.Module):
    """Mixtral's decoder layer unpacked (hidden, router_logits); a Llama layer wants the hidden states only."""

    def __init__(self, config):
        super().__init__()
        self.block_sparse_moe = MixtralStyleBlock(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.block_sparse_moe(hidden_states)[0]


class Qwen2MoeStyleBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k, self.num_experts = config.num_experts_per_tok, config.num_local_experts
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedExpert(config.hidden_size, config.moe_intermediate_size) for _ in range(self.num_experts)
        )
        self.shared_expert = GatedExpert(config.hidden_size, 2 * config.moe_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden)
        weights = F.softmax(self.gate(hidden_states), dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            out = self.experts[e](hidden_states[None, token].reshape(-1, hidden)) * weights[token, slot, None]
            final.index_add_(0, token, out.to(hidden_states.dtype))
        shared = F.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return (final + shared).reshape(batch, length, hidden)


class MoEGate(nn.Module):
    """DeepSeek's gate: the router weight is a parameter of the gate module itself."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.scaling = config.num_experts_per_tok, 1.5
        self.weight = nn.Parameter(torch.randn(config.num_local_experts, config.hidden_size) * 0.3)

    def forward(self, hidden_states: torch.Tensor):
        scores = F.linear(hidden_states.view(-1, hidden_states.shape[-1]).float(), self.weight.float()).softmax(-1)
        weight, index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return index, weight * self.scaling


class DeepseekStyleBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.experts = nn.ModuleList(
            GatedExpert(config.hidden_size, config.moe_intermediate_size) for _ in range(self.num_experts)
        )
        self.gate = MoEGate(config)
        self.shared_experts = GatedExpert(config.hidden_size, config.moe_intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity, shape = hidden_states, hidden_states.shape
        index, weight = self.gate(hidden_states)
        x = hidden_states.view(-1, shape[-1])
        counts = torch.bincount(index.view(-1), minlength=self.num_experts).tolist()
        order = index.view(-1).argsort()
        sorted_tokens = x[order // index.shape[1]]
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts[e](sorted_tokens[start : start + n]))
            start += n
        gathered = torch.cat(outs)
        placed = torch.empty_like(gathered)
        placed[order] = gathered
        y = (placed.view(*index.shape, -1).float() * weight.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        return y.view(*shape) + self.shared_experts(identity)


class SwitchStyleBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = nn.Linear(config.hidden_size, config.num_local_experts)
        self.experts = nn.ModuleList(
            PlainExpert(config.hidden_size, config.moe_intermediate_size) for _ in range(config.num_local_experts)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probs = self.router(hidden_states).softmax(-1)
        prob, choice = probs.max(dim=-1)  # [B, T]
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            chosen = choice == e
            if chosen.any():
                out[chosen] = expert(hidden_states[chosen]) * prob[chosen][:, None]
        return out


BLOCKS = {
    "list_mixtral": FirstOutput,
    "list_qwen2_moe": Qwen2MoeStyleBlock,
    "list_deepseek": DeepseekStyleBlock,
    "list_switch": SwitchStyleBlock,
}
FIRST_DENSE = {"list_qwen2_moe": 1}


class _ListMoeMixin:
    def _use_expert_lists(self, config) -> None:
        for i, layer in enumerate(self.model.layers):
            if i >= FIRST_DENSE.get(config.moe_style, 0):
                layer.mlp = BLOCKS[config.moe_style](config)


def _classes(style: str) -> tuple[type, type]:
    config_class = type(f"{style}_config", (LlamaConfig,), {"model_type": style})

    def __init__(self, config):
        LlamaForCausalLM.__init__(self, config)
        self._use_expert_lists(config)
        self.post_init()

    model_class = type(f"{style}_model", (_ListMoeMixin, LlamaForCausalLM), {"__init__": __init__})
    model_class.config_class = config_class
    return config_class, model_class


CLASSES = {style: _classes(style) for style in STYLES}
globals().update({cls.__name__: cls for pair in CLASSES.values() for cls in pair})  # what a config's auto_map names
if not __name__.startswith("transformers_modules"):  # as a checkpoint's remote code, transformers resolves auto_map
    for _style, (_config, _model) in CLASSES.items():
        AutoConfig.register(_style, _config, exist_ok=True)
        AutoModelForCausalLM.register(_config, _model, exist_ok=True)


def tiny_list_moe(
    style: str, seed: int = 0, *, hidden: int = 64, layers: int = 2, experts: int = 4, width: int = 48, vocab: int = 256
) -> nn.Module:
    """A random model of one list-of-experts style; the defaults (2 layers, hidden 64, 4 experts of 48 neurons)
    are the tiny test size, benchmarks/families.py asks for a larger one."""
    config_class, model_class = CLASSES[style]
    config = config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16),
        num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    config.moe_style, config.num_local_experts, config.moe_intermediate_size = style, experts, width
    config.num_experts_per_tok = 1 if style == "list_switch" else 2
    torch.manual_seed(seed)
    return model_class(config).eval()
