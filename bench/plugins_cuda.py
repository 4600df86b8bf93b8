"""On a GPU: the TokenMerge kernels against the standard-op step in PyTorch CUDA, and ToMe end to end.

1. One DeiT-S merge step (N=197, C=384, D=64, r=13), fp32, batch 1/8/64: the fused Triton kernels vs the
   standard-op step (bipartite_transform + apply_transform), each captured once as a CUDA graph so that the
   time is the GPU's, not Python's launch overhead — CUDA-event time per replay, the kernels' bytes moved per
   second, and that as a fraction of this GPU's measured copy bandwidth (target >= 50 % at 64). The two
   agree (edgetok.plugins.agreement) on every sample whose merge the reference decides by more than float32
   noise; a sample resting on a near tie may merge another pair on either side, both right.
2. The same kernels launched from their AOT cubins through cuda-python (the TensorRT plugins' path),
   checked equal to the JIT launch.
3. DeiT-S ToMe r=13 end to end in PyTorch (fp32): the patched model with the kernels vs without, and dense.

    python bench/plugins_cuda.py [--batch 1 8 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from edgetok.plugins import agreement, kernels
from edgetok.plugins.spec import get
from edgetok.plugins.token_merge import token_merge_margin
from edgetok.vit.token_transform import apply_transform
from edgetok.vit.methods.tome_torch import bipartite_transform


def cuda_ms(fn, calls: int = 100, rounds: int = 5) -> float:
    """Median over rounds of the mean time per call, from CUDA events around ``calls`` back-to-back calls."""
    for _ in range(10):
        fn()
    results = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) / calls)
    return statistics.median(results)


def as_graph(fn):
    """``fn`` captured as a CUDA graph (after a warm-up run, which also JIT-compiles the kernels): replaying
    it launches the same kernels with no Python in between."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


FAILED: list[str] = []  # checks past their tolerance: the script exits 1


def check(what: str, diff: float, tolerance: float = 1e-4) -> None:
    if not diff <= tolerance:
        FAILED.append(f"{what}: error {diff:.2e} > {tolerance:g}")


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write): the achievable bound here."""
    src = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), calls=20)
    return 2 * src.numel() * 4 / (ms / 1e3)


def step_table(batches, rounds) -> None:
    spec, tokens, channels, dim, r = get("TokenMerge"), 197, 384, 64, 13
    fields = {"r": r, "prefix": 1, "class_token": 1}
    peak = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {peak / 1e9:.0f} GB/s")
    print("| batch | standard ops ms | fused kernels ms | speedup | kernels GB/s | of copy bandwidth | error |")
    print("|---|---|---|---|---|---|---|")
    for batch in batches:
        gen = torch.Generator(device="cuda").manual_seed(batch)
        x = torch.randn(batch, tokens, channels, device="cuda", generator=gen)
        metric = torch.randn(batch, tokens, dim, device="cuda", generator=gen)
        size = torch.randint(1, 5, (batch, tokens, 1), device="cuda", generator=gen).float()

        def standard():
            return apply_transform(bipartite_transform(metric, r, 1, True), x, size, size)

        def fused():
            return kernels.run_torch(spec, [x, metric, size], fields)

        # both sides on this GPU, in different orders: samples whose merge rests on a near tie (a reference
        # margin within float32 noise) may merge other pairs with both right; the others must agree
        clear = torch.from_numpy(token_merge_margin(metric.cpu().numpy(), r, 1, 1) > agreement.noise(1.0))
        clear = clear.to("cuda")
        diff = max(agreement.value_error(a[clear].cpu().numpy(), b[clear].cpu().numpy())
                   for a, b in zip(standard(), fused()))
        check(f"fused vs standard step at batch {batch} ({int((~clear).sum())} near-tie samples left out)", diff,
              agreement.value_tolerance())
        t_std, t_fused = cuda_ms(as_graph(standard), rounds=rounds), cuda_ms(as_graph(fused), rounds=rounds)
        moved = 4 * batch * (tokens * (channels + dim + 1) + (tokens - r) * (channels + 1))
        rate = moved / (t_fused / 1e3)
        print(f"| {batch} | {t_std:.4f} | {t_fused:.4f} | {t_std / t_fused:.2f}x | {rate / 1e9:.0f} | "
              f"{rate / peak:.0%} | {diff:.1e} |")


def cubin_check() -> None:
    """The AOT cubins through cuda-python (as the TensorRT plugin's enqueue launches them) == the JIT launch."""
    import tempfile
    from pathlib import Path

    from edgetok.plugins import cubins, launch

    spec = get("TokenMerge")
    cc = "sm%d%d" % torch.cuda.get_device_capability()
    with tempfile.TemporaryDirectory() as tmp:
        bundle_file = Path(tmp) / "k.cubins.zip"
        cubins.write_bundle(bundle_file, [cc])
        bundle = cubins.Bundle.open(bundle_file)
        gen = torch.Generator(device="cuda").manual_seed(0)
        inputs = [torch.randn(8, 197, 384, device="cuda", generator=gen),
                  torch.randn(8, 197, 64, device="cuda", generator=gen),
                  torch.randint(1, 5, (8, 197, 1), device="cuda", generator=gen).float()]
        fields = {"r": 13, "prefix": 1, "class_token": 1}
        want = kernels.run_torch(spec, inputs, fields)
        shapes = [tuple(t.shape) for t in inputs]
        plan = kernels.module(spec).plan(shapes, spec.validate(shapes, fields))
        got = [torch.empty_like(w) for w in want]
        workspace = torch.empty(launch.workspace_size(plan, bundle), dtype=torch.uint8, device="cuda")
        launch.Launcher(bundle).run(plan, [t.data_ptr() for t in inputs], [t.data_ptr() for t in got],
                                    workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        diff = max(float((a - b).abs().max()) for a, b in zip(want, got))
        check(f"cubin launch ({cc}) vs Triton JIT", diff, 0.0)
        print(f"cubin launch ({cc}) through cuda-python vs Triton JIT: max |diff| {diff:.1e}")


def end_to_end(batches, rounds) -> None:
    from edgetok.vit.loading import load_vit
    from edgetok.vit.methods import make_method
    from edgetok.vit.reduction import reduce_vit

    models = {}
    for name, method, plugins in (("dense", None, False), ("tome r=13", "tome", False),
                                  ("tome r=13 + kernels", "tome", True)):
        torch.manual_seed(0)
        vit = load_vit("deit_small_patch16_224")
        if method:
            reduce_vit(vit, make_method(method, vit.depth, r=13), plugins=plugins)
        models[name] = vit.module.cuda().eval()
    print("| batch | " + " | ".join(f"{n} ms" for n in models) + " | kernels vs standard ops |")
    print("|---|" + "---|" * (len(models) + 1))
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        with torch.no_grad():
            check(f"DeiT-S ToMe r=13 with vs without kernels at batch {batch}",
                  float((models["tome r=13"](x) - models["tome r=13 + kernels"](x)).abs().max()), 1e-3)
            ms = {name: cuda_ms(lambda m=m: m(x), calls=20, rounds=rounds) for name, m in models.items()}
        print(f"| {batch} | " + " | ".join(f"{v:.2f}" for v in ms.values())
              + f" | {ms['tome r=13'] / ms['tome r=13 + kernels']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/plugins_cuda.py needs a CUDA GPU (use bench/plugins.py on a CPU)")
    step_table(args.batch, args.rounds)
    cubin_check()
    end_to_end(args.batch, args.rounds)
    if FAILED:
        raise SystemExit("MISMATCH: " + "; ".join(FAILED))


if __name__ == "__main__":
    main()
