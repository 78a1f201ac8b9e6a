"""A byte-level BPE tokenizer trained on the organism corpus with `tokenizers`, saved as a plain HF tokenizer.

Byte-level BPE (GPT-2 style) so every string, accents included, round-trips. The special tokens of
`engramlab.data.chat.SPECIAL_TOKENS` are reserved first; a post-processor puts `<|bos|>` in front of every
encoded text, so `tokenizer(prompt)` gives what the model saw in training. The chat template is stored in
tokenizer_config.json.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from engramlab.data.chat import CHAT_TEMPLATE, SPECIAL_TOKENS


def train_tokenizer(texts: list[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|eos|>", "<|pad|>")],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | Path) -> None:
    tok.save_pretrained(str(path))
