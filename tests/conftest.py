"""Shared fixtures: tiny random models of every supported family, built in-process (no downloads).

Following transformers' own tests: vocab 99, hidden 32, 2 layers, 4 heads, and an odd intermediate size (37) so
that a transposed or mixed-up dimension cannot hide.
"""

from __future__ import annotations

import pytest
import torch
import transformers

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 99, 32, 37, 2, 4

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}
_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, num_key_value_heads=2, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(
        **_COMMON, num_key_value_heads=2, head_dim=8, final_logit_softcapping=None
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON),
}
FAMILIES = tuple(_CONFIGS)


def tiny_config(family: str):
    return _CONFIGS[family]()


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture
def batch():
    """Two rows, left-padded: row 0 has 2 pad tokens."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    input_ids[0, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the `engramlab` command in-process: (exit code, stdout, stderr)."""
    from engramlab.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def cli(capsys):
    """`run_cli` bound to the test's capsys: cli([...]) -> (exit code, stdout, stderr)."""
    return lambda args: run_cli(args, capsys)


def pytest_collection_modifyitems(session, config, items):
    """The house checks (tests/test_house.py: ruff and the strict docs build) run first, as CI's lint step."""
    items.sort(key=lambda item: item.path.name != "test_house.py")  # stable: the rest keep their order
