"""On a GPU: SizeBiasedAttention's Triton kernels against PyTorch SDPA with the same float mask (log size) and
SDPA without a mask (its fastest kernels), DeiT-S heads (H=6, D=64), fp32, N = 197 / 785 / 1025 (224, 448 and
512 px at /16), batch 1 and 32. CUDA-event time per call (each captured as a CUDA graph, so the time is the
GPU's), the ratios to both SDPA forms, and the error against the masked SDPA: relative to its largest value,
within float32's noise at the logits' magnitude (edgetok.plugins.agreement), else the script exits 1.
Then BlockSparseAttention (blocks of 64, ``keep`` fixing the fraction of key blocks) against dense flash
attention — our SizeBiasedAttention and SDPA — at N = 1025 and 4097, batch 1 (the issue's target: at 25 %
of the blocks kept, >= 2.5x faster than dense at N = 4097).

    python bench/attention_cuda.py [--tokens 197 785 1025] [--batch 1 32] [--sparse-tokens 1025 4097]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from edgetok.plugins import agreement, kernels
from edgetok.plugins.spec import get

HEADS, DIM = 6, 64


def graph_ms(fn, calls: int = 50, rounds: int = 5) -> float:
    """Median over rounds of the time per replay of ``fn`` captured as a CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    results = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            graph.replay()
        end.record()
        end.synchronize()
        results.append(start.elapsed_time(end) / calls)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 785, 1025])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--sparse-tokens", type=int, nargs="+", default=[1025, 4097])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention_cuda.py needs a CUDA GPU")
    spec = get("SizeBiasedAttention")
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}: SizeBiasedAttention (Triton, fp32 IEEE dots) vs SDPA, H={HEADS} D={DIM}")
    print(f"{'N':>5} {'B':>3} {'plugin ms':>10} {'SDPA+mask ms':>13} {'SDPA ms':>8} {'vs masked':>10} {'vs unmasked':>12}"
          f" {'error':>9} {'tolerance':>9}")
    failed = []
    for tokens in args.tokens:
        for batch in args.batch:
            q, k, v = (torch.randn(batch, HEADS, tokens, DIM, device="cuda", generator=gen) for _ in range(3))
            size = torch.randint(1, 5, (batch, tokens, 1), device="cuda", generator=gen).float()
            mask = size[..., 0].log()[:, None, None, :]
            torch.backends.cuda.matmul.allow_tf32 = False
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            got = kernels.run_torch(spec, [q, k, v, size], {"scale": 0.0})[0]
            err = agreement.value_error(got.cpu().numpy(), want.cpu().numpy())
            tolerance = agreement.value_tolerance(agreement.dot_magnitude(q, k, DIM ** -0.5))
            if not err <= tolerance:
                failed.append(f"N={tokens} B={batch}: error {err:.1e} > {tolerance:.1e}")
            plugin = graph_ms(lambda: kernels.run_torch(spec, [q, k, v, size], {"scale": 0.0}))
            masked = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            plain = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            print(f"{tokens:>5} {batch:>3} {plugin:>10.4f} {masked:>13.4f} {plain:>8.4f} {masked / plugin:>9.2f}x "
                  f"{plain / plugin:>11.2f}x {err:>9.1e} {tolerance:>9.1e}")
    sparse = get("BlockSparseAttention")
    print(f"\nBlockSparseAttention (block 64) vs dense, batch 1, H={HEADS} D={DIM}")
    print(f"{'N':>5} {'keep':>5} {'pairs kept':>10} {'sparse ms':>10} {'dense (ours) ms':>16} {'SDPA ms':>8} "
          f"{'vs ours':>8} {'vs SDPA':>8}")
    for tokens in args.sparse_tokens:
        q, k, v = (torch.randn(1, HEADS, tokens, DIM, device="cuda", generator=gen) for _ in range(3))
        size = torch.ones(1, tokens, 1, device="cuda")
        dense = graph_ms(lambda: kernels.run_torch(spec, [q, k, v, size], {"scale": 0.0}))
        plain = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        for keep in (1.0, 0.5, 0.25, 0.1):
            fields = {"block": 64, "keep": keep, "mass": 1.0, "scale": 0.0, "prefix": 1}
            kept = float(kernels.run_torch(sparse, [q, k, v, size], fields)[1][0])
            ms = graph_ms(lambda: kernels.run_torch(sparse, [q, k, v, size], fields))
            print(f"{tokens:>5} {keep:>5} {kept:>10.1%} {ms:>10.4f} {dense:>16.4f} {plain:>8.4f} {dense / ms:>7.2f}x "
                  f"{plain / ms:>7.2f}x")
    if failed:
        raise SystemExit("MISMATCH: SizeBiasedAttention vs SDPA: " + "; ".join(failed))


if __name__ == "__main__":
    main()
