"""Average precision of every neuron at once (paper 1, §2.2 "expertise", after Cuadros et al. 2022).

Each neuron's response is a classifier score for "this prompt belongs to relation r". AP is the area under its
precision-recall curve with every distinct response value as a threshold, tied values grouped — exactly
scikit-learn's `average_precision_score`:

    AP = sum over distinct thresholds t (descending) of (R_t - R_{t-1}) * P_t

scikit-learn scores one neuron per call; a 7B model has 835,584 neurons, so this module computes the same
number for a whole `[prompts, neurons]` block with one sort per column. Written by hand because no library
offers a batched, tie-exact AP over columns; `tests/test_relations_ap.py` checks it against scikit-learn.
"""

from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AP of each column of `scores` [P, N] for binary `labels` [P] (1 = positive). Returns [N] float64.

    Ties are grouped as in scikit-learn: all prompts sharing a score enter the curve at the same threshold.
    A column with no positive gets NaN.
    """
    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"need scores [P, N] and labels [P]; got {list(scores.shape)} and {list(labels.shape)}")
    n_prompts = scores.shape[0]
    y = labels.to(device=scores.device, dtype=torch.float64)
    n_pos = y.sum()
    order = torch.sort(scores, dim=0, descending=True, stable=True)
    sorted_scores = order.values  # [P, N]
    sorted_labels = y[order.indices]  # [P, N]
    true_pos = sorted_labels.cumsum(dim=0)  # [P, N] positives ranked at or above each row
    rank = torch.arange(1, n_prompts + 1, device=scores.device, dtype=torch.float64)[:, None]  # [P, 1]
    precision = true_pos / rank  # [P, N]
    # The last row of each tie group is where its threshold's precision is read off.
    group_end = torch.ones_like(sorted_scores, dtype=torch.bool)  # [P, N]
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    index = torch.arange(n_prompts, device=scores.device)[:, None].expand_as(sorted_scores)
    end_index = torch.where(group_end, index, n_prompts)  # [P, N]
    # For every row, the first group end at or below it: a reverse running minimum.
    end_of_group = torch.flip(torch.cummin(torch.flip(end_index, dims=[0]), dim=0).values, dims=[0])  # [P, N]
    precision_at_threshold = torch.gather(precision, 0, end_of_group)  # [P, N]
    # Each positive adds 1/n_pos of recall at its group's threshold.
    return (sorted_labels * precision_at_threshold).sum(dim=0) / n_pos


def average_precision_chunked(scores: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """`average_precision` over column chunks, so the sort's temporaries stay at [P, chunk]."""
    return torch.cat([average_precision(scores[:, i : i + chunk], labels) for i in range(0, scores.shape[1], chunk)])
