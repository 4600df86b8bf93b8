"""DeiT-S dense vs ToMe r=8/13/16 vs EViT 0.7 in PyTorch on a CUDA GPU: latency (CUDA events,
interleaved rounds, medians) against the FLOPs bound, and GPU-vs-CPU parity of the patched model.

    python bench/vit_reduction_cuda.py [--batch 1 64] [--rounds 30] [--dtype float16] [--cuda-graphs]

Eager PyTorch launches every small op of the merge from Python; --cuda-graphs replays each forward
as one CUDA graph, which takes launch overhead out (closer to what an engine does).
Needs a CUDA GPU (the lent device machine); edgetok's package on PYTHONPATH is enough.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import timm
import torch

from edgetok.vit.flops import vit_macs
from edgetok.vit.loading import from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit

VARIANTS = {
    "dense": dict(name="none"),
    "tome r=8": dict(name="tome", r=8),
    "tome r=13": dict(name="tome", r=13),
    "tome r=16": dict(name="tome", r=16),
    "evit 0.7": dict(name="evit", keep_rate=0.7),
}


def build(base, spec):
    vit = from_timm(copy.deepcopy(base), "deit_small_patch16_224")
    spec = dict(spec)
    plan = reduce_vit(vit, make_method(spec.pop("name"), vit.depth, **spec))
    return vit, plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--no-prop-attn", action="store_true",
                        help="diagnostic: ToMe without the log(size) bias (SDPA then needs no mask)")
    args = parser.parse_args()
    if args.no_prop_attn:
        from edgetok.vit.methods.tome_torch import ToMe

        ToMe.proportional_attention = False
    torch.manual_seed(0)
    base = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}")

    # Parity: the same patched model on GPU (fp32) and CPU.
    x = torch.randn(4, 3, 224, 224)
    for name, spec in VARIANTS.items():
        vit, _ = build(base, spec)
        with torch.no_grad():
            cpu = vit.module(x)
            gpu = vit.module.cuda()(x.cuda()).cpu()
        print(f"parity {name}: max |gpu-cpu| fp32 = {(gpu - cpu).abs().max():.2e}, "
              f"top-1 agreement {(gpu.argmax(-1) == cpu.argmax(-1)).float().mean():.0%}")

    dtype = getattr(torch, args.dtype)
    models, bounds = {}, {}
    dense_macs = None
    for name, spec in VARIANTS.items():
        vit, plan = build(base, spec)
        models[name] = vit.module.cuda().to(dtype)
        macs = vit_macs(vit, plan.tokens)
        dense_macs = dense_macs or macs
        bounds[name] = dense_macs / macs
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
        times = {name: [] for name in models}
        runs = {name: (lambda m=m: m(x)) for name, m in models.items()}
        with torch.no_grad():
            for run in runs.values():
                for _ in range(5):
                    run()
            torch.cuda.synchronize()
            if args.cuda_graphs:
                for name, m in models.items():
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        m(x)
                    runs[name] = graph.replay
            for _ in range(args.rounds):
                for name, run in runs.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    run()
                    end.record()
                    torch.cuda.synchronize()
                    times[name].append(start.elapsed_time(end))
        dense = statistics.median(times["dense"])
        mode = "CUDA graphs" if args.cuda_graphs else "eager"
        print(f"\nPyTorch {mode}, CUDA, {args.dtype}, batch {batch}, {args.rounds} interleaved rounds, medians")
        print("| model | median ms | im/s | measured speedup | FLOPs bound | measured / bound |")
        print("|---|---|---|---|---|---|")
        for name in models:
            med = statistics.median(times[name])
            print(f"| {name} | {med:.2f} | {batch / med * 1e3:.0f} | {dense / med:.2f}x | {bounds[name]:.2f}x | "
                  f"{dense / med / bounds[name]:.2f} |")


if __name__ == "__main__":
    main()
