"""SizeBiasedAttention's launch plan: its Triton kernels (size_biased_attention.py), grids, arguments and
scratch. Plain data without Triton, so the TensorRT plugin's enqueue and ``run_torch`` make the same launches."""

from __future__ import annotations

from edgetok.plugins.kernels.launches import Buffer, Kernel, KernelPlan, Launch
from edgetok.plugins.size_biased_attention import scale_of

SOURCE = "edgetok.plugins.kernels.size_biased_attention"
# head tile -> (query tile, key tile): float32 operands, so tiles stay small enough for 48 KiB of shared memory
ATTEND_TILES = {64: (32, 32), 128: (16, 16)}
ROW_BLOCK_N = 64

_ATTEND_PARAMS = (("q_ptr", "*fp32"), ("k_ptr", "*fp32"), ("v_ptr", "*fp32"), ("size_ptr", "*fp32"),
                  ("out_ptr", "*fp32"), ("lse_ptr", "*fp32"), ("class_heads_ptr", "*fp32"), ("H", "i32"), ("N", "i32"), ("D", "i32"),
                  ("scale", "fp32"))
KERNELS = (
    Kernel("sba_attend_d64", SOURCE, _ATTEND_PARAMS, {"BLOCK_M": ATTEND_TILES[64][0], "BLOCK_N": ATTEND_TILES[64][1]},
           num_warps=4, writes=("out", "lse")),
    Kernel("sba_attend_d128", SOURCE, _ATTEND_PARAMS, {"BLOCK_M": ATTEND_TILES[128][0], "BLOCK_N": ATTEND_TILES[128][1]},
           num_warps=4, writes=("out", "lse")),
    Kernel("sba_class_row", SOURCE,
           (("class_heads_ptr", "*fp32"), ("class_ptr", "*fp32"), ("H", "i32"), ("N", "i32")),
           {"BLOCK_N": ROW_BLOCK_N}, num_warps=4, writes=("class_attn",)),
)
ATTEND_D64, ATTEND_D128, CLASS_ROW = KERNELS

_ALIGN = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(shapes, fields: dict) -> KernelPlan:
    """The launches of one call on inputs of ``shapes`` ([q, k, v, size]) with resolved fields."""
    batch, heads, tokens, dim = (int(d) for d in shapes[0])
    scale = scale_of(dim, fields["scale"])
    region = _cdiv(4 * batch * heads * tokens, _ALIGN) * _ALIGN
    # per (image, head, query): its log-sum-exp; per (image, head, key): the class token's probability
    lse = Buffer("scratch", 0, "float32", batch * heads * tokens)
    class_heads = Buffer("scratch", region, "float32", batch * heads * tokens)
    regions = {"lse": lse, "class_heads": class_heads}
    scratch = 2 * region
    if batch == 0:
        return KernelPlan((), scratch, regions)
    q, k, v, size = (Buffer("input", i) for i in range(4))
    attend = ATTEND_D64 if dim <= 64 else ATTEND_D128
    return KernelPlan((
        Launch(attend, (_cdiv(tokens, attend.constexprs["BLOCK_M"]), batch * heads, 1),
               (q, k, v, size, Buffer("output", 0), lse, class_heads, heads, tokens, dim, scale)),
        Launch(CLASS_ROW, (_cdiv(tokens, ROW_BLOCK_N), batch, 1), (class_heads, Buffer("output", 1), heads, tokens)),
    ), scratch, regions)
