"""Entropy neurons (paper 3 §B.5, after Stolfo, Wu et al. 2024, "Confidence regulation neurons").

Candidates are the last layer's MLP neurons. For neuron i with output vector w_i (column i of down_proj):
    norm_i    = ||w_i||
    LogitVar_i = Var_v cos(w_i, W_U[v])          over the vocabulary v,
with W_U the unembedding after folding the final norm's gain into it and centring it across the vocabulary (the
TransformerLens processing the paper's code uses). Entropy neurons have a large norm but a small LogitVar: they
write into the unembedding's effective null space and act through the final norm's scale. Selection: neurons
above the 75th percentile of norm, then the 10 with the smallest LogitVar; base vs post compared by IoU.

The causal check (`entropy_effect`) mean-ablates one neuron at a time — its activation replaced by its mean over
the texts — and reports the change of the next-token entropy, every neuron in one batched pass per text batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel


@torch.no_grad()
def final_norm_gain(loaded: LoadedModel) -> torch.Tensor:
    """The per-dimension gain g of the final norm ([H]), measured on the module itself, whatever the family stores
    (Gemma's RMSNorm scales by 1 + weight). For a zero-mean probe x an RMSNorm or LayerNorm returns
    g ⊙ x / rms(x) + b, so g = (norm(x) - norm(-x)) · rms(x) / 2x where x ≠ 0; two probes (+1, -1, ... with the
    last or the first entry 0 when H is odd) cover every coordinate. A uniform factor (the norm's eps) cancels in
    the cosines below."""
    norm = loaded.layout.final_norm
    param = next(norm.parameters())
    hidden = loaded.layout.hidden_size
    gain = torch.zeros(hidden, device=param.device)
    usable = hidden - (hidden % 2)
    for shift in (0, 1) if hidden % 2 else (0,):
        x = torch.zeros(hidden, device=param.device)
        x[shift : shift + usable] = torch.tensor([1.0, -1.0], device=param.device).repeat(usable // 2)
        probe = x.to(param.dtype)[None, None]  # [1, 1, H]
        odd = (norm(probe).float() - norm(-probe).float())[0, 0] / 2  # g ⊙ x / rms(x)
        nonzero = x != 0
        gain[nonzero] = odd[nonzero] * x.pow(2).mean().sqrt() / x[nonzero]
    return gain


def effective_unembedding(loaded: LoadedModel) -> torch.Tensor:
    """W_U [V, H] with the final norm gain folded in and centred across the vocabulary."""
    w_u = loaded.layout.lm_head.weight.detach().float() * final_norm_gain(loaded)[None, :]  # [V, H]
    return w_u - w_u.mean(dim=0, keepdim=True)


@dataclass
class EntropyNeurons:
    norm: np.ndarray  # [I]
    logit_var: np.ndarray  # [I]
    selected: np.ndarray  # neuron indices, smallest LogitVar first
    layer: int


def last_mlp_layer(layout) -> int:
    """The last layer that has an MLP (the last layer, but for a hybrid that ends in a Mamba or attention layer)."""
    layers = layout.mlp_layers
    if not layers:
        raise EngramError(f"{layout.family} has no MLP in any layer: there are no entropy neurons to look for.")
    return layers[-1]


def entropy_neurons(loaded: LoadedModel, percentile: float = 75.0, n: int = 10, chunk: int = 1024) -> EntropyNeurons:
    """Norm and LogitVar of every neuron of the last MLP layer, and the selected entropy neurons."""
    layout = loaded.layout
    layer = last_mlp_layer(layout)
    w_out = layout.neuron_vectors(layer, "down").detach().float()  # [I, H]: row i = neuron i's output
    w_u = effective_unembedding(loaded)  # [V, H]
    w_u_unit = w_u / w_u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    norms = w_out.norm(dim=1)  # [I]
    logit_var = torch.empty_like(norms)
    for start in range(0, w_out.shape[0], chunk):
        rows = w_out[start : start + chunk]
        cos = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ w_u_unit.T  # [chunk, V]
        logit_var[start : start + chunk] = cos.var(dim=1, unbiased=False)
    norm_np, var_np = norms.cpu().numpy(), logit_var.cpu().numpy()
    candidates = np.flatnonzero(norm_np > np.percentile(norm_np, percentile))
    selected = candidates[np.argsort(var_np[candidates], kind="stable")[:n]]
    return EntropyNeurons(norm=norm_np, logit_var=var_np, selected=selected, layer=layer)


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    a, b = set(map(int, a)), set(map(int, b))
    return len(a & b) / len(a | b) if a | b else float("nan")


@torch.inference_mode()
def entropy_effect(loaded: LoadedModel, neurons: Sequence[int], texts: Sequence[str], batch_size: int = 8) -> dict:
    """Mean next-token entropy (nats, over non-pad positions) plain and with each neuron mean-ablated."""
    tokenizer = loaded.require_tokenizer()
    layer = last_mlp_layer(loaded.layout)
    neurons = [int(i) for i in neurons]
    engine = loaded.hooks
    batches = [
        tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True).to(loaded.device)
        for i in range(0, len(texts), batch_size)
    ]
    total = None
    count = 0.0
    for batch in batches:  # the mean activation of every neuron over all real tokens
        with engine.record("mlp.act", layer, positions="nonpad", reduce="sum") as rec:
            loaded.model(**batch)
        part = rec["mlp.act", layer].sum(0)
        total = part if total is None else total + part
        count += float(rec.counts(("mlp.act", layer)).sum())
    mean_act = total / count  # [I]

    width = loaded.layout.site_width("mlp.act", layer)
    plain, ablated = [], np.zeros(len(neurons))
    n_tokens = 0.0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        logits = loaded.model(**batch).logits
        plain.append(float(_entropy(logits)[mask].sum()))
        n_tokens += float(mask.sum())
        rows = len(neurons) * mask.shape[0]
        edit = torch.zeros(rows, width, dtype=torch.bool)
        for j, neuron in enumerate(neurons):
            edit[j * mask.shape[0] : (j + 1) * mask.shape[0], neuron] = True
        values = mean_act.to(loaded.dtype)[None, :].expand(rows, -1)
        repeated = {k: v.repeat(len(neurons), 1) for k, v in batch.items()}
        with engine.edit_neurons({("mlp.act", layer): edit}, "clamp", values):
            ent = _entropy(loaded.model(**repeated).logits)  # [J * B, T]
        ent = ent.reshape(len(neurons), mask.shape[0], -1)
        ablated += np.array([float(ent[j][mask].sum()) for j in range(len(neurons))])
    base = sum(plain) / n_tokens
    return {
        "entropy": base,
        "entropy_ablated": (ablated / n_tokens).tolist(),
        "delta": (ablated / n_tokens - base).tolist(),
        "neurons": neurons,
    }


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)  # [B, T]
