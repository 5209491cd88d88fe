"""Letting a thread's OpenMP worker team go once the thread stops computing.

PyTorch's Linux CPU builds run their kernels on GNU OpenMP (libgomp). libgomp gives every thread
that starts a parallel region a team of worker threads of its own, and keeps it until that thread
exits. Once the threads it manages outnumber the cores, libgomp throttles: its workers spin a
thousandth as long before sleeping, so every one of a forward's many small parallel regions waits
for workers to wake. A thread that computed once (a caller that drove the engine, a benchmark's
``generate`` on the main thread) therefore slows every other thread's compute while it lives:
measured on 2 cores (bf16 SmolLM2-135M, one-token steps), 48 ms a step on the thread that computed
first, 72-85 ms on a second thread, 50-54 ms on the second thread once the first let its team go.

`release_thread_team` lets the calling thread's team go (``omp_pause_resource_all``, OpenMP 5.0,
which in libgomp frees only the calling thread's pool); the thread's next parallel region makes a
new team (one thread start per worker). Elsewhere (LLVM's or Intel's OpenMP, where a pause is
process-wide, or no OpenMP) it does nothing.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

_OMP_PAUSE_SOFT = 1  # omp_pause_soft: free the resources, keep the runtime usable


@lru_cache(maxsize=1)
def _libgomp_pause():
    """libgomp's ``omp_pause_resource_all`` when this process has libgomp loaded, else None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and line.rstrip().endswith(".so.1")}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    return None


def release_thread_team() -> bool:
    """Let the calling thread's GNU OpenMP worker team go (see the module docstring). Call it only
    outside parallel regions, from a thread that is done computing for now. Returns whether a team
    was let go (False where the runtime is not libgomp)."""
    pause = _libgomp_pause()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0
