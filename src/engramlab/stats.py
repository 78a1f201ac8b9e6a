"""Streaming statistics: mergeable running mean / variance / count, checkpoints, and torchrun reduction.

A statistics pass over a large corpus (per-neuron activation means and variances, for example) reads one batch
at a time and keeps only O(features) state: the row count `n`, the mean and `M2`, the sum of squared
deviations from the mean. Everything is accumulated in float64 on the device the data lives on.

Each batch is summarised in two passes (its mean, then squared deviations from it), then folded into the running state
with the parallel-variance merge of Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for
computing sample variances" (also Chan, Golub & LeVeque 1983, eq. 2.1b). For partial states A and B:

    delta = mean_B - mean_A
    n     = n_A + n_B
    mean  = mean_A + delta * (n_B / n)
    M2    = M2_A + M2_B + delta^2 * (n_A * n_B / n)

The same formula merges shards (`RunningMoments.merge`) and torchrun ranks (`RunningMoments.all_reduce_`).
baukit's `Variance` gets the between-batch term wrong (shared/papers/interp_library_lessons.md, section 4); the
tests here check against a one-shot numpy float64 reference, including batches with very different means.

The design follows torchmetrics: the state is declared up front (`RunningMoments.STATE`), the arithmetic lives in
pure functions (`batch_moments`, `merge_moments`), and the class only holds state. Files are safetensors (no
pickle), written atomically; `save_checkpoint` / `load_checkpoint` hold several named statistics plus the number
of batches already consumed, so an interrupted pass resumes and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engramlab.errors import EngramError
from engramlab.results import atomic_path

__all__ = [
    "Checkpoint",
    "Moments",
    "RunningMoments",
    "batch_moments",
    "load_checkpoint",
    "merge_moments",
    "save_checkpoint",
]

FORMAT_VERSION = 1  # bump when the file layout changes; readers refuse newer versions
_MOMENTS_FORMAT = "engramlab.stats.RunningMoments"
_CHECKPOINT_FORMAT = "engramlab.stats.checkpoint"


# --------------------------------------------------------------------------------------------------------------
# Pure arithmetic
# --------------------------------------------------------------------------------------------------------------


class Moments(NamedTuple):
    """A partial state: row count, mean and M2 (sum of squared deviations), all float64 on one device."""

    count: torch.Tensor  # () float64
    mean: torch.Tensor  # [*shape] float64
    m2: torch.Tensor  # [*shape] float64


def batch_moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> Moments:
    """Two-pass float64 moments of the rows of `x` [N, *shape]; with `mask` [N], only the rows where it is set.

    Masked-out rows may hold anything, NaN included: they are replaced by zeros, never multiplied. An empty
    selection gives count 0, mean 0, M2 0 (no device sync, no NaN). Inputs are not validated here; see
    `RunningMoments.update`.
    """
    x = x.detach().to(torch.float64)  # [N, *shape], stays on x's device
    if mask is None:
        count = torch.full((), float(x.shape[0]), dtype=torch.float64, device=x.device)  # ()
        mean = x.sum(dim=0) / max(x.shape[0], 1)  # [*shape]
        m2 = (x - mean).square().sum(dim=0)  # [*shape]
        return Moments(count, mean, m2)
    keep = (mask.detach() != 0).reshape(-1, *([1] * (x.dim() - 1)))  # [N, 1, ..., 1] bool
    x = torch.where(keep, x, 0.0)  # [N, *shape]
    count = keep.sum(dtype=torch.float64)  # ()
    mean = x.sum(dim=0) / count.clamp_min(1.0)  # [*shape]
    m2 = torch.where(keep, x - mean, 0.0).square().sum(dim=0)  # [*shape]
    return Moments(count, mean, m2)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan, Golub & LeVeque (1979) parallel merge of two partial states (see the module docstring).

    Either side may be empty (count 0): the result is then the other side, bit for bit, as long as an empty
    state holds mean 0 and M2 0 (what `batch_moments` and `RunningMoments.reset` produce). No device sync.
    """
    n = a.count + b.count  # ()
    safe_n = n.clamp_min(1.0)  # both empty: every weight below is 0
    delta = b.mean - a.mean  # [*shape]
    mean = a.mean + delta * (b.count / safe_n)  # [*shape]; n_B/n == 1 exactly when A is empty
    m2 = a.m2 + b.m2 + delta.square() * (a.count * b.count / safe_n)  # [*shape]
    return Moments(n, mean, m2)


# --------------------------------------------------------------------------------------------------------------
# The stateful object
# --------------------------------------------------------------------------------------------------------------


def _as_shape(shape: int | tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    if isinstance(shape, bool):
        raise EngramError(f"shape must be an int or a tuple of ints, got {shape!r}.")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise EngramError(f"shape must be an int or a tuple of ints, got {shape!r}.") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise EngramError(f"shape must hold non-negative ints, got {shape!r}.")
    return dims


class RunningMoments:
    """Streaming float64 count, mean and variance of rows of shape `shape`, mergeable across shards and ranks.

    Args:
        shape: the shape of one row, e.g. `4096` or `(n_layers, d_mlp)`; `update` takes `[N, *shape]`.
        device: where the state lives (default CPU); batches passed to `update` must be on this device.

    State (float64, O(features)): `count` (), `mean` [*shape], `m2` [*shape] (sum of squared deviations).

    Example:
        >>> stats = RunningMoments(3)
        >>> stats.update(torch.randn(10, 3))
        >>> stats.mean.shape, stats.variance().shape
        (torch.Size([3]), torch.Size([3]))
    """

    STATE = ("count", "mean", "m2")  # declared accumulators; each reduces across shards with `merge_moments`

    def __init__(self, shape: int | tuple[int, ...] | torch.Size, device: torch.device | str | None = None) -> None:
        self._shape = _as_shape(shape)
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self.reset()

    # -- state -------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every row seen so far (count 0, mean 0, M2 0)."""
        self._count = torch.zeros((), dtype=torch.float64, device=self._device)  # ()
        self._mean = torch.zeros(self._shape, dtype=torch.float64, device=self._device)  # [*shape]
        self._m2 = torch.zeros(self._shape, dtype=torch.float64, device=self._device)  # [*shape]
        self._device = self._mean.device  # "cuda" -> "cuda:0", so device checks compare like with like

    def _moments(self) -> Moments:
        return Moments(self._count, self._mean, self._m2)

    def _set(self, m: Moments) -> None:
        self._count, self._mean, self._m2 = m.count, m.mean, m.m2

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one row."""
        return self._shape

    @property
    def device(self) -> torch.device:
        """Where the state lives."""
        return self._device

    def to(self, device: torch.device | str) -> RunningMoments:
        """Move the state to `device` (in place) and return self."""
        self._device = torch.device(device)
        self._set(Moments(*(t.to(self._device) for t in self._moments())))
        self._device = self._mean.device
        return self

    def __repr__(self) -> str:
        return f"RunningMoments(shape={self._shape}, device={str(self._device)!r})"

    # -- accumulate --------------------------------------------------------------------------------------------

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of `x` [N, *shape] (any real dtype, upcast to float64 on its device).

        `mask` [N] (bool or 0/1) keeps only the rows where it is nonzero, e.g. the attention mask flattened over
        batch and sequence to drop padding tokens.
        """
        if not isinstance(x, torch.Tensor):
            raise EngramError(f"x must be a torch.Tensor of shape [N, *{self._shape}], got {type(x).__name__}.")
        if x.is_complex() or x.dtype == torch.bool:
            raise EngramError(f"x must hold real numbers, got dtype {x.dtype}.")
        if x.dim() != len(self._shape) + 1 or tuple(x.shape[1:]) != self._shape:
            raise EngramError(
                f"x must have shape [N, *{self._shape}] = [N, {', '.join(map(str, self._shape))}], "
                f"got {tuple(x.shape)}."
            )
        if x.device != self._device:
            raise EngramError(
                f"x is on {x.device} but these statistics live on {self._device}; create "
                f"RunningMoments(..., device=x.device) or call .to(x.device) once before the pass."
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise EngramError(f"mask must be a torch.Tensor of shape [{x.shape[0]}], got {type(mask).__name__}.")
            if tuple(mask.shape) != (x.shape[0],):
                raise EngramError(
                    f"mask must have shape [N] = [{x.shape[0]}] to match x {tuple(x.shape)}, got {tuple(mask.shape)}."
                )
            if mask.device != x.device:
                raise EngramError(f"mask is on {mask.device} but x is on {x.device}; put both on one device.")
        self._set(merge_moments(self._moments(), batch_moments(x, mask)))

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold another shard's statistics into this one (in place, Chan et al. 1979) and return self."""
        if not isinstance(other, RunningMoments):
            raise EngramError(f"other must be a RunningMoments, got {type(other).__name__}.")
        if other.shape != self._shape:
            raise EngramError(f"other has row shape {other.shape} but these statistics have {self._shape}.")
        if other.device != self._device:
            raise EngramError(
                f"other lives on {other.device} but these statistics live on {self._device}; "
                f"call other.to({str(self._device)!r}) first."
            )
        self._set(merge_moments(self._moments(), other._moments()))
        return self

    def all_reduce_(self, group: dist.ProcessGroup | None = None) -> RunningMoments:
        """Combine the statistics of every rank in `group` so that every rank ends with the same state; return self.

        A collective: under `torchrun` every rank must call it, with the same `shape` and a state on a device
        the backend supports (CPU for gloo, CUDA for NCCL). Each rank's (count, mean, M2) is all-gathered and
        the partial states are merged in rank order, identically on every rank, so all ranks end bit-identical.
        The result equals a single process's pass over the same rows up to float64 rounding (relative
        differences around 1e-15), not bit for bit: merging per-rank states associates the sums differently
        than updating batch by batch. A no-op when torch.distributed is not initialised or the world size is 1.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        if world <= 1:
            return self
        packed = torch.cat([self._count.reshape(1), self._mean.reshape(-1), self._m2.reshape(-1)])  # [1 + 2F]
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        numel = self._mean.numel()

        def unpack(p: torch.Tensor) -> Moments:
            return Moments(p[0].clone(), p[1 : 1 + numel].reshape(self._shape), p[1 + numel :].reshape(self._shape))

        total = unpack(gathered[0])
        for p in gathered[1:]:
            total = merge_moments(total, unpack(p))
        self._set(total)
        return self

    # -- read out ----------------------------------------------------------------------------------------------

    @property
    def count(self) -> torch.Tensor:
        """Number of rows seen, a float64 scalar tensor (exact up to 2**53 rows)."""
        return self._count

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the rows seen, float64 [*shape] (zeros before any row)."""
        return self._mean

    @property
    def m2(self) -> torch.Tensor:
        """Sum of squared deviations from the mean, float64 [*shape]."""
        return self._m2

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        """Population variance M2/n, or the sample variance M2/(n-1) if `unbiased`; float64 [*shape].

        NaN where undefined (no rows; or one row with `unbiased`), like `torch.var`.
        """
        denom = self._count - 1.0 if unbiased else self._count
        return self._m2 / denom.clamp_min(0.0)  # 0/0 -> NaN

    def std(self, unbiased: bool = False) -> torch.Tensor:
        """Square root of `variance(unbiased)`; float64 [*shape]."""
        return self.variance(unbiased).sqrt()

    # -- save / load -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as plain float64 tensors (copies): `count` (), `mean` [*shape], `m2` [*shape]."""
        return {name: t.clone() for name, t in zip(self.STATE, self._moments(), strict=True)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with `state` (as from `state_dict`), moved to this object's device."""
        self._set(_checked_moments(state, self._shape, "state_dict", self._device))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to a safetensors file, atomically; returns the path."""
        meta = {"format": _MOMENTS_FORMAT, "class": type(self).__name__, "format_version": str(FORMAT_VERSION)}
        return _write(path, _cpu(self.state_dict()), meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> RunningMoments:
        """Read statistics written by `save`; the state goes to `device` (default CPU)."""
        tensors, meta = _read(path)
        _check_header(path, meta, _MOMENTS_FORMAT)
        if meta.get("class") != cls.__name__:
            raise EngramError(f"{path} holds class {meta.get('class')!r}, not {cls.__name__!r}.")
        if "mean" not in tensors:
            raise EngramError(f"{path} has no 'mean' tensor; expected keys {list(cls.STATE)}.")
        stats = cls(tuple(tensors["mean"].shape), device=device)
        stats._set(_checked_moments(tensors, stats.shape, str(path), stats.device))
        return stats


def _checked_moments(
    state: Mapping[str, torch.Tensor], shape: tuple[int, ...], where: str, device: torch.device
) -> Moments:
    """Validate a {count, mean, m2} mapping (keys, float64, shapes) and return it as Moments on `device`."""
    keys = set(state)
    if keys != set(RunningMoments.STATE):
        raise EngramError(f"{where} has keys {sorted(keys)}; expected exactly {sorted(RunningMoments.STATE)}.")
    expected = {"count": (), "mean": shape, "m2": shape}
    for name in RunningMoments.STATE:
        t = state[name]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float64:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise EngramError(f"{where}: '{name}' must be a float64 tensor, got {got}.")
        if tuple(t.shape) != expected[name]:
            raise EngramError(f"{where}: '{name}' has shape {tuple(t.shape)}, expected {expected[name]}.")
    return Moments(*(state[name].detach().to(device).clone() for name in RunningMoments.STATE))


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file; any failure names the file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except FileNotFoundError:
        raise EngramError(f"statistics file {path} does not exist.") from None
    except (OSError, SafetensorError) as err:
        raise EngramError(f"{path} is not a readable safetensors statistics file ({err}).") from err
    return tensors, meta


def _check_header(path: str | os.PathLike, meta: Mapping[str, str], fmt: str) -> None:
    if meta.get("format") != fmt:
        raise EngramError(
            f"{path} is not an engramlab {fmt.rsplit('.', 1)[-1]} file "
            f"(metadata format={meta.get('format')!r}, expected {fmt!r})."
        )
    version = meta.get("format_version", "")
    if not version.isdigit():
        raise EngramError(f"{path} has no valid format_version in its metadata (got {version!r}).")
    if int(version) > FORMAT_VERSION:
        raise EngramError(
            f"{path} has format_version {version}, newer than this engramlab reads "
            f"({FORMAT_VERSION}); upgrade engramlab."
        )


class Checkpoint(NamedTuple):
    """What `load_checkpoint` returns: named statistics, batches already consumed, and the caller's metadata."""

    stats: dict[str, RunningMoments]
    cursor: int
    meta: dict[str, str]


def save_checkpoint(
    path: str | os.PathLike,
    stats: Mapping[str, RunningMoments],
    cursor: int,
    extra_meta: Mapping[str, str] | None = None,
) -> Path:
    """Write several named statistics and `cursor` (batches already consumed) to one safetensors file, atomically.

    Resume by loading it, skipping the first `cursor` batches of the same deterministic stream and continuing:
    the final state is bit-identical to an uninterrupted pass. `extra_meta` (str -> str) is stored alongside,
    e.g. the model and dataset names, so a resume can check it is continuing the same pass.
    """
    if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
        raise EngramError(f"cursor must be a non-negative int (batches consumed), got {cursor!r}.")
    if not isinstance(stats, Mapping):
        raise EngramError(f"stats must be a dict of name -> RunningMoments, got {type(stats).__name__}.")
    extra = dict(extra_meta or {})
    bad = {k: v for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise EngramError(f"extra_meta must map str to str; these entries do not: {bad!r}.")
    tensors: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {}
    for name, s in stats.items():
        if not isinstance(name, str) or not name:
            raise EngramError(f"stats names must be non-empty strings, got {name!r}.")
        if not isinstance(s, RunningMoments):
            raise EngramError(f"stats[{name!r}] must be a RunningMoments, got {type(s).__name__}.")
        classes[name] = type(s).__name__
        tensors.update({f"{name}.{k}": v for k, v in s.state_dict().items()})
    meta = {
        "format": _CHECKPOINT_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "cursor": str(cursor),
        "stats": json.dumps(classes),
        "extra": json.dumps(extra),
    }
    return _write(path, _cpu(tensors), meta)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str | None = None) -> Checkpoint:
    """Read a file written by `save_checkpoint`; statistics go to `device` (default CPU)."""
    tensors, meta = _read(path)
    _check_header(path, meta, _CHECKPOINT_FORMAT)
    try:
        cursor = int(meta["cursor"])
        classes = json.loads(meta["stats"])
        extra = json.loads(meta["extra"])
    except (KeyError, ValueError) as err:
        raise EngramError(f"{path} has damaged checkpoint metadata ({type(err).__name__}: {err}).") from None
    if cursor < 0 or not isinstance(classes, dict) or not isinstance(extra, dict):
        raise EngramError(f"{path} has damaged checkpoint metadata (cursor={cursor}, stats={meta['stats']!r}).")
    expected = {f"{name}.{k}" for name in classes for k in RunningMoments.STATE}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise EngramError(
            f"{path} does not match its own index: missing tensors {missing}, unexpected tensors {unexpected}."
        )
    stats: dict[str, RunningMoments] = {}
    for name, cls_name in classes.items():
        if cls_name != RunningMoments.__name__:
            raise EngramError(f"{path}: statistic {name!r} has unknown class {cls_name!r}.")
        s = RunningMoments(tuple(tensors[f"{name}.mean"].shape), device=device)
        part = {k: tensors[f"{name}.{k}"] for k in RunningMoments.STATE}
        s._set(_checked_moments(part, s.shape, f"{path} [{name}]", s.device))
        stats[name] = s
    return Checkpoint(stats, cursor, {str(k): str(v) for k, v in extra.items()})
