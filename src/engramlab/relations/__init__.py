"""Relation-specific neurons (Liu et al., "On Relation-Specific Neurons in Large Language Models", EMNLP 2025,
arXiv 2502.17355): find the FFN units that carry one relation, switch them off, and measure what follows.

Library API (the `engramlab relations` commands are thin layers over it):
    find(loaded, relations, out, k=None, response="mean", units="neurons")   -> FindResult
    deactivate(loaded, found, relations, space, k, n_random=10)             -> Deactivation
    sweep(loaded, found, relations, space, ks)                               -> Sweep (with cumulativity)
    overlap(found, k)                                                        -> dict (IoU, versatility)
    multilingual(loaded, found, translated, space, k)                        -> (rows, summary)
"""

from engramlab.relations.ap import average_precision
from engramlab.relations.effects import deactivate, multilingual, overlap, sweep
from engramlab.relations.find import FindResult, default_k, find
from engramlab.relations.units import UnitSpace

__all__ = ["FindResult", "UnitSpace", "average_precision", "deactivate", "default_k", "find", "multilingual",
           "overlap", "sweep"]
