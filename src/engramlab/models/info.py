"""`engramlab models info`: what a checkpoint is, in numbers a study needs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from engramlab.models.arch import ROUTER_SITES, SITES, DenseMlp, ExpertsMlp
from engramlab.models.loading import LoadedModel


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    """Architecture, layer count, MLP kind, units per site (per layer and in all layers), experts, dtype and
    parameter counts. A site whose width differs between layers (dense and MoE layers mixed) lists one width per
    layer."""
    layout = loaded.layout
    spec = layout.spec
    config = loaded.model.config.get_text_config()
    n_layers = layout.n_layers
    widths = {
        site: [layout.site_width(site, i) if layout.has_site(site, i) else 0 for i in range(n_layers)]
        for site in SITES
        if site not in ROUTER_SITES
    }
    widths = {site: w for site, w in widths.items() if any(w)}
    per_layer = {site: w[0] if len(set(w)) == 1 else w for site, w in widths.items()}
    return {
        "ref": loaded.ref,
        "path": str(loaded.path) if loaded.path else None,
        "family": spec.family,
        "class": type(loaded.model).__name__,
        "n_layers": n_layers,
        "hidden_size": layout.hidden_size,
        "vocab_size": int(getattr(config, "vocab_size", layout.lm_head.weight.shape[0])),
        "mlp_kind": ", ".join(spec.mlp_kinds),
        "gated_mlp": spec.gated,
        "experts": experts_info(loaded),
        "units_per_layer": per_layer,
        "units_total": {site: sum(w) for site, w in widths.items()},
        "mlp_neurons_total": sum(widths["mlp.act"]),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "parameters_by_part": parameter_breakdown(loaded),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def experts_info(loaded: LoadedModel) -> dict[str, Any] | None:
    """MoE layers, experts per layer, neurons per expert and shared-expert neurons; None for a dense model."""
    layout = loaded.layout
    moe = [(i, spec.mlp) for i, spec in enumerate(layout.spec.layer_specs) if isinstance(spec.mlp, ExpertsMlp)]
    if not moe:
        return None
    first = moe[0][1]
    return {
        "moe_layers": [i for i, _ in moe],
        "experts": first.n_experts,
        "neurons_per_expert": first.width,
        "shared_neurons": first.shared.width if first.shared is not None else 0,
        "routing": first.routing,
        "stored_as": "list of modules" if first.listed is not None else "batched tensors",
    }


def parameter_breakdown(loaded: LoadedModel) -> dict[str, int]:
    """Parameters per part (embedding, attention, mlp, norms, lm_head); tied weights counted once."""
    spec = loaded.layout.spec
    counts: Counter[str] = Counter()
    for name, param in loaded.model.named_parameters():  # named_parameters skips tied duplicates
        if name.startswith(spec.embed + "."):
            part = "embedding"
        elif name.startswith(spec.lm_head + "."):
            part = "lm_head"
        elif name.startswith(spec.layers + "."):
            index, rel = name[len(spec.layers) + 1 :].split(".", 1)
            part = _layer_part(spec.layer_specs[int(index)], rel)
        elif spec.final_norm is not None and name.startswith(spec.final_norm + "."):
            part = "norms"
        else:
            part = "other"
        counts[part] += param.numel()
    return dict(counts)


def _layer_part(layer_spec, rel: str) -> str:
    mlp = layer_spec.mlp
    if mlp is None:  # a hybrid model's layer without an MLP: its recurrent mixer counts as "other"
        return _attention_or_other(layer_spec, rel)
    mlp_prefix = mlp.block if isinstance(mlp, ExpertsMlp) else _parent(mlp)
    if mlp_prefix is not None and (rel.startswith(mlp_prefix + ".") or _in_dense(mlp, rel)):
        return "mlp"
    return _attention_or_other(layer_spec, rel)


def _attention_or_other(layer_spec, rel: str) -> str:
    attn_out = layer_spec.attn_out
    if attn_out is not None and "." in attn_out and rel.startswith(attn_out.split(".")[0] + "."):
        return "attention"
    return "norms" if "norm" in rel.lower() or "ln" in rel.split(".")[0] else "other"


def _parent(mlp: DenseMlp) -> str | None:
    return mlp.down.path.rsplit(".", 1)[0] if "." in mlp.down.path else None


def _in_dense(mlp, rel: str) -> bool:
    if not isinstance(mlp, DenseMlp):
        return False
    paths = [p.path for p in (mlp.gate, mlp.up, mlp.down) if p is not None]
    return any(rel.startswith(p + ".") for p in paths)
