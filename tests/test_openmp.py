"""`specdec.device.openmp.release_thread_team`: a thread that computed lets its OpenMP workers go."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from specdec.device.openmp import _libgomp_pause, release_thread_team


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_the_calling_threads_workers_end():
    if _libgomp_pause() is None or torch.get_num_threads() < 2:
        assert release_thread_team() is False  # nothing to let go: says so, raises nothing
        pytest.skip("GNU OpenMP with two or more threads is not what this torch runs on")
    seen = {}

    def compute_then_release():
        big = torch.ones(1 << 22)
        for _ in range(4):  # element-wise work above PyTorch's grain size: a parallel region
            big.add_(1)
        seen["computing"] = _threads()
        seen["released"] = release_thread_team()
        seen["after"] = _threads()
        big.add_(1)  # the thread computes on afterwards: a new team
        seen["again"] = float(big[0])

    worker = threading.Thread(target=compute_then_release)
    worker.start()
    worker.join(60)
    assert seen["released"] is True
    assert seen["after"] <= seen["computing"] - (torch.get_num_threads() - 1)
    assert seen["again"] == 6.0
