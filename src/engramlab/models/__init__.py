"""Model loading, the architecture table and the hook engine shared by every LLM study."""

from engramlab.models.arch import ARCHITECTURES, SITES, ArchSpec, ModelLayout, arch_for_config
from engramlab.models.hooks import HookContext, HookEngine, Recording, StopForward
from engramlab.models.loading import LoadedModel, from_hf, load_model, parse_device, parse_dtype

__all__ = [
    "ARCHITECTURES",
    "SITES",
    "ArchSpec",
    "HookContext",
    "HookEngine",
    "LoadedModel",
    "ModelLayout",
    "Recording",
    "StopForward",
    "arch_for_config",
    "from_hf",
    "load_model",
    "parse_device",
    "parse_dtype",
]
