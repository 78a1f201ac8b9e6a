"""The knowledge gate: relation neurons are looked for only in relations the model knows.

Paper 1 §2.2 selects neurons on the identification prompts the model answers correctly (P_det after validation).
A relation the model never learnt leaves no validated prompt, or a handful: its AP is undefined (NaN) or rests on a
few lucky completions, its "top units" are arbitrary, and its 0 -> 0 accuracy would drag every mean drop towards
zero while its arbitrary units cut the other relations. The gate therefore excludes a relation when fewer than
`min_validated` of its identification prompts validate, or fewer than `min_share` of them (engramlab's defaults:
10 prompts and 20%; on the shipped base organism every shipped relation validates 97-100%). An excluded relation is
left out of selection, of the negatives and of every mean, and is listed with its reason and counts in
`summary.json` (`excluded_relations`), on stderr and in report.html.

The same rule applies wherever a study averages over inputs of a model: `languages` below applies it to the
multilingual accuracies (a language in which the model answers too few prompts of a relation is excluded there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engramlab.errors import EngramError

MIN_VALIDATED = 10  # validated identification prompts a relation needs
MIN_SHARE = 0.2  # ... and the share of its candidate prompts that must validate


@dataclass(frozen=True)
class KnowledgeGate:
    """A relation passes when `validated >= min_validated` and `validated >= min_share * candidates`."""

    min_validated: int = MIN_VALIDATED
    min_share: float = MIN_SHARE

    def __post_init__(self) -> None:
        if self.min_validated < 1:
            raise EngramError(f"--min-validated must be >= 1, got {self.min_validated}.")
        if not 0 <= self.min_share <= 1:
            raise EngramError(f"--min-validated-share must be in [0, 1], got {self.min_share}.")

    def reason(self, validated: int, candidates: int) -> str | None:
        """Why a relation with these counts is excluded, or None when it passes."""
        if validated < self.min_validated:
            return (
                f"{validated} of {candidates} identification prompts answered correctly "
                f"(the gate needs at least {self.min_validated})"
            )
        if validated < self.min_share * candidates:
            return (
                f"{validated} of {candidates} identification prompts answered correctly, "
                f"{validated / candidates:.0%} (the gate needs at least {self.min_share:.0%})"
            )
        return None

    def split(self, counts: Mapping[str, Mapping[str, int]]) -> tuple[list[str], dict[str, dict]]:
        """(relations that pass, {excluded relation: {"reason", "validated", "candidates"}}) from find's counts."""
        kept, excluded = [], {}
        for name, c in counts.items():
            why = self.reason(int(c["validated"]), int(c["candidates"]))
            if why is None:
                kept.append(name)
            else:
                excluded[name] = {"reason": why, "validated": int(c["validated"]), "candidates": int(c["candidates"])}
        return kept, excluded


def require_two(kept: list[str], excluded: Mapping[str, Mapping], model: str) -> None:
    """Paper 1 needs two relations (negatives come from the other relations): one line when the gate leaves fewer."""
    if len(kept) >= 2:
        return
    if not kept:
        names = ", ".join(excluded)
        raise EngramError(
            f"{model} does not know any requested relation well enough (knowledge gate: {names} excluded, e.g. "
            f"{next(iter(excluded))}: {next(iter(excluded.values()))['reason']}); relation neurons need facts the "
            "model knows."
        )
    first = next(iter(excluded))
    raise EngramError(
        f"only {kept[0]!r} passes the knowledge gate on {model} ({first}: {excluded[first]['reason']}); paper 1 "
        "needs two known relations, since negatives come from the other relations."
    )


def warning_lines(excluded: Mapping[str, Mapping]) -> list[str]:
    """One `warning:` line per excluded relation, for stderr."""
    return [
        f"warning: relation {name!r} excluded by the knowledge gate: {e['reason']}." for name, e in excluded.items()
    ]
