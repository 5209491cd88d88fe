"""specdec: lossless speculative decoding with token trees for Hugging Face causal LMs."""

from specdec.engine import AUTO, SpeculativeDecoder
from specdec.generate import SpeculativeGenerateOutput, generate
from specdec.models import load_default_model, load_model
from specdec.patching import is_patched, patch, patched, unpatch
from specdec.request import SpecStats
from specdec.scheduler import Scheduler
from specdec.session import ChatSession
from specdec.validation import UnsupportedGeneration

__version__ = "0.1.0"

__all__ = [
    "AUTO",
    "ChatSession",
    "Scheduler",
    "SpecStats",
    "SpeculativeDecoder",
    "SpeculativeGenerateOutput",
    "UnsupportedGeneration",
    "generate",
    "is_patched",
    "load_default_model",
    "load_model",
    "patch",
    "patched",
    "unpatch",
]
