"""Torch's CPU thread count: how many to train on, and keeping the caller's count across a library call."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from yoloprune.errors import YoloPruneError


@contextmanager
def torch_threads_kept(threads: int | None = None) -> Iterator[None]:
    """Run a block on ``threads`` torch CPU threads (None: as it is), then restore the count the process had.

    Ultralytics' ``select_device("cpu")`` (run by its exporter, validator, predictor and
    trainer) sets it to ``os.cpu_count() - 1`` for the whole process: 1 on a 2-core
    machine, halving the speed of everything that follows.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads(threads: int | None = None) -> int:
    """Return the torch thread count to train with on the CPU: ``threads``, or every core this process may use.

    The count is a result setting, not only a speed one: the weights a run ends with differ
    in their last bits between thread counts (measured: five AdamW steps of yolov8n on one
    and on two threads), so a run is repeated exactly only on as many threads.
    """
    if threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise YoloPruneError(f"threads must be an integer >= 1 or None (every core), got {threads!r}")
    return threads
