"""TokenMerge's launch plan: which of its Triton kernels (token_merge.py) run, in what order, on what grid and
arguments, and the scratch they share. Plain data without Triton, so the TensorRT plugin's enqueue (through
cuda-python and the cubins) and the Triton launcher (``run_torch``) make the very same launches."""

from __future__ import annotations

from edgetok.plugins.kernels.launches import Buffer, Kernel, KernelPlan, Launch

SOURCE = "edgetok.plugins.kernels.token_merge"  # the @triton.jit functions, by kernel name
NORM_BLOCK_N, NORM_BLOCK_D = 32, 64
MATCH_BLOCK_A, MATCH_BLOCK_B, MATCH_BLOCK_D = 32, 64, 32
RANK_BLOCK_A, RANK_BLOCK_J = 32, 128
MERGE_BLOCK_A, MERGE_BLOCK_C = 128, 256

KERNELS = (
    Kernel("tome_norm", SOURCE, (("metric_ptr", "*fp32"), ("norm_ptr", "*fp32"), ("N", "i32"), ("D", "i32")),
           {"BLOCK_N": NORM_BLOCK_N, "BLOCK_D": NORM_BLOCK_D}, num_warps=4, writes=("norm",)),
    Kernel("tome_match", SOURCE,
           (("metric_ptr", "*fp32"), ("norm_ptr", "*fp32"), ("best_ptr", "*fp32"), ("match_ptr", "*i32"),
            ("N", "i32"), ("D", "i32"), ("prefix", "i32")),
           {"BLOCK_A": MATCH_BLOCK_A, "BLOCK_B": MATCH_BLOCK_B, "BLOCK_D": MATCH_BLOCK_D}, num_warps=4, writes=("best", "match")),
    Kernel("tome_rank", SOURCE, (("best_ptr", "*fp32"), ("rank_ptr", "*i32"), ("N", "i32"), ("prefix", "i32")),
           {"BLOCK_A": RANK_BLOCK_A, "BLOCK_J": RANK_BLOCK_J}, num_warps=4, writes=("rank",)),
    Kernel("tome_slot", SOURCE,
           (("match_ptr", "*i32"), ("rank_ptr", "*i32"), ("kept_ptr", "*i32"), ("sources_ptr", "*i32"),
            ("N", "i32"), ("r", "i32"), ("prefix", "i32"), ("class_token", "i32")),
           {"BLOCK_A": RANK_BLOCK_A, "BLOCK_J": RANK_BLOCK_J}, num_warps=4, writes=("kept", "sources")),
    Kernel("tome_merge", SOURCE,
           (("x_ptr", "*fp32"), ("size_ptr", "*fp32"), ("match_ptr", "*i32"), ("rank_ptr", "*i32"),
            ("kept_ptr", "*i32"), ("sources_ptr", "*i32"), ("out_ptr", "*fp32"), ("out_size_ptr", "*fp32"),
            ("N", "i32"), ("C", "i32"), ("r", "i32"), ("prefix", "i32")),
           {"BLOCK_A": MERGE_BLOCK_A, "BLOCK_C": MERGE_BLOCK_C}, num_warps=4, writes=("merged", "merged_size")),
)
NORM, MATCH, RANK, SLOT, MERGE = KERNELS

_ALIGN = 256  # scratch regions start on 256-byte boundaries (cudaMalloc's alignment)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(shapes, fields: dict) -> KernelPlan:
    """The launches of one TokenMerge call on inputs of ``shapes`` ([x, metric, size]) with resolved fields.
    r == 0 launches only the merge kernel, which then copies (the reference returns its inputs unchanged)."""
    (batch, tokens, channels), (_, _, dim), _ = ([int(d) for d in s] for s in shapes)
    r, prefix, class_token = int(fields["r"]), int(fields["prefix"]), int(fields["class_token"])
    na = max(tokens - 2 * ((prefix + 1) // 2) + 1, 0) // 2
    regions, offset = {}, 0
    for name, dtype, count in (("norm", "float32", batch * tokens), ("best", "float32", batch * na),
                               ("match", "int32", batch * na), ("rank", "int32", batch * na),
                               ("kept", "int32", batch * na), ("sources", "int32", batch * na)):
        regions[name] = Buffer("scratch", offset, dtype, count)
        offset += _cdiv(4 * count, _ALIGN) * _ALIGN
    s = regions
    x, metric, size = Buffer("input", 0), Buffer("input", 1), Buffer("input", 2)
    merge = Launch(MERGE, (tokens - r, batch, 1), (x, size, s["match"], s["rank"], s["kept"], s["sources"],
                                                   Buffer("output", 0), Buffer("output", 1), tokens, channels, r, prefix))
    if batch == 0 or tokens - r == 0:
        return KernelPlan((), offset, s)
    if r == 0:
        return KernelPlan((merge,), offset, s)
    a_tiles = _cdiv(na, RANK_BLOCK_A)
    return KernelPlan((
        Launch(NORM, (_cdiv(tokens, NORM_BLOCK_N), batch, 1), (metric, s["norm"], tokens, dim)),
        Launch(MATCH, (_cdiv(na, MATCH_BLOCK_A), batch, 1),
               (metric, s["norm"], s["best"], s["match"], tokens, dim, prefix)),
        Launch(RANK, (a_tiles, batch, 1), (s["best"], s["rank"], tokens, prefix)),
        Launch(SLOT, (a_tiles, batch, 1), (s["match"], s["rank"], s["kept"], s["sources"], tokens, r, prefix, class_token)),
        merge,
    ), offset, s)
