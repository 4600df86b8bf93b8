"""TokenPrune's launch plan: its Triton kernels (token_prune.py), their grids, arguments and shared scratch.
Plain data without Triton, so the TensorRT plugin's enqueue and ``run_torch`` make the very same launches.
The plan needs only the input shapes: K is counted on the device and read there by the gather kernel."""

from __future__ import annotations

from edgetok.plugins.kernels.launches import Buffer, Kernel, KernelPlan, Launch

SOURCE = "edgetok.plugins.kernels.token_prune"
SCAN_BLOCK_N = 256  # one tile for DeiT's 197 tokens
COUNT_BLOCK_B = 128
GATHER_BLOCK_C = 256

KERNELS = (
    Kernel("prune_scan", SOURCE,
           (("size_ptr", "*fp32"), ("keep_ptr", "*fp32"), ("sources_ptr", "*i32"), ("counts_ptr", "*i32"),
            ("N", "i32"), ("prefix", "i32")),
           {"BLOCK_N": SCAN_BLOCK_N}, num_warps=4, writes=("sources", "counts")),
    Kernel("prune_count", SOURCE, (("counts_ptr", "*i32"), ("count_ptr", "*i64"), ("B", "i32")),
           {"BLOCK_B": COUNT_BLOCK_B}, num_warps=4, writes=("count",)),
    Kernel("prune_gather", SOURCE,
           (("x_ptr", "*fp32"), ("size_ptr", "*fp32"), ("sources_ptr", "*i32"), ("counts_ptr", "*i32"),
            ("count_ptr", "*i64"), ("out_ptr", "*fp32"), ("out_size_ptr", "*fp32"), ("N", "i32"), ("C", "i32")),
           {"BLOCK_C": GATHER_BLOCK_C}, num_warps=4, writes=("pruned", "pruned_size")),
)
SCAN, COUNT, GATHER = KERNELS

_ALIGN = 256  # scratch regions start on 256-byte boundaries (cudaMalloc's alignment)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(shapes, fields: dict) -> KernelPlan:
    """The launches of one TokenPrune call on inputs of ``shapes`` ([x, size, keep]) with resolved fields.
    An empty batch launches only the count kernel: the size tensor must still read 0."""
    (batch, tokens, channels) = (int(d) for d in shapes[0])
    prefix = int(fields["prefix"])
    regions, offset = {}, 0
    for name, count in (("sources", batch * tokens), ("counts", batch)):
        regions[name] = Buffer("scratch", offset, "int32", count)
        offset += _cdiv(4 * count, _ALIGN) * _ALIGN
    s = regions
    x, size, keep = Buffer("input", 0), Buffer("input", 1), Buffer("input", 2)
    count = Launch(COUNT, (1, 1, 1), (s["counts"], Buffer("output", 2), batch))
    if batch == 0:
        return KernelPlan((count,), offset, s)
    launches = [Launch(SCAN, (batch, 1, 1), (size, keep, s["sources"], s["counts"], tokens, prefix)), count]
    if tokens:
        launches.append(Launch(GATHER, (tokens, batch, 1), (x, size, s["sources"], s["counts"], Buffer("output", 2),
                                                            Buffer("output", 0), Buffer("output", 1), tokens, channels)))
    return KernelPlan(tuple(launches), offset, s)
