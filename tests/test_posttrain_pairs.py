"""Pairing true and false statements for patching (paper 3 §B.2): groups of unequal size pair as many as they can."""

from __future__ import annotations

from engramlab.data.statements import Statement
from engramlab.posttrain.patching import pairs_by_last_word


class WordTokenizer:
    """One token per word: statements of the same word count render to the same length."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": list(range(len(text.split())))}


def test_unequal_groups_pair_the_shorter_side():
    trues = [Statement(f"City {i} is in France.", True, "cities") for i in range(3)]
    falses = [Statement("City 9 is in France.", False, "cities")]
    pairs = pairs_by_last_word([*trues, *falses], WordTokenizer(), max_pairs=10, render=lambda s: s.text)
    assert len(pairs) == 1 and pairs[0].false is falses[0] and pairs[0].true in trues
