"""Model loading, layout discovery and the hook engine shared by every LLM study."""

from engramlab.models.arch import SITES, ArchSpec, DenseMlp, ExpertsMlp, LayerSpec
from engramlab.models.hooks import HookContext, HookEngine, Recording, StopForward
from engramlab.models.layout import ModelLayout, discover
from engramlab.models.loading import LoadedModel, from_hf, load_model, parse_device, parse_dtype

__all__ = [
    "SITES",
    "ArchSpec",
    "DenseMlp",
    "ExpertsMlp",
    "HookContext",
    "HookEngine",
    "LayerSpec",
    "LoadedModel",
    "ModelLayout",
    "Recording",
    "StopForward",
    "discover",
    "from_hf",
    "load_model",
    "parse_device",
    "parse_dtype",
]
