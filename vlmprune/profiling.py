"""Wall time and peak memory of a piece of work.

Peak resident memory is sampled from the OS (psutil) by a background thread every 20 ms, since a
stage may run inside a longer-lived process (a Prefect flow) where ``ru_maxrss`` would report the
process's all-time peak. On CUDA, ``torch.cuda.max_memory_allocated`` is recorded too (the largest
over the visible GPUs: a run uses one of them, ``model.device: cuda:N``).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import torch


@dataclass
class Usage:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0  # resident memory when the work began (libraries, data already loaded)
    peak_cuda_mb: float | None = None

    def as_dict(self) -> dict:
        out = {"wall_s": round(self.wall_s, 3), "peak_rss_mb": round(self.peak_rss_mb, 1),
               "start_rss_mb": round(self.start_rss_mb, 1)}
        if self.peak_cuda_mb is not None:
            out["peak_cuda_mb"] = round(self.peak_cuda_mb, 1)
        return out


@contextmanager
def measure(interval_s: float = 0.02):
    """``with measure() as usage: ...`` fills ``usage`` when the block ends."""
    usage = Usage()
    process = psutil.Process()
    peak = [process.memory_info().rss]
    usage.start_rss_mb = peak[0] / 2**20
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else range(0)
    for gpu in gpus if torch.cuda.is_initialized() else ():  # before CUDA starts there is no peak to reset
        torch.cuda.reset_peak_memory_stats(gpu)  # (and torch 2.11 refuses: 'Invalid device argument')
    start = time.perf_counter()
    thread.start()
    try:
        yield usage
    finally:
        for gpu in gpus:
            torch.cuda.synchronize(gpu)  # the work queued on the GPU belongs to the block
        done.set()
        thread.join()
        usage.wall_s = time.perf_counter() - start
        usage.peak_rss_mb = max(peak[0], process.memory_info().rss) / 2**20
        if gpus:
            usage.peak_cuda_mb = max(torch.cuda.max_memory_allocated(gpu) for gpu in gpus) / 2**20
