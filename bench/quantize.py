"""Precision on the reference model: fp32, fp16, int8, fp8 (× dense, ToMe r=6, EViT 0.7) — held-out top-1 and top-1
agreement with the fp32 export (ONNX Runtime CPU: the fp16 row runs the fp16-converted ONNX build-engine would
parse, the int8/fp8 rows the Q/DQ models), and the size of the TensorRT-RTX engine built from each (AOT, on the
CPU; fp8 for sm89 only, the others for the default targets). Speed needs a GPU: no engine runs here.

    .venv/bin/python bench/quantize.py [--samples 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

from edgetok.engine.build import build_engine
from edgetok.engine.options import BuildOptions
from edgetok.onnx.fp16 import convert_to_fp16
from edgetok.vit import digits
from edgetok.workflows.evaluate import EvalOptions, evaluate
from edgetok.vit.export import ViTExportOptions, export_vit
from edgetok.workflows.quantize import QuantizeOptions, quantize

METHODS = {"dense": dict(method="none"), "tome r=6": dict(method="tome", r=6), "evit 0.7": dict(method="evit", keep_rate=0.7)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = digits.write_heldout_folder(tmp / "train", split="train")["path"]
        heldout = digits.write_heldout_folder(tmp / "heldout")["path"]
        print(f"{digits.NAME}, 539 held-out digits; int8 calibrated on {args.samples} training images; engines: "
              "TensorRT-RTX, AOT on the CPU")
        print("| model | precision | top-1 | top-1 agreement with fp32 | engine MB |")
        print("|---|---|---|---|---|")
        for name, method in METHODS.items():
            folder = tmp / name.replace(" ", "_").replace("=", "")
            fp32 = export_vit(ViTExportOptions(model=digits.NAME, output=str(folder / "fp32.onnx"), **method))["path"]
            fp16 = folder / "fp16.onnx"
            convert_to_fp16(Path(fp32), fp16)
            (folder / "fp16.edgetok.json").write_text((folder / "fp32.edgetok.json").read_text())
            int8 = quantize(QuantizeOptions(model=fp32, calibrate=train, samples=args.samples))["path"]
            rows = [("fp32", fp32, "fp32"), ("fp16", fp32, "fp16"), ("int8", int8, "fp32")]
            if importlib.util.find_spec("modelopt"):
                rows.append(("fp8", quantize(QuantizeOptions(model=fp32, calibrate=train, samples=args.samples,
                                                             mode="fp8", targets=["sm89"]))["path"], "fp32"))
            for precision, onnx_path, build_precision in rows:
                evaluated = str(fp16) if precision == "fp16" else onnx_path
                result = evaluate(EvalOptions(model=evaluated, data=heldout, write_sidecar=False,
                                              reference=None if precision == "fp32" else fp32))
                engine = build_engine(BuildOptions(onnx=onnx_path, backend="tensorrt-rtx", precision=build_precision,
                                                   batch="1:8:64", output=str(folder / f"{precision}.engine"),
                                                   targets=["sm89"] if precision == "fp8" else []))
                agreement = "–" if precision == "fp32" else f"{result['reference']['top1_agreement']:.2%}"
                print(f"| {name} | {precision} | {result['top1']:.2%} | {agreement} | "
                      f"{engine['engine']['bytes'] / 2**20:.2f} |")
        if not importlib.util.find_spec("modelopt"):
            print("fp8: not measured (NVIDIA Model Optimizer is not installed: pip install -e '.[fp8]')")


if __name__ == "__main__":
    main()
