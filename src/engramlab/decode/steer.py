"""Validate a decoded neuron by clamping it (Davies 2025 §A.1, §A.2.3).

"Clamping neuron i" = overwrite its channel with a constant c at every token position, prompt and generated alike,
then read the probability of the neuron's top token at the next position and a greedy continuation. The paper
does not say which tensor; both are offered:

- `site="up"`: the up_proj output channel i (before gating; the literal choice, since the neuron was found from
  its up_proj row). For non-gated MLPs (GPT-2, NeoX) this is fc_in's output before the activation.
- `site="act"`: the post-activation value act(gate_i)·up_i, i.e. the input of down_proj.

All values run as one batch: row 0 is the unclamped baseline, row j the clamp to values[j-1], each row with its
own clamp value (a `[B, D]` value tensor through the hook engine), in a single `generate` call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from engramlab.decode.atlas import token_strings, topk_rows, unembedding
from engramlab.errors import EngramError

STEER_SITES = {"up": "mlp.up", "act": "mlp.act"}
# Largest clamp value accepted: float16's range. Beyond it a half-precision model overflows outright, and in any dtype
# such a value is orders of magnitude past the activations a model produces (they stay well below 1e3).
MAX_CLAMP = 65504.0


def parse_neuron(spec: str) -> tuple[int, int]:
    """`"LAYER:INDEX"` -> (layer, index)."""
    match = re.fullmatch(r"\s*(-?\d+)\s*:\s*(\d+)\s*", str(spec))
    if match is None:
        raise EngramError(f"--neuron must be LAYER:INDEX, e.g. 3:1234; got {spec!r}.")
    return int(match.group(1)), int(match.group(2))


def parse_values(text: str | list[float]) -> list[float]:
    """`"0,5,10,20"` -> [0.0, 5.0, 10.0, 20.0]."""
    if isinstance(text, (list, tuple)):
        values = [float(v) for v in text]
    else:
        try:
            values = [float(v) for v in str(text).split(",") if v.strip()]
        except ValueError as err:
            raise EngramError(f"--values must be comma-separated numbers, e.g. 0,5,10,20; got {text!r}.") from err
    if not values:
        raise EngramError("--values is empty; give clamp values such as 0,5,10,20.")
    if not all(math.isfinite(v) for v in values):
        raise EngramError(f"--values must be finite numbers; got {text!r}.")
    huge = [v for v in values if abs(v) > MAX_CLAMP]
    if huge:
        raise EngramError(f"--values {huge[0]:g} is out of range: clamp values must lie within ±{MAX_CLAMP:g}.")
    return values


def check_neuron(loaded, layer: int, index: int) -> tuple[int, int]:
    layout = loaded.layout
    layer = layout.check_layer(layer)
    width = layout.site_width("mlp.up", layer)
    if not 0 <= index < width:
        raise EngramError(f"neuron index {index} is out of range: layer {layer} has neurons 0..{width - 1}.")
    return layer, index


def neuron_top_token(loaded, layer: int, index: int) -> tuple[int, float]:
    """The top token of the neuron's up_proj row through the raw LM head (the atlas's rank 0)."""
    w = loaded.layout.neuron_vectors(layer, "up")[index].detach()  # [H]
    unembed = unembedding(loaded.layout)
    with torch.no_grad():
        scores = w.to(unembed.device, torch.float32)[None] @ unembed.float().T  # [1, V]
    vals, ids = topk_rows(scores, 1)
    return int(ids[0, 0]), float(vals[0, 0])


def build_prompt(tokenizer, prompt: str, chat: bool) -> dict[str, torch.Tensor]:
    """Token ids of the prompt; with `chat`, wrapped in the tokenizer's chat template as one user turn."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt")
    if not getattr(tokenizer, "chat_template", None):
        raise EngramError(
            "--chat was given but this model's tokenizer has no chat template "
            "(tokenizer_config.json has no chat_template); drop --chat for a base model."
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def token_id_of(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise EngramError(
            f"--token {token!r} is {len(ids)} tokens in this tokenizer, not one; "
            "give a single token (mind the leading space, e.g. ' dog')."
        )
    return int(ids[0])


def same_word_ids(tokenizer, token_id: int, vocab_size: int) -> list[int]:
    """Ids of every token that spells the same word as `token_id` once case and surrounding spaces are ignored
    (" soccer", "soccer", " Soccer"...): the answer may start with any of them (after a chat template's newline
    the word often comes without its leading space)."""
    strings = token_strings(tokenizer, vocab_size)
    word = strings[token_id].strip().lower()
    if not word:
        return [token_id]
    return [i for i, t in enumerate(strings) if t.strip().lower() == word]


@dataclass
class SteerResult:
    """Row 0 of every list is the unclamped baseline; row j the clamp to values[j-1]."""

    layer: int
    neuron: int
    site: str
    token_id: int  # the token whose probability is reported
    token: str
    values: list[float | None]  # None for the baseline
    prob: list[float]  # P(token) at the next position
    prob_word: list[float]  # P(any token spelling the same word: case and surrounding spaces ignored)
    word_ids: list[int]  # those tokens
    top_next: list[str]  # argmax next token per row
    continuation: list[str]  # greedy continuation per row
    natural_last: float  # the neuron's unclamped value at the last prompt position
    natural_min: float  # ... its range over the prompt
    natural_max: float
    prompt: str  # the text fed to the model (chat template applied)

    def rows(self) -> list[dict]:
        base = self.prob[0]
        base_word = self.prob_word[0]
        return [
            {
                "value": v,
                "prob": p,
                "prob_ratio": p / base if base > 0 else float("inf"),
                "prob_word": pw,
                "prob_word_ratio": pw / base_word if base_word > 0 else float("inf"),
                "top_next": t,
                "continuation": c,
            }
            for v, p, pw, t, c in zip(
                self.values, self.prob, self.prob_word, self.top_next, self.continuation, strict=True
            )
        ]

    def summary(self) -> dict:
        return {
            "layer": self.layer,
            "neuron": self.neuron,
            "site": self.site,
            "token_id": self.token_id,
            "token": self.token,
            "word_ids": self.word_ids,
            "natural_last": self.natural_last,
            "natural_min": self.natural_min,
            "natural_max": self.natural_max,
            "prompt": self.prompt,
            "rows": self.rows(),
        }


def steer_neuron(
    loaded,
    layer: int,
    neuron: int,
    values: list[float],
    prompt: str,
    site: str = "up",
    chat: bool = False,
    max_new_tokens: int = 20,
    token: str | None = None,
) -> SteerResult:
    """Clamp (layer, neuron) at `site` to each of `values` at every position; one batched `generate`."""
    if site not in STEER_SITES:
        raise EngramError(f"--site {site!r} cannot be clamped; choose one of: {', '.join(STEER_SITES)}.")
    if max_new_tokens < 0:
        raise EngramError(f"--max-new-tokens must be >= 0, got {max_new_tokens}.")
    tokenizer = loaded.require_tokenizer()
    layer, neuron = check_neuron(loaded, layer, neuron)
    values = parse_values(values)
    token_id = token_id_of(tokenizer, token) if token is not None else neuron_top_token(loaded, layer, neuron)[0]

    hook_site = STEER_SITES[site]
    width = loaded.layout.site_width(hook_site, layer)
    batch_size = 1 + len(values)
    mask = torch.zeros(batch_size, width, dtype=torch.bool)  # [B, D]: row 0 unclamped
    mask[1:, neuron] = True
    clamp = torch.zeros(batch_size, width, dtype=torch.float32)  # [B, D]
    clamp[1:, neuron] = torch.tensor(values)

    encoded = build_prompt(tokenizer, prompt, chat)
    device = loaded.device
    input_ids = encoded["input_ids"].to(device).expand(batch_size, -1).contiguous()  # [B, T]
    attention_mask = torch.ones_like(input_ids)
    n_prompt = input_ids.shape[1]
    model = loaded.model
    engine = loaded.hooks
    with (
        torch.no_grad(),
        engine.record(hook_site, layer, positions="all") as rec,
        engine.edit_neurons({(hook_site, layer): mask}, "clamp", clamp),
    ):
        if max_new_tokens == 0:
            first_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1]  # [B, V]
            generated = input_ids
        else:
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            first_logits = out.logits[0]  # [B, V] raw logits of the first new token
            generated = out.sequences
    natural = rec[hook_site, layer][0, :n_prompt, neuron].float()  # row 0 is unclamped
    probs = torch.softmax(first_logits.float(), dim=-1)  # [B, V]
    broken = [v for v, ok in zip([None, *values], torch.isfinite(probs).all(dim=-1).tolist(), strict=True) if not ok]
    if broken:
        raise EngramError(
            f"clamping neuron {layer}:{neuron} to {broken[0]} makes the model's output non-finite (overflow in "
            f"{loaded.dtype}); use smaller --values."
        )
    word_ids = same_word_ids(tokenizer, token_id, probs.shape[-1])
    top_next = first_logits.argmax(dim=-1)
    return SteerResult(
        layer=layer,
        neuron=neuron,
        site=site,
        token_id=token_id,
        token=tokenizer.decode([token_id]),
        values=[None, *values],
        prob=probs[:, token_id].tolist(),
        prob_word=probs[:, word_ids].sum(dim=1).tolist(),
        word_ids=word_ids,
        top_next=[tokenizer.decode([int(t)]) for t in top_next],
        continuation=tokenizer.batch_decode(generated[:, n_prompt:], skip_special_tokens=True),
        natural_last=float(natural[-1]),
        natural_min=float(natural.min()),
        natural_max=float(natural.max()),
        prompt=tokenizer.decode(encoded["input_ids"][0]),
    )
