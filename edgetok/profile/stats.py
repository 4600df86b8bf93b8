"""trtexec-style summary statistics of per-inference timings."""

from __future__ import annotations

import numpy as np

PERCENTILES = (90, 95, 99)
UNSTABLE_CV = 0.025  # trtexec warns when the coefficient of variation of compute time exceeds 2.5 %


def summarize(seconds: list[float]) -> dict:
    """min/mean/median/percentiles/max/stdev in milliseconds, and the coefficient of variation."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    out = {
        "min": float(ms.min()),
        "mean": mean,
        "median": float(np.percentile(ms, 50)),
        **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES},
        "max": float(ms.max()),
        "stdev": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
    }
    out["cv"] = out["stdev"] / mean if mean > 0 else 0.0
    return out


def warnings_for(stats: dict) -> list[str]:
    """trtexec's advice, from the timings a runner could measure."""
    notes = []
    compute = stats.get("compute") or stats["latency"]
    if compute["cv"] > UNSTABLE_CV:
        notes.append(
            f"unstable: the coefficient of variation of {'compute' if 'compute' in stats else 'latency'} time is "
            f"{compute['cv']:.1%} (> {UNSTABLE_CV:.1%}); lock clocks and close other work"
        )
    if "enqueue" in stats and "compute" in stats and stats["enqueue"]["median"] > 0.8 * stats["compute"]["median"]:
        notes.append("enqueue-bound: launching work takes as long as running it; try CUDA graphs (--cuda-graphs)")
    for leg in ("h2d", "d2h"):
        if leg in stats and "compute" in stats and stats[leg]["median"] > stats["compute"]["median"]:
            notes.append(f"{leg.upper()}-bound: the {leg.upper()} copy takes longer than the compute")
    return notes
