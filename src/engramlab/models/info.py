"""`engramlab models info`: what a checkpoint is, in numbers a study needs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from engramlab.models.arch import SITES
from engramlab.models.loading import LoadedModel


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    """Architecture, layer count, units per site (per layer and in all layers), dtype, parameter counts."""
    layout = loaded.layout
    config = loaded.model.config.get_text_config()
    sites = [s for s in SITES if s != "mlp.gate" or layout.spec.gated]
    per_layer = {site: layout.site_width(site) for site in sites}
    return {
        "ref": loaded.ref,
        "path": str(loaded.path) if loaded.path else None,
        "family": layout.spec.family,
        "class": type(loaded.model).__name__,
        "n_layers": layout.n_layers,
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "gated_mlp": layout.spec.gated,
        "units_per_layer": per_layer,
        "units_total": {site: width * layout.n_layers for site, width in per_layer.items()},
        "mlp_neurons_total": per_layer["mlp.act"] * layout.n_layers,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "parameters_by_part": parameter_breakdown(loaded),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def parameter_breakdown(loaded: LoadedModel) -> dict[str, int]:
    """Parameters per part (embedding, attention, mlp, norms, lm_head); tied weights counted once."""
    spec = loaded.layout.spec
    mlp_prefixes = {spec.up.rsplit(".", 1)[0]}
    attn_prefix = spec.attn_out.rsplit(".", 1)[0]
    counts: Counter[str] = Counter()
    for name, param in loaded.model.named_parameters():  # named_parameters skips tied duplicates
        if name.startswith(spec.embed):
            part = "embedding"
        elif name.startswith(spec.lm_head):
            part = "lm_head"
        elif name.startswith(spec.layers + "."):
            rel = name[len(spec.layers) + 1 :].split(".", 1)[1]
            if any(rel.startswith(p + ".") for p in mlp_prefixes):
                part = "mlp"
            elif rel.startswith(attn_prefix + "."):
                part = "attention"
            else:
                part = "norms"
        elif name.startswith(spec.final_norm):
            part = "norms"
        else:
            part = "other"
        counts[part] += param.numel()
    return dict(counts)
