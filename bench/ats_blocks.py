"""Where ATS should sample on the reference model, chosen on its TRAINING split (never on the held-out digits
that accuracy is quoted on): ATS in blocks s..last for every first block s, top-1 and tokens kept, and the
earliest s whose top-1 is within 1 point of dense there. That choice is the model's own default
(`edgetok/vit/digits.py` METHOD_DEFAULTS), used when `--ats-blocks` is not given.

    .venv/bin/python bench/ats_blocks.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgetok.vit.digits import NAME, write_heldout_folder
from edgetok.workflows.evaluate import EvalOptions, evaluate
from edgetok.vit.export import ViTExportOptions, export_vit
from edgetok.vit.loading import load_vit

MARGIN = 0.01  # top-1 on the training split may fall this much below dense


def main() -> None:
    depth = load_vit(NAME).depth
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "train")
        write_heldout_folder(data, split="train")

        def run(**method) -> dict:
            path = str(Path(tmp) / "model.onnx")
            export_vit(ViTExportOptions(model=NAME, output=path, **method))
            return evaluate(EvalOptions(model=path, data=data, write_sidecar=False))

        dense = run(method="none")["top1"]
        print(f"training split, dense: top-1 {dense:.2%}")
        chosen = None
        for first in range(1, depth):
            blocks = list(range(first, depth))
            result = run(method="ats", ats_blocks=blocks)
            last = result["tokens_kept"][str(depth - 1)]
            ok = result["top1"] >= dense - MARGIN
            chosen = blocks if ok and chosen is None else chosen
            print(f"ats blocks {first}-{depth - 1}: top-1 {result['top1']:.2%} ({result['top1'] - dense:+.2%}), "
                  f"tokens after the last block {last['mean']:.1f} [{last['min']}-{last['max']}]"
                  + ("  within 1 point" if ok else ""))
        print(f"chosen: blocks {','.join(map(str, chosen or []))} (the earliest first block within 1 point of dense)")


if __name__ == "__main__":
    main()
