"""Accuracy vs speed on edgetok's reference ViT (trained here on scikit-learn's digits): dense vs ToMe r,
PiToMe r, Zero-TPrune r and GTP p (the same GMACs as ToMe at each r = p) and EViT keep sweeps — held-out top-1, agreement
with dense, GMACs and ONNX Runtime CPU latency, all measured in this one run.

    .venv/bin/python bench/reference_tradeoff.py [--batch 64] [--duration 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgetok.profile.profiler import ProfileOptions, profile
from edgetok.vit import digits
from edgetok.workflows.evaluate import EvalOptions, evaluate
from edgetok.vit.export import ViTExportOptions, export_vit

VARIANTS = {"dense": dict(method="none")}
VARIANTS.update({f"tome r={r}": dict(method="tome", r=r) for r in (2, 4, 6, 8)})
VARIANTS.update({f"pitome r={r}": dict(method="pitome", r=r) for r in (2, 4, 6, 8)})  # ToMe's GMACs at each r
VARIANTS.update({f"zerotprune r={r}": dict(method="zerotprune", r=r) for r in (2, 4, 6, 8)})  # pruning: the same
VARIANTS.update({f"gtp p={p}": dict(method="gtp", propagate=str(p)) for p in (2, 4, 6, 8)})  # the same GMACs too
VARIANTS.update({f"evit {k}": dict(method="evit", keep_rate=k) for k in (0.9, 0.7, 0.5)})


def _round_progress(models: int, rounds: int):
    """profile()'s progress callback: a stderr line as each interleaved round starts."""
    seen = []

    def tick(label: str, seconds: float) -> None:
        if not seen or seen[-1] != label:
            seen.append(label)
            if len(seen) % models == 1 or models == 1:
                print(f"· timing round {(len(seen) - 1) // models + 1}/{rounds}", file=sys.stderr, flush=True)

    return tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = digits.write_heldout_folder(Path(tmp) / "heldout")["path"]
        paths, acc = {}, {}
        for name, opts in VARIANTS.items():
            out = Path(tmp) / f"{name.replace(' ', '_').replace('=', '')}.onnx"
            paths[name] = export_vit(ViTExportOptions(model=digits.NAME, output=str(out), **opts))["path"]
            acc[name] = evaluate(EvalOptions(model=paths[name], data=data, reference=paths["dense"]))
            print(f"· {name}: top-1 {acc[name]['top1']:.2%}, agreement with dense "
                  f"{acc[name]['reference']['top1_agreement']:.2%}", file=sys.stderr, flush=True)
        print(f"· profiling {len(paths)} models, {args.rounds} interleaved rounds of {args.duration:g} s each",
              file=sys.stderr, flush=True)
        result = profile(ProfileOptions(models=list(paths.values()), labels=list(paths), batch=args.batch,
                                        duration_s=args.duration, rounds=args.rounds), _round_progress(len(paths), args.rounds))
    print(f"{digits.NAME} ({digits.ASSET.name}, trained by tools/train_digits_vit.py), {acc['dense']['samples']} "
          f"held-out digits; ONNX Runtime CPU, batch {args.batch}, {args.rounds} interleaved rounds, medians")
    print("| model | top-1 | top-1 agreement with dense | GMACs | median ms | speedup | FLOPs bound |")
    print("|---|---|---|---|---|---|---|")
    for row in result["comparison"]:
        a = acc[row["name"]]
        print(f"| {row['name']} | {a['top1']:.2%} | {a['reference']['top1_agreement']:.2%} | {row['gmacs']:.4f} | "
              f"{row['median_ms']:.2f} | {row['speedup']:.2f}x | {row['flops_bound']:.2f}x |")


if __name__ == "__main__":
    main()
