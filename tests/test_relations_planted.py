"""Deactivation on a tiny GPT-2 with a planted neuron whose effect is known in advance."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import tiny_model
from engramlab.models import from_hf
from engramlab.relations.accuracy import recall
from engramlab.relations.units import UnitSpace

PLANTED, ANSWER = 5, 42  # neuron index in the last layer's fc_in; the token it forces


def _word_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 99)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "left"
    return fast


def planted_gpt2():
    """A GPT-2 whose last-layer neuron PLANTED is always ~10 and writes a direction that the LM head reads as
    token ANSWER; every other contribution is small. With it on, greedy output is ANSWER ANSWER; off, ln_f's
    bias pushes ANSWER's logit far below the others."""
    model = tiny_model("gpt2")
    mlp = model.transformer.h[-1].mlp
    with torch.no_grad():
        direction = torch.randn(32)
        direction /= direction.norm()
        mlp.c_fc.weight[:, PLANTED] = 0  # Conv1D weight is [in, out]
        mlp.c_fc.bias[PLANTED] = 10.0  # gelu(10) = 10 on every token
        mlp.c_proj.weight[PLANTED] = 20.0 * direction  # what the neuron writes into the residual
        model.lm_head.weight[ANSWER] = 5.0 * direction
        model.transformer.ln_f.bias.copy_(-3.0 * direction)  # without the neuron, ANSWER's logit is ~ -15
    return model


def test_zeroing_the_planted_neuron_breaks_recall_only_in_its_rows():
    loaded = from_hf(planted_gpt2(), _word_tokenizer())
    space = UnitSpace(loaded.layout)
    prompts = ["w3 w4 w5", "w7 w8", "w10 w11 w12 w13"]
    golds = [f"w{ANSWER} w{ANSWER}"] * 3
    planted_id = next(b for b in space.blocks if b.layer == 1 and b.site == "mlp.up").offset + PLANTED
    other_id = planted_id + 1
    sets = [np.array([], dtype=np.int64), np.array([planted_id]), np.array([other_id])]
    result = recall(loaded, prompts, golds, space, sets, batch_size=4)
    assert result.correct[0].all(), result.predictions[0]  # the planted neuron answers every prompt
    assert not result.correct[1].any()  # switched off: the answer is gone
    assert result.correct[2].all()  # a neighbouring neuron does not matter
    single = recall(loaded, prompts[:1], golds[:1], space, [np.array([planted_id])], batch_size=1)
    assert single.predictions[0, 0] == result.predictions[1, 0]  # batched rows equal a separate run
