"""Relation-specific neurons (Liu et al., "On Relation-Specific Neurons in Large Language Models", EMNLP 2025,
arXiv 2502.17355): find the FFN units that carry one relation, switch them off, and measure what follows.

Library API (the `engramlab relations` commands are thin layers over it):
    find(loaded, relations, out, k=None, response="mean", units="neurons")   -> FindResult
    deactivate(loaded, found, relations, space, k, n_random=10)             -> Deactivation
    sweep(loaded, found, relations, space, ks)                               -> Sweep (with cumulativity)
    overlap(found, k)                                                        -> dict (IoU, versatility)
    multilingual(loaded, found, translated, space, k)                        -> (rows, summary)
    template_control(loaded, found, validated, rows_per_relation, top=100)   -> TemplateControl
    perplexity(loaded, found, validated, space, k, n_random=10)              -> Perplexity (paper §5.5)
    split_templates(relations, "p1b,stmt2" | "none" | None)                  -> relations re-split for selection
"""

from engramlab.relations.ap import average_precision
from engramlab.relations.effects import deactivate, multilingual, overlap, sweep
from engramlab.relations.find import FindResult, default_k, find, load_identification, sample_rows
from engramlab.relations.perplexity import perplexity
from engramlab.relations.prompts import split_templates
from engramlab.relations.template_control import template_control
from engramlab.relations.units import UnitSpace

__all__ = [
    "FindResult",
    "UnitSpace",
    "average_precision",
    "deactivate",
    "default_k",
    "find",
    "load_identification",
    "multilingual",
    "overlap",
    "perplexity",
    "sample_rows",
    "split_templates",
    "sweep",
    "template_control",
]
