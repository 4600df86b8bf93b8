"""TensorRT-RTX build time and engine size on this CPU: DeiT-S dense vs ToMe r=13, fp32 vs fp16.

    .venv/bin/python bench/build_time.py [--model deit_small_patch16_224] [--batch 1:8:32]
Each build runs in its own child process (as `edgetok build-engine` does); times are the builder's
own wall time, plus the fp16 conversion and its validation where that applies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from edgetok.engine.build import build_engine
from edgetok.engine.options import BuildOptions
from edgetok.vit.export import ViTExportOptions, export_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch", default="1:8:32")
    parser.add_argument("--targets", default="sm86,sm89,sm120")
    args = parser.parse_args()
    print(f"{args.model}, TensorRT-RTX AOT on this CPU, batch {args.batch}, targets {args.targets}", flush=True)
    print("| model | precision | builder s | total s (incl. fp16 conversion, child start) | engine MB | network layers |")
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, method in [("dense", dict(method="none")), ("tome r=13", dict(method="tome", r=13))]:
            onnx_path = Path(tmp) / f"{name.replace(' ', '_').replace('=', '')}.onnx"
            print(f"· exporting {name}", file=sys.stderr, flush=True)
            export_vit(ViTExportOptions(model=args.model, output=str(onnx_path), **method))
            for precision in ("fp32", "fp16"):
                print(f"· building {name} {precision} (minutes on a CPU)", file=sys.stderr, flush=True)
                start = time.perf_counter()
                report = build_engine(BuildOptions(onnx=str(onnx_path), backend="tensorrt-rtx", precision=precision,
                                                   batch=args.batch, targets=args.targets.split(",")))
                total = time.perf_counter() - start
                print(f"| {name} | {precision} | {report['build_seconds']:.1f} | {total:.1f} | "
                      f"{report['engine']['bytes'] / 1e6:.1f} | {report['network_layers']['count']} |", flush=True)
    print(f"TensorRT-RTX {report['backend']['version']}")


if __name__ == "__main__":
    main()
