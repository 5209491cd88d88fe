"""specdec: lossless speculative decoding with token trees for Hugging Face causal LMs."""

from specdec.api.decoder import SpeculativeDecoder
from specdec.api.generate import SpeculativeGenerateOutput, generate
from specdec.api.patching import is_patched, patch, patched, unpatch
from specdec.constrain import Constraint, ConstraintError, ConstraintLogitsProcessor
from specdec.models.loading import load_default_model, load_model
from specdec.schedule.scheduler import Scheduler
from specdec.serving.session import ChatSession
from specdec.step.engine import AUTO
from specdec.step.request import SpecStats
from specdec.step.stream import Cancelled, Overloaded, Stream, TimedOut
from specdec.step.support import UnsupportedGeneration

__version__ = "0.1.0"

__all__ = [
    "AUTO",
    "Cancelled",
    "ChatSession",
    "Constraint",
    "ConstraintError",
    "ConstraintLogitsProcessor",
    "Overloaded",
    "Scheduler",
    "SpecStats",
    "SpeculativeDecoder",
    "SpeculativeGenerateOutput",
    "Stream",
    "TimedOut",
    "UnsupportedGeneration",
    "generate",
    "is_patched",
    "load_default_model",
    "load_model",
    "patch",
    "patched",
    "unpatch",
]
