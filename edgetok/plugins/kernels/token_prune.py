"""Triton kernels of TokenPrune: ``edgetok.plugins.token_prune``'s reference, in three steps.

Run in this order (``token_prune_plan.plan``):

1. ``prune_scan``   one program per image walks its tokens in tiles, an exclusive prefix count of the kept
   ones giving each kept token its output row; it lists the source token of every live row (``sources``)
   and the image's count (``counts``);
2. ``prune_count``  the batch maximum of the counts, K, written to the int64 size-tensor output;
3. ``prune_gather`` one program per (output row, image) copies its source token, or zeros for the padding
   rows past the image's own count.

No atomics: every slot is written by exactly one program, so runs are bit-identical. K is read back from the
size tensor on the device, so the outputs are packed [B, K, C] however large TensorRT allocated them (it
allocates for the declared upper bound N); the gather grid covers N rows and programs past K do nothing.
Decisions compare bit patterns, not floats: a GPU that flushes denormals to zero would otherwise drop a
token whose keep value (or size) is a nonzero denormal, which the reference keeps.
Block sizes are fixed constexprs and every shape is a runtime i32, so one cubin serves every B, N and C.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Block sizes, grids and the launch order: token_prune_plan.py (no Triton there).


# grid (B,); BLOCK_N=256, 4 warps
@triton.jit
def prune_scan(size_ptr, keep_ptr, sources_ptr, counts_ptr, N, prefix, BLOCK_N: tl.constexpr):
    """Tiles in order with a running total: the cumulative sum inside a tile plus the kept tokens of the
    tiles before give the same rows as the reference's order-preserving gather."""
    b = tl.program_id(0).to(tl.int64)
    total = tl.full([], 0, tl.int32)
    for n0 in range(0, N, BLOCK_N):
        i = n0 + tl.arange(0, BLOCK_N)
        ok = i < N
        s = tl.load(size_ptr + b * N + i, mask=ok, other=0.0).to(tl.int32, bitcast=True)
        k = tl.load(keep_ptr + b * N + i, mask=ok, other=0.0).to(tl.int32, bitcast=True)
        positive = (s > 0) & (s <= 0x7F800000)  # sign clear, not zero, not NaN: size > 0
        nonzero = (k & 0x7FFFFFFF) != 0  # neither +0.0 nor -0.0 (NaN counts as nonzero, as keep != 0 does)
        kept = ok & ((i < prefix) | (nonzero & positive))
        flag = kept.to(tl.int32)
        slot = total + tl.cumsum(flag, axis=0) - flag
        tl.store(sources_ptr + b * N + slot, i, mask=kept)
        total += tl.sum(flag, axis=0)
    tl.store(counts_ptr + b, total)


# grid (1,); BLOCK_B=128, 4 warps
@triton.jit
def prune_count(counts_ptr, count_ptr, B, BLOCK_B: tl.constexpr):
    """A single program: B is small, and a max needs no order to be deterministic."""
    most = tl.full([], 0, tl.int32)
    for b0 in range(0, B, BLOCK_B):
        bi = b0 + tl.arange(0, BLOCK_B)
        most = tl.maximum(most, tl.max(tl.load(counts_ptr + bi, mask=bi < B, other=0), axis=0))
    tl.store(count_ptr, most.to(tl.int64))


# grid (N, B); BLOCK_C=256, 4 warps
@triton.jit
def prune_gather(x_ptr, size_ptr, sources_ptr, counts_ptr, count_ptr, out_ptr, out_size_ptr, N, C,
                 BLOCK_C: tl.constexpr):
    """Rows are packed with the computed K as their stride; live rows copy bit for bit, padding rows get
    zeros (so a later step sees size 0 and drops them)."""
    o = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    K = tl.load(count_ptr).to(tl.int32)
    if o < K:
        live = o < tl.load(counts_ptr + b)
        src = tl.load(sources_ptr + b * N + o, mask=live, other=0)
        tl.store(out_size_ptr + b * K + o, tl.load(size_ptr + b * N + src, mask=live, other=0.0))
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            c_ok = cols < C
            row = tl.load(x_ptr + (b * N + src) * C + cols, mask=c_ok & live, other=0.0)
            tl.store(out_ptr + (b * K + o) * C + cols, row, mask=c_ok)
