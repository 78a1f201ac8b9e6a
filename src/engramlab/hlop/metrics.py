"""Continual-learning metrics (HLOP spec §3; Lopez-Paz & Ranzato 2017, GEM, arXiv 1706.08840 §3).

`acc[i][j]` = accuracy on task j after training task i (T × T). ACC = mean of the last row; BWT = mean over j < T−1
of `acc[T−1][j] − acc[j][j]` (negative = forgetting).
"""

from __future__ import annotations

import math

import numpy as np

from engramlab.errors import EngramError


def _square(acc: np.ndarray | list[list[float]]) -> np.ndarray:
    matrix = np.asarray(acc, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise EngramError(f"an accuracy matrix must be square T × T, got shape {matrix.shape}.")
    return matrix


def average_accuracy(acc: np.ndarray | list[list[float]]) -> float:
    """ACC: mean accuracy over all tasks after the last one."""
    return float(_square(acc)[-1].mean())


def backward_transfer(acc: np.ndarray | list[list[float]]) -> float:
    """BWT: mean change of each earlier task's accuracy from just after learning it to the end (nan for T = 1)."""
    matrix = _square(acc)
    if matrix.shape[0] == 1:
        return math.nan
    last = matrix.shape[0] - 1
    return float(np.mean([matrix[last, j] - matrix[j, j] for j in range(last)]))
