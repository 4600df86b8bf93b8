"""BlockSparseAttention's launch plan: its Triton kernels (block_sparse_attention.py), grids, arguments and
scratch. Plain data without Triton, so the TensorRT plugin's enqueue and ``run_torch`` make the same launches."""

from __future__ import annotations

from edgetok.plugins.block_sparse_attention import MAX_BLOCKS, MIN_BLOCK, blocks_of
from edgetok.plugins.kernels.launches import Buffer, Kernel, KernelPlan, Launch
from edgetok.plugins.size_biased_attention import MAX_HEAD_DIM, scale_of

SOURCE = "edgetok.plugins.kernels.block_sparse_attention"
TILE = MIN_BLOCK
BLOCK_J = MAX_BLOCKS
BLOCK_D = MAX_HEAD_DIM

_SPARSE_PARAMS = (("q_ptr", "*fp32"), ("k_ptr", "*fp32"), ("v_ptr", "*fp32"), ("size_ptr", "*fp32"),
                  ("selected_ptr", "*i32"), ("out_ptr", "*fp32"), ("H", "i32"), ("N", "i32"), ("D", "i32"),
                  ("block", "i32"), ("scale", "fp32"))
KERNELS = (
    Kernel("bsa_pool", SOURCE,
           (("q_ptr", "*fp32"), ("k_ptr", "*fp32"), ("size_ptr", "*fp32"), ("qbar_ptr", "*fp32"),
            ("kbar_ptr", "*fp32"), ("weight_ptr", "*fp32"), ("H", "i32"), ("N", "i32"), ("D", "i32"), ("block", "i32")),
           {"TILE": TILE, "BLOCK_D": BLOCK_D}, num_warps=4, writes=("qbar", "kbar", "weight")),
    Kernel("bsa_select", SOURCE,
           (("qbar_ptr", "*fp32"), ("kbar_ptr", "*fp32"), ("weight_ptr", "*fp32"), ("selected_ptr", "*i32"),
            ("row_kept_ptr", "*i32"), ("N", "i32"), ("D", "i32"), ("block", "i32"), ("scale", "fp32"),
            ("mass", "fp32"), ("keep", "fp32"), ("prefix", "i32")),
           {"BLOCK_J": BLOCK_J, "BLOCK_D": BLOCK_D}, num_warps=4, writes=("selected",)),
    Kernel("bsa_kept", SOURCE,
           (("weight_ptr", "*fp32"), ("row_kept_ptr", "*i32"), ("kept_ptr", "*fp32"), ("H", "i32"), ("N", "i32"),
            ("block", "i32")),
           {"BLOCK_J": BLOCK_J}, num_warps=4, writes=("kept",)),
    Kernel("bsa_sparse_d64", SOURCE, _SPARSE_PARAMS, {"TILE": TILE}, num_warps=4, writes=("out",)),
    Kernel("bsa_sparse_d128", SOURCE, _SPARSE_PARAMS, {"TILE": TILE}, num_warps=4, writes=("out",)),
)
POOL, SELECT, KEPT, SPARSE_D64, SPARSE_D128 = KERNELS

_ALIGN = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(shapes, fields: dict) -> KernelPlan:
    """The launches of one call on inputs of ``shapes`` ([q, k, v, size]) with resolved fields."""
    batch, heads, tokens, dim = (int(d) for d in shapes[0])
    block = int(fields["block"])
    nb = blocks_of(tokens, block)
    scale = scale_of(dim, fields["scale"])
    regions, offset = {}, 0
    for name, dtype, count in (("qbar", "float32", batch * heads * nb * dim), ("kbar", "float32", batch * heads * nb * dim),
                               ("weight", "float32", batch * heads * nb), ("selected", "int32", batch * heads * nb * nb),
                               ("row_kept", "int32", batch * heads * nb)):
        regions[name] = Buffer("scratch", offset, dtype, count)
        offset += _cdiv(4 * count, _ALIGN) * _ALIGN
    if batch == 0:
        return KernelPlan((), offset, regions)
    r = regions
    q, k, v, size = (Buffer("input", i) for i in range(4))
    sparse = SPARSE_D64 if dim <= 64 else SPARSE_D128
    bh = batch * heads
    return KernelPlan((
        Launch(POOL, (nb, bh, 1), (q, k, size, r["qbar"], r["kbar"], r["weight"], heads, tokens, dim, block)),
        Launch(SELECT, (nb, bh, 1), (r["qbar"], r["kbar"], r["weight"], r["selected"], r["row_kept"], tokens, dim,
                                     block, scale, float(fields["mass"]), float(fields["keep"]), int(fields["prefix"]))),
        Launch(KEPT, (batch, 1, 1), (r["weight"], r["row_kept"], Buffer("output", 1), heads, tokens, block)),
        Launch(sparse, (_cdiv(tokens, TILE), bh, 1),
               (q, k, v, size, r["selected"], Buffer("output", 0), heads, tokens, dim, block, scale)),
    ), offset, r)
