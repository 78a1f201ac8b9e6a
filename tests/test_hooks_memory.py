"""Recordings free their memory without Python's cycle collector (issue 22): no reference cycle between a recording,
its hooks and the engine, a single forward read without a copy, and `stop=True` keeping no frame alive.

Every test runs with `gc.disable()`, so anything that is only freed by the cycle collector shows up as held.
"""

from __future__ import annotations

import gc
import types
import warnings
import weakref
from contextlib import contextmanager

import psutil
import pytest
import torch
import transformers

from engramlab.models import HookEngine

SITES = ["resid_pre", "attn.out", "mlp.gate", "mlp.up", "mlp.act", "mlp.down", "resid_post"]


@contextmanager
def no_cycle_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def llama():
    """A Llama big enough that one full recording (every site, layer and position) is ~17 MB."""
    config = transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _batch(batch: int = 4, length: int = 128) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 99, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _full_recording(engine: HookEngine, model, batch) -> tuple[object, int]:
    with torch.inference_mode(), engine.record(SITES, None, positions="all") as rec:
        model(**batch)
    return rec, sum(rec[key].numel() * rec[key].element_size() for key in rec.keys())  # noqa: SIM118 (a Recording is not iterable)


def test_recorded_tensors_die_with_the_recording(llama):
    engine, batch = HookEngine(llama), _batch()
    with no_cycle_collector():
        rec, _ = _full_recording(engine, llama, batch)
        alive = [weakref.ref(rec[key]) for key in rec.keys()]  # noqa: SIM118
        recording = weakref.ref(rec)
        del rec
        assert recording() is None, "the recording is kept alive by a reference cycle"
        assert all(ref() is None for ref in alive), "recorded tensors outlive their recording"


def test_twenty_full_recordings_keep_memory_flat(llama):
    """RSS after 20 full recordings in a loop (cycle collector off) stays within one recording's size of where it
    was after the first ones (it grew by about 20 x 17 MB when the recording and its hooks formed a cycle)."""
    engine, batch, process = HookEngine(llama), _batch(), psutil.Process()
    with no_cycle_collector():
        for _ in range(3):  # warm up the allocator and the model's own buffers
            rec, size = _full_recording(engine, llama, batch)
            del rec
        before = process.memory_info().rss
        for _ in range(20):
            rec, size = _full_recording(engine, llama, batch)
            del rec
        grown = process.memory_info().rss - before
    assert size > 10_000_000
    assert grown < size, f"RSS grew by {grown / 2**20:.1f} MiB over 20 recordings of {size / 2**20:.1f} MiB each"


def test_one_forward_is_read_without_a_copy(llama):
    engine, batch = HookEngine(llama), _batch(2, 16)
    with torch.inference_mode(), engine.record("mlp.act", 1, positions="all") as rec:
        llama(**batch)
    first, again = rec["mlp.act", 1], rec["mlp.act", 1]
    assert first.data_ptr() == again.data_ptr() and first.shape == (2, 16, 512)


def test_stop_leaves_no_frame_or_forward_tensor_alive(llama):
    """`stop=True` ends the forward with an exception; once the block is left, neither the frames it unwound
    (HF's forward with its KV cache among their locals) nor the tensors they held may stay alive."""
    engine, batch = HookEngine(llama), _batch(2, 16)
    outputs: list[weakref.ref] = []
    handle = llama.model.layers[0].mlp.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))
    try:
        with no_cycle_collector():
            frames_before = _frames()
            with torch.inference_mode(), engine.record("mlp.act", 2, positions="nonpad", reduce="mean", stop=True):
                llama(**batch)
            left = _frames() - frames_before
            assert outputs and outputs[0]() is None, "a tensor of the stopped forward is still alive"
    finally:
        handle.remove()
    assert not left, f"frames kept alive by the stop: {sorted(f.f_code.co_name for f in left)}"


def _frames() -> set:
    with warnings.catch_warnings():  # touching every object wakes a deprecated torch.distributed alias
        warnings.simplefilter("ignore")
        return {o for o in gc.get_objects() if isinstance(o, types.FrameType)}
