"""Reading state files as untrusted input: every field is checked before anything uses it.

A state file (drafter, decoder, chat session) is a ``torch.save`` dictionary loaded
with ``weights_only=True`` (no code runs). It may still be truncated, of another kind, or hold
tensors of the wrong shape, dtype or range; each of those is a `StateError` (a ``ValueError``)
that says what the file is, what was expected and what to do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The ``kind`` every specdec state file records, and the method that reads it.
KINDS = {
    "specdec-drafter": "Drafter.load",
    "specdec-decoder": "SpeculativeDecoder.load",
    "specdec-chat-session": "ChatSession.load",
    "specdec-head": "HeadFile.load (written by `specdec distill`)",
}


class StateError(ValueError):
    """A state file or state dictionary that cannot be used."""


def read_state_file(path, kind: str) -> dict[str, Any]:
    """The dictionary in ``path`` if it is a specdec state file of ``kind`` (see `KINDS`).

    Raises FileNotFoundError for a missing file and `StateError` for anything unreadable or of
    another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, pickled code refused, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StateError(f"{path} is not a readable specdec state file ({reason[:200]}); it may be truncated "
                         f"or another kind of file: expected what {KINDS[kind]} reads") from None
    if not isinstance(payload, dict):
        raise StateError(f"{path} holds a {type(payload).__name__}, not a specdec state file; "
                         f"expected what {KINDS[kind]} reads")
    found = payload.get("kind", _legacy_kind(payload))
    if found != kind:
        if found in KINDS:
            raise StateError(f"{path} is a {found} file (read it with {KINDS[found]}), not a {kind} file "
                             f"(what {KINDS[kind]} reads)")
        raise StateError(f"{path} is not a specdec state file (no 'kind' field); expected what {KINDS[kind]} reads")
    return payload


def _legacy_kind(payload: dict) -> str | None:
    """Kinds of files written before the ``kind`` field existed."""
    if "drafter_state" in payload and "scheduler" in payload:
        return "specdec-decoder"
    if "drafter" in payload and "state" in payload:
        return "specdec-drafter"
    if "history" in payload and "format" in payload:
        return "specdec-chat-session"
    return None


def field(state: dict, key: str, where: str):
    """``state[key]``, or a `StateError` naming the missing field."""
    if not isinstance(state, dict):
        raise StateError(f"{where}: expected a dictionary, got {type(state).__name__}")
    if key not in state:
        raise StateError(f"{where}: missing field {key!r}")
    return state[key]


def int_field(state: dict, key: str, where: str, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool) in ``[low, high]``."""
    value = field(state, key, where)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise StateError(f"{where}: {key} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise StateError(f"{where}: {key} = {value} is outside [{low}, {high}]")
    return value


def float_field(state: dict, key: str, where: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number in ``[low, high]``."""
    value = field(state, key, where)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise StateError(f"{where}: {key} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise StateError(f"{where}: {key} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise StateError(f"{where}: {key} = {value} is outside [{low}, {high}]")
    return value


def array_field(state: dict, key: str, where: str, shape: tuple | None = None, kind: str = "float",
                low: float | None = None, high: float | None = None, allow_nan: bool = False) -> np.ndarray:
    """A tensor or array field as a NumPy copy, checked for shape, dtype kind and value range.

    ``shape`` entries may be ``None`` (any size); ``kind`` is ``"int"`` or ``"float"``; floats must
    be finite (NaN allowed with ``allow_nan``, e.g. for "not measured"). Values must lie in
    ``[low, high]``.
    """
    value = field(state, key, where)
    return check_array(value, f"{where}: {key}", shape, kind, low, high, allow_nan)


def check_array(value, name: str, shape: tuple | None = None, kind: str = "float", low: float | None = None,
                high: float | None = None, allow_nan: bool = False) -> np.ndarray:
    """`array_field` for a value already taken out of its dictionary."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise StateError(f"{name} has dtype {value.dtype}, expected {kind}")
        array = value.detach().cpu().numpy().copy()
    elif isinstance(value, np.ndarray):
        array = value.copy()
    elif isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError:
            raise StateError(f"{name} is a ragged list, expected a {kind} array") from None
    else:
        raise StateError(f"{name} must be a tensor, got {type(value).__name__}")
    if kind == "int":
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise StateError(f"{name} has dtype {array.dtype}, expected integers")
        array = array.astype(np.int64)
    else:
        if array.size and not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise StateError(f"{name} has dtype {array.dtype}, expected numbers")
        array = array.astype(np.float64)
        if not np.isfinite(array[~np.isnan(array)] if allow_nan else array).all():
            raise StateError(f"{name} holds {'infinite' if allow_nan else 'NaN or infinite'} values")
    if shape is not None:
        if array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
            wanted = tuple("*" if s is None else s for s in shape)
            raise StateError(f"{name} has shape {tuple(array.shape)}, expected {wanted}")
    values = array[~np.isnan(array)] if kind == "float" else array
    if values.size:
        if low is not None and values.min() < low:
            raise StateError(f"{name} holds {values.min()}, below the allowed minimum {low}")
        if high is not None and values.max() > high:
            raise StateError(f"{name} holds {values.max()}, above the allowed maximum {high}")
    return array


def check_vocab_size(state: dict, vocab_size: int | None, where: str) -> None:
    """Refuse state made for a model with another vocabulary (``vocab_size=None``: no check)."""
    saved = int_field(state, "vocab_size", where, low=1)
    if vocab_size is not None and saved != vocab_size:
        raise StateError(f"{where}: state was saved for a model with a vocabulary of {saved} tokens; this one has "
                         f"{vocab_size}. State files only load into a model with the same vocabulary")
