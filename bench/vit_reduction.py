"""DeiT-S dense vs ToMe r=8/13/16 vs EViT 0.7 on ONNX Runtime CPU: measured speedup against the
FLOPs bound, all models timed in one run, interleaved round by round, medians.

    .venv/bin/python bench/vit_reduction.py [--batch 8] [--rounds 15] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetok.onnx.validate import ort_session
from edgetok.vit.export import ViTExportOptions, export_vit

VARIANTS = {
    "dense": dict(method="none"),
    "tome r=8": dict(method="tome", r=8),
    "tome r=13": dict(method="tome", r=13),
    "tome r=16": dict(method="tome", r=16),
    "evit 0.7": dict(method="evit", keep_rate=0.7),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: all cores)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sessions, sidecars = {}, {}
        for name, opts in VARIANTS.items():
            out = Path(tmp) / f"{name.replace(' ', '_').replace('=', '')}.onnx"
            print(f"· exporting {name}", file=sys.stderr, flush=True)
            sidecars[name] = export_vit(ViTExportOptions(model=args.model, output=str(out), **opts))
            sessions[name] = ort_session(str(out), args.threads)
        x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
        times = {name: [] for name in VARIANTS}
        for name, s in sessions.items():  # warm-up
            s.run(None, {"pixel_values": x})
        for i in range(args.rounds):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"pixel_values": x})
                times[name].append(time.perf_counter() - start)
            print(f"· round {i + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()),
                  file=sys.stderr, flush=True)

    dense = statistics.median(times["dense"])
    print(f"{args.model}, ONNX Runtime CPU, batch {args.batch}, threads {args.threads or 'all'}, spinning off, "
          f"{args.rounds} interleaved rounds, medians")
    print("| model | GMACs | median ms | measured speedup | FLOPs bound | measured / bound |")
    print("|---|---|---|---|---|---|")
    for name in VARIANTS:
        med = statistics.median(times[name])
        bound = sidecars[name]["flops"]["speedup_bound"]
        speedup = dense / med
        print(f"| {name} | {sidecars[name]['flops']['reduced_gmacs']:.2f} | {med * 1e3:.0f} | {speedup:.2f}x | "
              f"{bound:.2f}x | {speedup / bound:.2f} |")
    ratio = dense / statistics.median(times["tome r=13"]) / sidecars["tome r=13"]["flops"]["speedup_bound"]
    print(f"target: tome r=13 measured/bound >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'} ({ratio:.2f})")


if __name__ == "__main__":
    main()
