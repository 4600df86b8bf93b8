"""What Zero-TPrune's unpublished details cost on the reference model, on its TRAINING split (never the held-out
digits accuracy is quoted on): top-1 at r = 6 and 8 per block for the head filter as the paper's bounds read on
N·s (0.01,0.7) and with every head (0,inf), and for the share of r the S stage prunes (0, 0.5, 1).

    .venv/bin/python bench/zerotprune_choices.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgetok.vit.digits import NAME, write_heldout_folder
from edgetok.workflows.evaluate import EvalOptions, evaluate
from edgetok.vit.export import ViTExportOptions, export_vit


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "train")
        write_heldout_folder(data, split="train")

        def top1(**method) -> float:
            path = str(Path(tmp) / "model.onnx")
            export_vit(ViTExportOptions(model=NAME, output=path, **method))
            return evaluate(EvalOptions(model=path, data=data, write_sidecar=False))["top1"]

        print(f"training split, dense: top-1 {top1(method='none'):.2%}")
        print("| r | --head-variance | --similarity-share 0 | 0.5 (default) | 1 |\n|---|---|---|---|---|")
        for r in (6, 8):
            for bounds in ("0.01,0.7", "0,inf"):
                cells = [f"{top1(method='zerotprune', r=r, head_variance=bounds, similarity_share=s):.2%}"
                         for s in (0.0, 0.5, 1.0)]
                print(f"| {r} | {bounds} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
