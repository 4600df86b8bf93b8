"""One GPU inference timed like trtexec: H2D copy, compute, D2H copy with CUDA events on one stream,
and the host-side enqueue time. Shared by the GPU runners (PyTorch provides streams and events)."""

from __future__ import annotations

import time
from typing import Callable


class CudaTimedStep:
    def __init__(self, torch_module, stream=None):
        self.torch = torch_module
        self.stream = stream or torch_module.cuda.Stream()
        self.events = [torch_module.cuda.Event(enable_timing=True) for _ in range(4)]

    def run(self, h2d: Callable[[], None] | None, compute: Callable[[], None], d2h: Callable[[], None] | None) -> dict:
        start, computing, computed, done = self.events
        with self.torch.cuda.stream(self.stream):
            start.record(self.stream)
            if h2d:
                h2d()
            computing.record(self.stream)
            t0 = time.perf_counter()
            compute()
            enqueue = time.perf_counter() - t0
            computed.record(self.stream)
            if d2h:
                d2h()
            done.record(self.stream)
        self.stream.synchronize()
        timings = {
            "latency": start.elapsed_time(done) / 1e3,
            "compute": computing.elapsed_time(computed) / 1e3,
            "enqueue": enqueue,
        }
        if h2d:
            timings["h2d"] = start.elapsed_time(computing) / 1e3
        if d2h:
            timings["d2h"] = computed.elapsed_time(done) / 1e3
        return timings
