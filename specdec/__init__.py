"""specdec: lossless speculative decoding with token trees for Hugging Face causal LMs."""

from specdec.engine import DEFAULT_TREE_BUDGET, SpeculativeDecoder, SpecStats
from specdec.generate import SpeculativeGenerateOutput, generate
from specdec.models import load_default_model, load_model

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TREE_BUDGET",
    "SpecStats",
    "SpeculativeDecoder",
    "SpeculativeGenerateOutput",
    "generate",
    "load_default_model",
    "load_model",
]
