"""Loading HF causal LMs safely: local directories, the project's organisms, and (only when asked) the Hub.

`load_model(ref)` follows transformers' from-pretrained flow but checks everything a user can get wrong first and
turns it into one sentence: a missing path, a folder without `config.json` or weights, a checkpoint that cannot be
loaded safely, or a model whose layout `engramlab.models.layout.discover` cannot resolve. Weights come from
safetensors; a pickle-only `pytorch_model.bin` is read with `torch.load(weights_only=True)` semantics (refused if it
holds arbitrary objects). `trust_remote_code` stays off unless the caller passes it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from engramlab.distributed import is_running, local_device
from engramlab.errors import EngramError, first_line
from engramlab.models.arch import ArchSpec
from engramlab.models.hooks import HookEngine
from engramlab.models.layout import ModelLayout, discover
from engramlab.organisms.registry import is_organism_ref, organism_path
from engramlab.readers import load_failure, read_json

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer, discovered layout and hook engine."""

    model: nn.Module
    tokenizer: object | None
    spec: ArchSpec
    ref: str
    path: Path | None
    device: torch.device
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @cached_property
    def layout(self) -> ModelLayout:
        return ModelLayout(self.model, self.spec)

    @cached_property
    def hooks(self) -> HookEngine:
        """The hook engine bound to this model (one per model)."""
        return HookEngine(self.model, layout=self.layout)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise EngramError(
                f"{self.ref} has no tokenizer files (tokenizer.json / tokenizer_config.json); this study needs one."
            )
        return self.tokenizer


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto" -> float32 on CPU (bf16 matmuls are slow there), bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise EngramError(f"--dtype {dtype!r} is not supported; choose one of: auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """`auto` -> the first CUDA device if there is one (several GPUs are then spread by accelerate), else CPU; a
    torchrun rank on a GPU machine gets its own GPU, `cuda:LOCAL_RANK` (data parallel: one model copy per rank)."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return local_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise EngramError(f"--device {device!r} is not a device name (examples: auto, cpu, cuda, cuda:1).") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EngramError(f"--device {device} was asked for but this machine has no CUDA GPU; use --device cpu.")
    return parsed


def check_device_and_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None) -> None:
    """--device and --dtype checked before anything is loaded (`load_model` parses them again)."""
    parse_dtype(dtype, parse_device(device))


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence transformers' "Loading weights" bar and its warnings while loading (they would clutter every study's
    output and precede one-line errors on stderr); restore the previous settings afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_ref(ref: str, allow_download: bool = False, option: str = "--model") -> tuple[str, Path | None]:
    """Map a model reference to (what to pass to from_pretrained, local directory or None for a Hub id); errors
    name `option`, the flag the user gave the reference with."""
    ref = str(ref)
    if not ref.strip():
        raise EngramError(f"{option} is empty; give a local HF model directory, organism:NAME or a Hub id.")
    if is_organism_ref(ref):
        path = organism_path(ref)
        return str(path), path
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path), path
    if path.exists():
        raise EngramError(f"{option} {ref} is a file; give the model's directory (with config.json and weights).")
    if ref.startswith((".", "/", "~")) or not _hub_like(ref):
        raise EngramError(f"{option} {ref}: no such directory; give a local HF model directory or organism:NAME.")
    cached = _hub_cache_dir(ref)
    if cached is not None:
        return str(cached), cached
    if not allow_download:
        raise EngramError(
            f"{option} {ref} is not a local directory nor in the local HF cache; pass --download to fetch it "
            f"from the Hub, or give a local path."
        )
    unreachable = _hub_unreachable()
    if unreachable:
        raise EngramError(f"{option} {ref}: --download cannot reach the Hugging Face Hub ({unreachable}).")
    return ref, None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached right now (offline mode, no route, no DNS), or None. A plain connection
    attempt with a short timeout, so that an offline `--download` fails in seconds instead of after the download
    client's retries."""
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"
    return None


def _hub_like(ref: str) -> bool:
    """`name` or `owner/name` made of the characters the Hub allows."""
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", ref) is not None


def _hub_cache_dir(repo_id: str) -> Path | None:
    """The snapshot directory of a Hub model already in the local cache (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except Exception:  # not cached (or the cache is unreadable): the caller decides what to say
        return None


def _check_config(path: Path, trust_remote_code: bool) -> None:
    """config.json exists, parses, and names an architecture transformers has (or, with `trust_remote_code`,
    brings its own code)."""
    from transformers import CONFIG_MAPPING

    config_path = path / "config.json"
    if not config_path.is_file():
        raise EngramError(f"{path} has no config.json; it is not a HF model directory.")
    config = read_json(config_path, "give a HF model directory with a valid config.json")
    if not isinstance(config, dict):
        raise EngramError(f"{config_path}: expected a JSON object, found {type(config).__name__}.")
    if "auto_map" in config and not trust_remote_code:
        raise EngramError(
            f"{config_path}: this model needs its own Python code (auto_map); engramlab never runs a checkpoint's "
            "code unless you pass --trust-remote-code."
        )
    model_type = config.get("model_type")
    if "auto_map" not in config and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING):
        raise EngramError(
            f"{config_path}: model_type {model_type!r} is not an architecture transformers knows; give a HF causal "
            "LM directory."
        )


def _check_weights(path: Path) -> None:
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise EngramError(
            f"{path} has no weights (expected model.safetensors, a sharded safetensors index, or pytorch_model.bin)."
        )


def load_model(
    ref: str,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    with_tokenizer: bool = True,
    option: str = "--model",
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM from a local HF directory, `organism:NAME`, or a Hub id (cache first; download only with
    `allow_download=True`). Returns a `LoadedModel` in eval mode with its tokenizer (left padding, a pad token).
    Errors name `option`, the flag the reference came with (`--model`, `--base`, `--a`, ...).

    A model larger than one device: with `device="auto"`, several GPUs, or `max_memory` / `offload_folder`, the
    layers are placed by accelerate's `device_map="auto"` (transformers' from_pretrained: GPUs first, then CPU RAM,
    then `offload_folder` on disk, each device capped by `max_memory`, e.g. `{0: "20GiB", "cpu": "64GiB"}`).
    Offloaded layers run on the main device, their weights brought in by accelerate's hooks for each forward; the
    hook engine's recordings, edits and patches see the same activations. Weight readers (the decode atlas) bring
    offloaded weights in layer by layer with `onloaded`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_device_and_dtype(device, dtype)
    source, path = resolve_ref(ref, allow_download, option)
    if path is not None:
        _check_config(path, trust_remote_code)
    try:
        with _quiet_hf():
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # any failure inside transformers' config parsing: one sentence naming the file
        where = path / "config.json" if path is not None else ref
        raise EngramError(f"cannot read the model config {where}: {first_line(err)}.") from err
    if path is not None:
        _check_weights(path)

    target = parse_device(device)
    torch_dtype = parse_dtype(dtype, target)
    offload = max_memory is not None or offload_folder is not None
    if offload and (device not in (None, "auto") or is_running()):
        raise EngramError(
            "--max-memory / --offload-folder place one model over several devices: use them with --device auto "
            "and without torchrun (each torchrun rank holds a whole copy of the model)."
        )
    multi_gpu = (
        target.type == "cuda" and device in (None, "auto") and torch.cuda.device_count() > 1 and not is_running()
    )
    dispatch = {"device_map": "auto", "max_memory": max_memory, "offload_folder": offload_folder}
    try:
        with _quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
                weights_only=True,
                **(dispatch if multi_gpu or offload else {}),
            )
    except Exception as err:  # any failure inside transformers/torch becomes one sentence naming the checkpoint
        where = path if path is not None else ref
        hint = " (it needs --offload-folder to spill onto disk)" if "offload_folder" in str(err) else ""
        raise EngramError(f"cannot load the weights in {where} safely: {load_failure(err)}{hint}.") from err
    if multi_gpu or offload:
        target = input_device(model)
    else:
        model.to(target)
    model.eval()
    spec = discover(model)
    tokenizer = _load_tokenizer(source, path, trust_remote_code) if with_tokenizer else None
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=spec, ref=str(ref), path=path, device=target, dtype=torch_dtype
    )


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """`--max-memory` "0=20GiB,1=20GiB,cpu=64GiB" -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"} (None for "")."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for item in text.split(","):
        name, sep, size = (x.strip() for x in item.partition("="))
        if not sep or not name or not size or not (name.isdigit() or name in ("cpu", "mps")):
            raise EngramError(
                f"--max-memory {text!r}: give DEVICE=SIZE pairs separated by commas, DEVICE a GPU index or cpu, "
                "e.g. 0=20GiB,cpu=64GiB."
            )
        out[int(name) if name.isdigit() else name] = size
    return out


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go for a model dispatched by accelerate: the device its input embedding runs on (the main
    GPU when the embedding itself is offloaded)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
    return embed.weight.device


def is_offloaded(model: nn.Module) -> bool:
    """Whether some weights live on disk or CPU behind accelerate's hooks (seen as meta tensors in the model)."""
    return any(p.device.type == "meta" for p in model.parameters())


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Bring an offloaded module's weights onto its execution device for the block (accelerate's
    `align_module_device`, applied to the module and each submodule that holds weights); a no-op otherwise."""
    from contextlib import ExitStack

    from accelerate.utils import align_module_device, has_offloaded_params

    with ExitStack() as stack:
        for sub in module.modules():
            if has_offloaded_params(sub):
                stack.enter_context(align_module_device(sub))
        yield


def from_hf(model: nn.Module, tokenizer=None, ref: str = "in-memory") -> LoadedModel:
    """Wrap a model the caller built or loaded themselves (e.g. a tiny random model in a test)."""
    spec = discover(model)
    param = next(model.parameters())
    return LoadedModel(
        model=model, tokenizer=tokenizer, spec=spec, ref=ref, path=None, device=param.device, dtype=param.dtype
    )


def _load_tokenizer(source: str, path: Path | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if path is not None and not any(
        (path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        return None
    try:
        with _quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # a broken tokenizer file: say which folder
        raise EngramError(f"cannot load the tokenizer in {path or source}: {first_line(err)}.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # so that position -1 is every row's last real token, also for generate
    return tokenizer


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
