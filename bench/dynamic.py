"""Data-dependent reduction on the reference model's held-out digits, batch 1, ONNX Runtime CPU: tokens kept
per image, top-1, GMACs per image, and latency against dense and against ToMe at about the same mean GMACs.

The data-dependent steps run as TokenPrune plugin nodes, which ONNX Runtime executes as Python
reference ops (onnxruntime-extensions, through numpy): their latency here is a CORRECTNESS run, not the fused
kernels' speed; it is printed labelled so. The kernels' speed needs a GPU: `--torch cuda` runs the same
models in PyTorch, where the prune is the TokenPrune Triton kernels (tools/device_plugins_check.sh runs it);
`--torch cpu` is that path on the CPU (eager ops).

    .venv/bin/python bench/dynamic.py [--images 539] [--torch cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetok.vit.digits import write_heldout_folder
from edgetok.images import image_folder
from edgetok.workflows.evaluate import Predictor
from edgetok.vit.export import ViTExportOptions, export_vit
from edgetok.vit.flops import vit_macs
from edgetok.vit.loading import load_vit

MODEL = "edgetok_digits_vit"


def per_image_gmacs(vit, kept: dict[int, list[int]], images: int) -> list[float]:
    """GMACs of each image from the tokens it kept after each data-dependent block."""
    out = []
    for i in range(images):
        n, tokens = vit.num_tokens, []
        for block in range(vit.depth):
            after = kept[block][i] if block in kept else n
            tokens.append((n, after))
            n = after
        out.append(vit_macs(vit, tokens) / 1e9)
    return out


class TorchModel:
    """An export's patched PyTorch model (re-created from its sidecar, as `profile --backend torch` does), on
    ``device``: on a GPU its prune runs as the TokenPrune Triton kernels. Times with CUDA events there."""

    def __init__(self, onnx_path: str, device: str):
        import torch

        from edgetok.runtime.runners import TorchRunner

        self.torch, self.device = torch, device
        self.module = TorchRunner(onnx_path, device, 1, False).module
        self.state = next((b._edgetok_state for b in self.module.modules() if hasattr(b, "_edgetok_layer")), None)
        self.tokens_kept = None
        if self.state is not None and getattr(self.state.method, "data_dependent", False):
            self.tokens_kept = {}
            for block in (b for b in self.module.modules() if hasattr(b, "_edgetok_layer")):
                layer = block._edgetok_layer
                if self.state.amounts[layer]:  # tokens each image keeps after this block
                    block.register_forward_hook(lambda m, a, o, layer=layer: self.tokens_kept.setdefault(layer, []).extend(
                        (self.state.size[..., 0] > 0).sum(dim=1).tolist()))

    def __call__(self, images):
        torch = self.torch
        with torch.no_grad():
            logits = self.module(torch.from_numpy(images).to(self.device))
        if self.device == "cuda":
            torch.cuda.synchronize()
        return logits.cpu().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=539)
    parser.add_argument("--torch", choices=["cpu", "cuda"], help="time the patched PyTorch models instead of ONNX Runtime")
    args = parser.parse_args()
    vit = load_vit(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_heldout_folder(Path(tmp) / "heldout")["path"]
        dataset = image_folder(folder, vit.preprocessing)
        count = min(args.images, len(dataset))
        images = [dataset[i][0].numpy()[None] for i in range(count)]
        labels = np.array([dataset[i][1] for i in range(count)])
        train = write_heldout_folder(Path(tmp) / "train", "train")["path"]  # dtome calibrates on the training split
        variants = {"dense": dict(method="none"), "ats (defaults: blocks 4-5)": dict(method="ats"),
                    "dtome r=8 (recipe digits_dtome)": dict(method="dtome", r=8, calibrate=train)}
        variants.update({f"tome r={r}": dict(method="tome", r=r) for r in (2, 4, 6, 8)})
        predictors, gmacs, tokens = {}, {}, {}
        for name, opts in variants.items():
            out = Path(tmp) / f"{len(predictors)}.onnx"
            side = export_vit(ViTExportOptions(model=MODEL, output=str(out), **opts))
            predictors[name] = Predictor(str(out), 1) if not args.torch else TorchModel(str(out), args.torch)
            gmacs[name] = side["flops"]["reduced_gmacs"]
            tokens[name] = str(side["reduction"]["tokens_per_layer"][-1][1])  # fixed methods: after the last block
        times = {name: [] for name in predictors}
        correct = {name: 0 for name in predictors}
        for i, x in enumerate(images):  # interleaved: every model on each image in turn
            for name, predictor in predictors.items():
                start = time.perf_counter()
                logits = predictor(x)
                times[name].append(time.perf_counter() - start)
                correct[name] += int(logits.argmax() == labels[i])
            if (i + 1) % 100 == 0 or i + 1 == count:  # the table needs every image: say how far it is
                print(f"· {i + 1}/{count} images through all {len(predictors)} models", file=sys.stderr, flush=True)
        dynamic = [n for n, p in predictors.items() if getattr(p, "tokens_kept", None)]
        for name in dynamic:
            per_image = per_image_gmacs(vit, predictors[name].tokens_kept, count)
            gmacs[name] = float(np.mean(per_image))
            last = predictors[name].tokens_kept[max(predictors[name].tokens_kept)]
            tokens[name] = f"{np.mean(last):.1f} [{min(last)}-{max(last)}]"
            hist = np.bincount(last)
            print(f"{name}: tokens after the last sampling block per image: mean {np.mean(last):.1f}, min "
                  f"{min(last)}, max {max(last)}; histogram (tokens: images) "
                  + ", ".join(f"{k}: {v}" for k, v in enumerate(hist) if v))
            print(f"{name}: GMACs per image mean {np.mean(per_image):.4f} [{min(per_image):.4f}-{max(per_image):.4f}]")
        where = f"PyTorch {args.torch}" if args.torch else "ONNX Runtime CPU"
        print(f"{MODEL}, {count} held-out digits, batch 1, {where}, interleaved, medians")
        print("| model | top-1 | mean GMACs per image | tokens after the last block: mean [min-max] | median ms |")
        print("|---|---|---|---|---|")
        for name in predictors:  # the table in docs/methods/dynamic.md, row for row
            ms = statistics.median(times[name]) * 1e3
            note = " (correctness run: plugin nodes as Python ops)" if name in dynamic and not args.torch else ""
            print(f"| {name} | {correct[name] / count:.2%} | {gmacs[name]:.4f} | {tokens[name]} | {ms:.2f}{note} |")
        for name in dynamic:
            closest = min((n for n in predictors if n.startswith("tome")), key=lambda n: abs(gmacs[n] - gmacs[name]))
            print(f"{name} vs ToMe at about the same mean GMACs ({closest}, {gmacs[closest]:.4f}): top-1 "
                  f"{correct[name] / count:.2%} vs {correct[closest] / count:.2%}")


if __name__ == "__main__":
    main()
