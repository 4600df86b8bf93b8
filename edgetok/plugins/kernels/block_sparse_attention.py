"""Triton kernels of BlockSparseAttention: ``edgetok.plugins.block_sparse_attention``'s reference in four steps.

Run in this order (``block_sparse_attention_plan.plan``):

1. ``bsa_pool``    one program per (block, image × head): the mean query and key over the block's real rows
   (``qbar``, ``kbar``) and the sum of its sizes (``weight``);
2. ``bsa_select``  one program per (query block, image × head): the pooled logits against every key block, their
   softmax, and for each key block the mass and the number of blocks ranked before it (a comparison matrix over
   the key blocks, no sort); writes which key blocks the query block attends (``selected``) and how many of the
   real ones (``row_kept``);
3. ``bsa_kept``    one program per image: the fraction of real block pairs attended, mean over heads (0 for
   an image of padding only, where the reference divides 0 by 0);
4. ``bsa_sparse_d64`` / ``bsa_sparse_d128`` (by head dim) one program per (query tile, image × head): flash
   attention over the tiles of the selected key blocks only; the others are never loaded. Its online softmax
   is SizeBiasedAttention's (``flash_tile``): −inf safe, a row with no key to attend comes out 0.

Tiles are 16 tokens (a block is a whole number of tiles, so a tile never straddles two blocks); the selection
scores up to 128 key blocks at once; dots are IEEE float32. Every shape and field is a runtime scalar, so one
cubin serves every N, block and mass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from edgetok.plugins.kernels.size_biased_attention import flash_tile, normalised

# Block sizes, grids and the launch order: block_sparse_attention_plan.py (no Triton there).


# grid (NB, B*H); TILE=16, BLOCK_D=128, 4 warps
@triton.jit
def bsa_pool(q_ptr, k_ptr, size_ptr, qbar_ptr, kbar_ptr, weight_ptr, H, N, D, block,
             TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    nb = tl.cdiv(N, block)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D
    q_sum = tl.zeros([BLOCK_D], tl.float32)
    k_sum = tl.zeros([BLOCK_D], tl.float32)
    count = tl.zeros([TILE], tl.float32)
    weight = tl.zeros([TILE], tl.float32)
    for r0 in range(0, block, TILE):
        rows = i * block + r0 + tl.arange(0, TILE)
        size = tl.load(size_ptr + (bh // H) * N + rows, mask=rows < N, other=0.0)
        real = (rows < N) & (size > 0)
        at = bh * N * D + rows[:, None] * D + dims[None, :]
        q_sum += tl.sum(tl.load(q_ptr + at, mask=real[:, None] & d_ok[None, :], other=0.0), axis=0)
        k_sum += tl.sum(tl.load(k_ptr + at, mask=real[:, None] & d_ok[None, :], other=0.0), axis=0)
        count += real.to(tl.float32)
        weight += tl.where(real, size, 0.0)
    rows_real = tl.maximum(tl.sum(count, axis=0), 1.0)
    tl.store(qbar_ptr + (bh * nb + i) * D + dims, q_sum / rows_real, mask=d_ok)
    tl.store(kbar_ptr + (bh * nb + i) * D + dims, k_sum / rows_real, mask=d_ok)
    tl.store(weight_ptr + bh * nb + i, tl.sum(weight, axis=0))


# grid (NB, B*H); BLOCK_J=128, BLOCK_D=128, 4 warps
@triton.jit
def bsa_select(qbar_ptr, kbar_ptr, weight_ptr, selected_ptr, row_kept_ptr, N, D, block, scale, mass, keep, prefix,
               BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Block l is ranked before block j when its probability is higher, or equal with l < j (the reference's
    stable sort); j is chosen when the mass before it is < mass, or its rank < ceil(keep × real blocks)."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    nb = tl.cdiv(N, block)
    js = tl.arange(0, BLOCK_J)
    j_ok = js < nb
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D
    qbar = tl.load(qbar_ptr + (bh * nb + i) * D + dims, mask=d_ok, other=0.0)
    kbar = tl.load(kbar_ptr + (bh * nb + js[:, None]) * D + dims[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    weight = tl.load(weight_ptr + bh * nb + js, mask=j_ok, other=0.0)
    real = weight > 0
    log_w = tl.where(real, tl.log(tl.where(real, weight, 1.0)), float("-inf"))
    s = tl.where(j_ok, tl.sum(kbar * qbar[None, :], axis=1) * scale + log_w, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=0))
    p = e / tl.sum(e, axis=0)
    p_l = p[None, :]
    p_j = p[:, None]
    earlier = ((p_l > p_j) | ((p_l == p_j) & (js[None, :] < js[:, None]))) & j_ok[None, :]
    before = tl.sum(tl.where(earlier, p_l, 0.0), axis=1)
    rank = tl.sum(earlier.to(tl.int32), axis=1).to(tl.float32)
    n_keep = tl.ceil(keep * tl.sum(real.to(tl.float32), axis=0))
    chosen = tl.where(keep > 0, rank < n_keep, (before < mass) | (mass >= 1.0))
    chosen = (chosen | (js == i) | ((js == 0) & (prefix > 0))) & j_ok
    tl.store(selected_ptr + (bh * nb + i) * nb + js, chosen.to(tl.int32), mask=j_ok)
    row_real = tl.load(weight_ptr + bh * nb + i) > 0
    tl.store(row_kept_ptr + bh * nb + i, tl.sum((chosen & real).to(tl.int32), axis=0) * row_real.to(tl.int32))


# grid (B,); BLOCK_J=128, 4 warps
@triton.jit
def bsa_kept(weight_ptr, row_kept_ptr, kept_ptr, H, N, block, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    nb = tl.cdiv(N, block)
    js = tl.arange(0, BLOCK_J)
    j_ok = js < nb
    n_real = tl.sum((tl.load(weight_ptr + b * H * nb + js, mask=j_ok, other=0.0) > 0).to(tl.float32), axis=0)
    total = tl.zeros([BLOCK_J], tl.float32)
    for h in range(0, H):
        total += tl.load(row_kept_ptr + (b * H + h) * nb + js, mask=j_ok, other=0).to(tl.float32)
    n_real = tl.maximum(n_real, 1.0)  # an image of padding only attended nothing: 0, not 0/0
    tl.store(kept_ptr + b, tl.sum(total, axis=0) / (n_real * n_real) / H)


@triton.jit
def _sparse(q_ptr, k_ptr, v_ptr, size_ptr, selected_ptr, out_ptr, H, N, D, block, scale,
            TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    base = bh * N * D
    m0 = tl.program_id(0) * TILE
    i = m0 // block
    nb = tl.cdiv(N, block)
    rows = m0 + tl.arange(0, TILE)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    d_ok = dims < D
    q = tl.load(q_ptr + base + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    top = tl.full([TILE], float("-inf"), tl.float32)  # −inf safe: see size_biased_attention.py
    total = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, BLOCK_D], tl.float32)
    for j in range(0, nb):
        if tl.load(selected_ptr + (bh * nb + i) * nb + j) != 0:
            for n0 in range(j * block, tl.minimum(j * block + block, N), TILE):
                top, total, acc = flash_tile(q, k_ptr, v_ptr, size_ptr, base, (bh // H) * N, n0 + tl.arange(0, TILE),
                                             N, D, dims, d_ok, scale, top, total, acc)
    tl.store(out_ptr + base + rows[:, None] * D + dims[None, :], normalised(acc, total),
             mask=row_ok[:, None] & d_ok[None, :])


# grid (cdiv(N, 16), B*H); TILE=16, head tile 64, 4 warps
@triton.jit
def bsa_sparse_d64(q_ptr, k_ptr, v_ptr, size_ptr, selected_ptr, out_ptr, H, N, D, block, scale, TILE: tl.constexpr):
    _sparse(q_ptr, k_ptr, v_ptr, size_ptr, selected_ptr, out_ptr, H, N, D, block, scale, TILE, 64)


# grid (cdiv(N, 16), B*H); TILE=16, head tile 128, 4 warps
@triton.jit
def bsa_sparse_d128(q_ptr, k_ptr, v_ptr, size_ptr, selected_ptr, out_ptr, H, N, D, block, scale, TILE: tl.constexpr):
    _sparse(q_ptr, k_ptr, v_ptr, size_ptr, selected_ptr, out_ptr, H, N, D, block, scale, TILE, 128)
