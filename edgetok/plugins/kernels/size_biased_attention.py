"""Triton kernels of SizeBiasedAttention: ``edgetok.plugins.size_biased_attention``'s reference in two steps.

Run in this order (``size_biased_attention_plan.plan``):

1. ``sba_attend_d64`` / ``sba_attend_d128`` (by head dim) one program per (query tile, image × head): flash
   attention's forward pass: key tiles in order, logits q·kᵀ·scale + log(size) (−inf for size 0), an online
   softmax (running max and sum, the accumulator rescaled as the max grows), so no N×N matrix exists; each row's
   log-sum-exp is left in scratch (``lse``). The programs of the first query tile then pass over the keys once
   more and leave the class token's probabilities of their head in scratch (``class_heads``);
2. ``sba_class_row`` one program per (key tile, image): those probabilities averaged over heads.

The class row's second pass recomputes its logits with the very code of the first (``tile_logits``), so each
probability is exp(s − max) / sum over the same numbers: right at any magnitude. (Recomputing it from the
log-sum-exp instead rounds log(sum) to the float32 spacing at |max|: up to 0.1 % off once |max| > 16384, and
all of log(sum) lost at 1e35.)

The online softmax is −inf safe, as FlashAttention's: the running max starts at −inf (a finite start such as
−1e30 makes every logit below it underflow to 0/0 = NaN), and while a row has seen masked keys only (max still
−inf) its logits are shifted by 0 instead, so exp(−inf − shift) = 0 rather than exp(−inf + inf) = NaN. A row
with no key to attend (every size 0: an all-padding image, which a class token rules out) comes out 0, its
log-sum-exp −inf, where the reference's softmax divides 0 by 0.

Dot products use IEEE float32 (no TF32): the plugin keeps a reduced model's accuracy, as its float32 inputs
promise. Block sizes are fixed constexprs; B, H, N, D are runtime i32, so one cubin serves every shape with D up
to the head tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Block sizes, grids and the launch order: size_biased_attention_plan.py (no Triton there).


@triton.jit
def tile_logits(q, k_ptr, size_ptr, base, size_base, cols, N, D, dims, d_ok, scale):
    """The logits of the query tile ``q`` against one key tile (``cols``): q·kᵀ·scale + log size, −inf for
    size 0 and for columns past N."""
    col_ok = cols < N
    k = tl.load(k_ptr + base + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    size = tl.load(size_ptr + size_base + cols, mask=col_ok, other=0.0)
    bias = tl.where(size > 0, tl.log(tl.where(size > 0, size, 1.0)), float("-inf"))
    return tl.dot(q, tl.trans(k), input_precision="ieee") * scale + bias[None, :]


@triton.jit
def finite_shift(top):
    """What a row's logits are shifted by before exp: its running max, or 0 while that is −inf (no key seen
    yet but masked ones), so that exp(−inf − shift) is 0, not NaN."""
    return tl.where(top == float("-inf"), 0.0, top)


@triton.jit
def flash_tile(q, k_ptr, v_ptr, size_ptr, base, size_base, cols, N, D, dims, d_ok, scale, top, total, acc):
    """One key tile (``cols``) of flash attention's online softmax: the running max ``top`` (starting at −inf)
    and sum ``total`` updated, ``acc`` rescaled and accumulated. Shared with the block-sparse kernel, which
    calls it for the tiles of the kept blocks only."""
    s = tile_logits(q, k_ptr, size_ptr, base, size_base, cols, N, D, dims, d_ok, scale)
    new_top = tl.maximum(top, tl.max(s, axis=1))
    shift = finite_shift(new_top)
    rescale = tl.exp(top - shift)  # 0 when top is −inf: nothing was summed yet
    p = tl.exp(s - shift[:, None])
    kv_ok = (cols < N)[:, None] & d_ok[None, :]
    v = tl.load(v_ptr + base + cols[:, None] * D + dims[None, :], mask=kv_ok, other=0.0)
    return new_top, total * rescale + tl.sum(p, axis=1), acc * rescale[:, None] + tl.dot(p, v, input_precision="ieee")


@triton.jit
def normalised(acc, total):
    """acc / total per row; 0 for a row that attended no key (total 0) instead of 0/0."""
    return acc / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, class_heads_ptr, H, N, D, scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N * D
    size_base = (bh // H) * N
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dims < D
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        top, total, acc = flash_tile(q, k_ptr, v_ptr, size_ptr, base, size_base, n0 + tl.arange(0, BLOCK_N), N, D,
                                     dims, d_ok, scale, top, total, acc)
    tl.store(out_ptr + base + rows[:, None] * D + dims[None, :], normalised(acc, total),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * N + rows, top + tl.log(total), mask=row_ok)
    if tl.program_id(0) == 0:  # the tile holding the class token (row 0): its probabilities in this head
        shift = finite_shift(top)
        inverse = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            s = tile_logits(q, k_ptr, size_ptr, base, size_base, cols, N, D, dims, d_ok, scale)
            p = tl.exp(s - shift[:, None]) * inverse[:, None]
            tl.store(class_heads_ptr + bh * N + cols, tl.sum(tl.where(rows[:, None] == 0, p, 0.0), axis=0),
                     mask=cols < N)


# grid (cdiv(N, 32), B*H); BLOCK_M=32, BLOCK_N=32, head tile 64, 4 warps
@triton.jit
def sba_attend_d64(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, class_heads_ptr, H, N, D, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Head dims up to 64 (DeiT, ViT-B/L)."""
    _attend(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, class_heads_ptr, H, N, D, scale, BLOCK_M, BLOCK_N, 64)


# grid (cdiv(N, 16), B*H); BLOCK_M=16, BLOCK_N=16, head tile 128, 4 warps
@triton.jit
def sba_attend_d128(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, class_heads_ptr, H, N, D, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Head dims 65..128 (ViT-H's 80, 128): smaller tiles keep shared memory under 48 KiB."""
    _attend(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, class_heads_ptr, H, N, D, scale, BLOCK_M, BLOCK_N, 128)


# grid (cdiv(N, 64), B); BLOCK_N=64, 4 warps
@triton.jit
def sba_class_row(class_heads_ptr, class_ptr, H, N, BLOCK_N: tl.constexpr):
    """The class token's attention row, mean over heads of what the attention kernels left per head."""
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mean = tl.zeros([BLOCK_N], tl.float32)
    for h in range(0, H):
        mean += tl.load(class_heads_ptr + (b * H + h) * N + cols, mask=col_ok, other=0.0)
    tl.store(class_ptr + b * N + cols, mean / H, mask=col_ok)
