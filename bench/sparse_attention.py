"""Block-sparse attention's trade-off on the reference model's held-out digits: for each mass, the share of
attention block pairs computed, top-1, and GMACs per image (attention counted from the kept pairs), against
dense attention. ONNX Runtime CPU (the BlockSparseAttention nodes run as Python reference ops: accuracy and
counts, no timing).

    .venv/bin/python bench/sparse_attention.py [--block 16] [--mass 1 0.99 0.95 0.9 0.8 0.6 0.4] [--keep 0.5 0.3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgetok.vit.digits import NAME, write_heldout_folder
from edgetok.workflows.evaluate import EvalOptions, evaluate
from edgetok.vit.export import ViTExportOptions, export_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--mass", type=float, nargs="+", default=[1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4])
    parser.add_argument("--keep", type=float, nargs="*", default=[0.5, 0.3])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_heldout_folder(Path(tmp) / "heldout")["path"]

        def run(**attention) -> dict:
            path = str(Path(tmp) / "model.onnx")
            side = export_vit(ViTExportOptions(model=NAME, output=path, **attention))
            return side, evaluate(EvalOptions(model=path, data=data, write_sidecar=False))

        side, dense = run()
        print(f"{NAME}, 539 held-out digits, block {args.block} ({-(-side['reduction']['tokens_per_layer'][0][0] // args.block)}"
              " blocks per row)")
        print(f"| attention | block pairs kept | top-1 | GMACs per image |\n|---|---|---|---|\n"
              f"| dense | 100% | {dense['top1']:.2%} | {side['flops']['dense_gmacs']:.4f} |")
        settings = [dict(attention_mass=m) for m in args.mass] + [dict(attention_keep=k) for k in args.keep]
        for setting in settings:
            _, result = run(attention="sparse", attention_block=args.block, **setting)
            kept = [t["mean"] for t in result["attention_kept"].values()]
            label = f"sparse, mass {setting['attention_mass']}" if "attention_mass" in setting else \
                f"sparse, keep {setting['attention_keep']}"
            print(f"| {label} | {sum(kept) / len(kept):.1%} | {result['top1']:.2%} | {result['gmacs']['mean']:.4f} |")


if __name__ == "__main__":
    main()
