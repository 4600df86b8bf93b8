"""The timing loop: time-based warm-up, then iterations until both the duration and the iteration
count are reached (as trtexec does), optionally split into interleaved rounds across models."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from edgetok.profile.stats import summarize, warnings_for
from edgetok.runtime.runners import Runner


@dataclass
class Measurement:
    records: list[dict] = field(default_factory=list)
    wall_s: float = 0.0  # host time spent in timed iterations
    windows: list[tuple[float, float]] = field(default_factory=list)  # monotonic (start, end) per round

    def report(self, batch: int) -> dict:
        stats = {leg: summarize([r[leg] for r in self.records]) for leg in self.records[0]}
        qps = len(self.records) / self.wall_s
        return {
            "iterations": len(self.records),
            "wall_s": self.wall_s,
            "throughput": {"qps": qps, "items_per_s": qps * batch},
            "timings_ms": stats,
            "warnings": warnings_for(stats),
        }


def warm_up(runner: Runner, seconds: float, clock: Callable[[], float] = time.perf_counter) -> None:
    start = clock()
    runner.infer()
    while clock() - start < seconds:
        runner.infer()


def timed_round(runner: Runner, into: Measurement, seconds: float, iterations: int,
                tick: Callable[[float], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                window_clock: Callable[[], float] = time.monotonic) -> None:
    """Run until ``seconds`` have passed and ``iterations`` were done; wall time counts only here.

    ``clock`` times the loop (``wall_s``, the duration, progress ticks); ``window_clock`` stamps the round's
    window, on the clock the tegrastats sampler stamps its samples with (time.monotonic)."""
    start_mono, start = window_clock(), clock()
    done, last_tick = 0, start
    while True:
        into.records.append(runner.infer())
        done += 1
        now = clock()
        if tick and now - last_tick > 0.25:
            tick(now - last_tick)
            last_tick = now
        if now - start >= seconds and done >= iterations:
            break
    into.wall_s += now - start
    into.windows.append((start_mono, window_clock()))
    if tick:
        tick(now - last_tick)
