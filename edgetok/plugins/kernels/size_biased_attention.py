"""Triton kernels of SizeBiasedAttention: ``edgetok.plugins.size_biased_attention``'s reference in two steps.

Run in this order (``size_biased_attention_plan.plan``):

1. ``sba_attend_d64`` / ``sba_attend_d128`` (by head dim) one program per (query tile, image × head): flash
   attention's forward pass: key tiles in order, logits q·kᵀ·scale + log(size) (−inf for size 0), an online
   softmax (running max and sum, the accumulator rescaled as the max grows), so no N×N matrix exists; each row's
   log-sum-exp is left in scratch (``lse``);
2. ``sba_class_row`` one program per (key tile, image): the class token's row again, its probabilities from
   that row's log-sum-exp, averaged over heads.

Dot products use IEEE float32 (no TF32): the plugin keeps a reduced model's accuracy, as its float32 inputs
promise. The running max starts finite (−1e30), so a tile of masked keys only (−inf) contributes exp(−inf) = 0
instead of the NaN of −inf − (−inf). Block sizes are fixed constexprs; B, H, N, D are runtime i32, so one
cubin serves every shape with D up to the head tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Block sizes, grids and the launch order: size_biased_attention_plan.py (no Triton there).


@triton.jit
def flash_tile(q, k_ptr, v_ptr, size_ptr, base, size_base, cols, N, D, dims, d_ok, scale, top, total, acc):
    """One key tile (``cols``) of flash attention's online softmax: logits q·kᵀ·scale + log size (−inf for
    size 0), the running max ``top`` and sum ``total`` updated, ``acc`` rescaled and accumulated. Shared with
    the block-sparse kernel, which calls it for the tiles of the kept blocks only."""
    col_ok = cols < N
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + base + cols[:, None] * D + dims[None, :], mask=kv_ok, other=0.0)
    size = tl.load(size_ptr + size_base + cols, mask=col_ok, other=0.0)
    bias = tl.where(size > 0, tl.log(tl.where(size > 0, size, 1.0)), float("-inf"))
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale + bias[None, :]
    new_top = tl.maximum(top, tl.max(s, axis=1))
    rescale = tl.exp(top - new_top)
    p = tl.exp(s - new_top[:, None])
    v = tl.load(v_ptr + base + cols[:, None] * D + dims[None, :], mask=kv_ok, other=0.0)
    return new_top, total * rescale + tl.sum(p, axis=1), acc * rescale[:, None] + tl.dot(p, v, input_precision="ieee")


@triton.jit
def _attend(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, H, N, D, scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N * D
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dims < D
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    top = tl.full([BLOCK_M], -1.0e30, tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        top, total, acc = flash_tile(q, k_ptr, v_ptr, size_ptr, base, (bh // H) * N, n0 + tl.arange(0, BLOCK_N), N, D,
                                     dims, d_ok, scale, top, total, acc)
    tl.store(out_ptr + base + rows[:, None] * D + dims[None, :], acc / total[:, None],
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * N + rows, top + tl.log(total), mask=row_ok)


# grid (cdiv(N, 32), B*H); BLOCK_M=32, BLOCK_N=32, head tile 64, 4 warps
@triton.jit
def sba_attend_d64(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, H, N, D, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Head dims up to 64 (DeiT, ViT-B/L)."""
    _attend(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, H, N, D, scale, BLOCK_M, BLOCK_N, 64)


# grid (cdiv(N, 16), B*H); BLOCK_M=16, BLOCK_N=16, head tile 128, 4 warps
@triton.jit
def sba_attend_d128(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, H, N, D, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Head dims 65..128 (ViT-H's 80, 128): smaller tiles keep shared memory under 48 KiB."""
    _attend(q_ptr, k_ptr, v_ptr, size_ptr, out_ptr, lse_ptr, H, N, D, scale, BLOCK_M, BLOCK_N, 128)


# grid (cdiv(N, 64), B); BLOCK_N=64, BLOCK_D=32, 4 warps
@triton.jit
def sba_class_row(q_ptr, k_ptr, size_ptr, lse_ptr, class_ptr, H, N, D, scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query 0 against a tile of keys in every head: exp(logit − lse₀) is the probability the attention
    kernel normalised by, so the row needs no second softmax."""
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    size = tl.load(size_ptr + b * N + cols, mask=col_ok, other=0.0)
    bias = tl.where(size > 0, tl.log(tl.where(size > 0, size, 1.0)), float("-inf"))
    mean = tl.zeros([BLOCK_N], tl.float32)
    for h in range(0, H):
        base = (b * H + h) * N * D
        s = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = dims < D
            q0 = tl.load(q_ptr + base + dims, mask=d_ok, other=0.0)
            k = tl.load(k_ptr + base + cols[:, None] * D + dims[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            s += tl.sum(k * q0[None, :], axis=1)
        mean += tl.exp(s * scale + bias - tl.load(lse_ptr + (b * H + h) * N))
    tl.store(class_ptr + b * N + cols, mean / H, mask=col_ok)
