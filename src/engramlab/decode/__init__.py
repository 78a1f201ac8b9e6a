"""Decoding MLP neurons through the LM head (Davies 2025, arXiv 2501.02688): the neuron atlas, search,
base-vs-post-trained agreement and clamp steering. See docs/decode.md."""

from engramlab.decode.atlas import (
    DECODE_SITES,
    Atlas,
    Decoded,
    decode_atlas,
    decode_vectors,
    load_atlas,
    naive_decode,
    neuron_vectors,
    token_strings,
    topk_rows,
    unembedding,
    write_atlas,
)
from engramlab.decode.compare import (
    Comparison,
    compare_atlases,
    compare_models,
    write_comparison,
)
from engramlab.decode.explorer import write_explorer
from engramlab.decode.search import search_atlas
from engramlab.decode.steer import SteerResult, parse_neuron, steer_neuron

__all__ = [
    "DECODE_SITES",
    "Atlas",
    "Comparison",
    "Decoded",
    "SteerResult",
    "compare_atlases",
    "compare_models",
    "decode_atlas",
    "decode_vectors",
    "load_atlas",
    "naive_decode",
    "neuron_vectors",
    "parse_neuron",
    "search_atlas",
    "steer_neuron",
    "token_strings",
    "topk_rows",
    "unembedding",
    "write_atlas",
    "write_comparison",
    "write_explorer",
]
