"""Prompts to padded batches, and character spans (a subject, an object) to token positions.

Two studies need to know which tokens of a prompt are which: the template control (paper 1 has none; issue 5
asks for a subject-only vs template-only AP per neuron) averages a unit's output over the subject's tokens or
over the template's, and the perplexity probe (paper 1 §5.5) scores the object's tokens. Both map a character
span to tokens with the fast tokenizer's offsets (`return_offsets_mapping`): a token belongs to the span when
its characters overlap it, so a leading-space token such as "ĠGoogle" counts for the subject "Google".

Padding is on the left (engramlab loads every tokenizer so), so `encode` also passes position ids counted from
each row's first real token, as `generate` does: absolute-position models (GPT-2) would otherwise see shifted
positions in the padded rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engramlab.errors import EngramError


def encode(tokenizer, texts: Sequence[str], device: torch.device | str, offsets: bool = False):
    """Tokenise a batch, left-padded, with `position_ids` from the attention mask. With `offsets=True` returns
    `(batch, offset_mapping [B, L, 2])`; the batch itself never carries the offsets (models reject them)."""
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, return_offsets_mapping=offsets)
    except NotImplementedError as err:  # slow (Python) tokenizers have no offsets
        raise EngramError(
            "this study maps characters to tokens and needs a fast tokenizer (tokenizer.json); "
            f"{type(tokenizer).__name__} has no offset mapping."
        ) from err
    mapping = batch.pop("offset_mapping") if offsets else None
    batch["position_ids"] = (batch["attention_mask"].cumsum(dim=-1) - 1).clamp_min(0)  # [B, L]
    batch = batch.to(device)
    return (batch, mapping) if offsets else batch


def text_positions(offsets: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool `[B, L]`: real tokens that cover some text (not padding, not BOS/EOS: those have empty offsets)."""
    offsets = offsets.to(attention_mask.device)
    return attention_mask.bool() & (offsets[..., 1] > offsets[..., 0])


def span_positions(
    offsets: torch.Tensor, attention_mask: torch.Tensor, spans: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Bool `[B, L]`: the text tokens whose characters overlap row i's span `[start, end)`."""
    offsets = offsets.to(attention_mask.device)
    bounds = torch.tensor([list(s) for s in spans], dtype=offsets.dtype, device=offsets.device)  # [B, 2]
    start, end = bounds[:, 0:1], bounds[:, 1:2]  # [B, 1]
    overlap = (offsets[..., 0] < end) & (offsets[..., 1] > start)  # [B, L]
    return overlap & text_positions(offsets, attention_mask)


def subject_and_template(
    offsets: torch.Tensor, attention_mask: torch.Tensor, spans: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `[B, L]` masks of the subject's tokens and of the template's (every other text token).

    A token that straddles the subject's edge (a tokenizer merging "'s" into the name) counts as subject. BOS
    and padding belong to neither. Raises when a row has no token on one side: its mean would be undefined.
    """
    subject = span_positions(offsets, attention_mask, spans)
    template = text_positions(offsets, attention_mask) & ~subject
    for name, mask in (("subject", subject), ("template", template)):
        empty = torch.nonzero(~mask.any(dim=1)).flatten()
        if empty.numel():
            raise EngramError(
                f"prompt {int(empty[0])} of the batch has no {name} token (span "
                f"{tuple(spans[int(empty[0])])}); check that the span lies inside the prompt."
            )
    return subject, template
