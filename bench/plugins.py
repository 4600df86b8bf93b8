"""DeiT-S ToMe r=13: the standard-op export vs the `--plugins` export (TokenMerge nodes) in ONNX Runtime CPU.

A CORRECTNESS comparison first: ONNX Runtime runs the plugin nodes through onnxruntime-extensions Python ops
(the numpy reference, copying through numpy), so their time here says nothing about the fused kernels; it is
printed, labelled, only to show what the Python ops cost. The kernels' speed is measured on a GPU by
tools/device_plugins_check.sh (bench/plugins_cuda.py).

    .venv/bin/python bench/plugins.py [--batch 1 8] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import timm
import torch

from edgetok.onnx.validate import ort_session
from edgetok.vit.export import ViTExportOptions, export_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights = Path(tmp) / "weights.pth"  # one set of weights for both exports
        torch.save(timm.create_model(args.model).state_dict(), weights)
        sessions, nodes = {}, {}
        for name, plugins in (("standard ops", False), ("--plugins", True)):
            out = Path(tmp) / f"{plugins}.onnx"
            export_vit(ViTExportOptions(model=args.model, checkpoint=str(weights), method="tome", r=args.r,
                                        plugins=plugins, output=str(out)))
            nodes[name] = len(onnx.load(str(out), load_external_data=False).graph.node)
            sessions[name] = ort_session(str(out))
        print(f"{args.model} ToMe r={args.r}, ONNX Runtime CPU: graph nodes {nodes['standard ops']} (standard ops) "
              f"vs {nodes['--plugins']} (--plugins)")
        for batch in args.batch:
            x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            outs = {name: s.run(None, {"pixel_values": x})[0] for name, s in sessions.items()}
            diff = float(np.abs(outs["standard ops"] - outs["--plugins"]).max())
            agree = float((outs["standard ops"].argmax(-1) == outs["--plugins"].argmax(-1)).mean())
            times = {name: [] for name in sessions}
            for _ in range(args.rounds):
                for name, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, {"pixel_values": x})
                    times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            print(f"batch {batch}: CORRECTNESS max |standard - plugins| {diff:.2e}, top-1 agreement {agree:.0%} "
                  f"({'equal' if diff <= 1e-5 else 'DIFFERENT'} within 1e-5)")
            print(f"batch {batch}: time (not the kernels' speed: Python reference ops) standard ops "
                  f"{med['standard ops']:.1f} ms, --plugins {med['--plugins']:.1f} ms, "
                  f"{args.rounds} interleaved rounds, medians")


if __name__ == "__main__":
    main()
