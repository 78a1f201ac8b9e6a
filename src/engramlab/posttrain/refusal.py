"""The refusal direction (paper 3 §B.4, the recipe of Arditi et al. 2024, "Refusal in LLMs is mediated by a
single direction").

- Direction: r = mean(harmful) - mean(harmless) of `resid_pre` at one layer, at the last token of the
  instruction in the model's chat template (the token before generation starts).
- Ablation: x <- x - (x.r_hat) r_hat everywhere the direction could be written: the residual entering every
  layer (`resid_pre`) and the outputs of every attention and MLP block (`attn.out`, `mlp.down`), all positions.
  This is the block-pre-hook + output-hook layout of refusal_direction, and it leaves no component along r_hat.
- Addition: x <- x + c.r at `resid_pre` of the direction's layer, all positions (prompt and generated), with r
  the un-normalised mean difference (Arditi et al.'s activation addition), so c = 1 needs no per-model tuning.
  The paper adds c.r_hat at three sites inside one block with c tuned per model (spec B.4, B.6).
- Refusal rate: greedy continuations (16 tokens) whose stripped text starts with a refusal phrase.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import torch

from engramlab.data.chat import is_refusal
from engramlab.distributed import map_batches
from engramlab.errors import EngramError
from engramlab.models.loading import LoadedModel


def chat_prompts(loaded: LoadedModel, instructions: Sequence[str], template: str = "chat") -> list[str]:
    """Instructions in the model's chat template (`chat`), or the paper's base template (`plain`)."""
    tokenizer = loaded.require_tokenizer()
    if template == "plain":
        return [f"User: {text}\nAssistant:" for text in instructions]
    if template != "chat":
        raise EngramError(f"--template {template!r} is not supported; choose chat or plain.")
    if not getattr(tokenizer, "chat_template", None):
        raise EngramError(f"{loaded.ref} has no chat template; pass --template plain.")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in instructions
    ]


def tokenize(tokenizer, prompts: Sequence[str]):
    """A left-padded batch; special tokens are added only where the chat template did not already put BOS."""
    bos = tokenizer.bos_token
    templated = bool(bos) and all(p.startswith(bos) for p in prompts)
    return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not templated)


@torch.inference_mode()
def mean_activation(loaded: LoadedModel, prompts: Sequence[str], layer: int, batch_size: int = 16) -> np.ndarray:
    """Mean `resid_pre` of `layer` at the last prompt token, float64 [H].

    Under torchrun each rank records its share of the batches; the per-batch float64 sums are gathered and added
    in batch order, so the mean (and the direction) is bit-identical to one process's, whatever the rank count.
    """
    tokenizer = loaded.require_tokenizer()

    def run(start: int) -> np.ndarray:
        batch = tokenize(tokenizer, prompts[start : start + batch_size])
        with loaded.hooks.record("resid_pre", layer, positions="last", dtype=torch.float64, stop=True) as rec:
            loaded.model(**batch.to(loaded.device))
        return rec["resid_pre", layer].sum(0).cpu().numpy()  # [H]

    total = None
    for part in map_batches(range(0, len(prompts), batch_size), run):
        total = part if total is None else total + part
    return total / len(prompts)


def refusal_direction(
    loaded: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], layer: int, batch_size: int = 16
) -> np.ndarray:
    """Difference in means of the chat-templated instructions (un-normalised)."""
    return mean_activation(loaded, harmful, layer, batch_size) - mean_activation(loaded, harmless, layer, batch_size)


def ablation(loaded: LoadedModel, direction: np.ndarray) -> ExitStack:
    """Context: the direction ablated from every residual write (see module docstring)."""
    vector = torch.as_tensor(direction, dtype=torch.float32)
    stack = ExitStack()
    for site in ("resid_pre", "attn.out", "mlp.down"):
        stack.enter_context(loaded.hooks.ablate_direction(site, None, vector))
    return stack


def addition(loaded: LoadedModel, direction: np.ndarray, layer: int, coeff: float):
    """Context: c times the (un-normalised) mean-difference vector added to `resid_pre` of `layer` at every
    position; c = 1 moves a harmless prompt's activation by exactly the harmful-harmless gap."""
    return loaded.hooks.add_direction("resid_pre", layer, torch.as_tensor(direction, dtype=torch.float32), coeff=coeff)


@torch.inference_mode()
def generate(
    loaded: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 16, intervention=None
) -> list[str]:
    """Greedy continuations, optionally inside an intervention context factory (called once per batch)."""
    tokenizer = loaded.require_tokenizer()

    def run(start: int) -> list[str]:
        batch = tokenize(tokenizer, prompts[start : start + batch_size]).to(loaded.device)
        with intervention() if intervention is not None else ExitStack():
            out = loaded.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    return [text for texts in map_batches(range(0, len(prompts), batch_size), run) for text in texts]


def refusal_rate(texts: Sequence[str]) -> float:
    return float(np.mean([is_refusal(t) for t in texts])) if texts else float("nan")
