"""Triton kernels of TokenMerge: the decisions of ``edgetok.plugins.token_merge.plan``, step by step.

Five kernels, one concept each, run in this order (``token_merge_plan.plan``):

1. ``tome_norm``  L2 norm of every metric row (the reference normalises each row before the dot products);
2. ``tome_match`` each A token's best cosine score and its first best B token (tiled over B and D);
3. ``tome_rank``  each A token's rank: how many A tokens score better (equal scores: lower index first);
4. ``tome_slot``  where each A token goes: merged ones into a list grouped by destination B token (in rank
   order), unmerged ones into their output row;
5. ``tome_merge`` one program per output row gathers its kept token and the tokens merged into it (no
   atomics: the same sums in the same order on every run), looping over channel tiles.

Block sizes are fixed constexprs and every shape is a runtime i32, so one cubin per architecture serves every
N, C, D, r and prefix. The set geometry (A = even positions from 2*ceil(prefix/2), B = odd positions from
2*floor(prefix/2)+1) is recomputed in each kernel from N and prefix rather than passed in, so a launcher
needs only the tensor shapes and the plugin fields. Scratch arrays are laid out [B, NA] (NA = size of set A).
Kernels call no helper ``@triton.jit`` functions: the interpreter can then run them even when the module was
imported without ``TRITON_INTERPRET`` (see ``edgetok.plugins.kernels.run_torch``).
A zero-norm metric row (0/0 in the reference too) is not supported.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Block sizes, grids and the launch order: token_merge_plan.py (no Triton there: the TensorRT plugin's
# enqueue needs the plan, not Triton).


# grid (cdiv(N, BLOCK_N), B); BLOCK_N=32, BLOCK_D=64, 4 warps
@triton.jit
def tome_norm(metric_ptr, norm_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Norms once per row, so the match tiles divide instead of recomputing them per A tile."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    base = metric_ptr + b * N * D
    acc = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = tl.load(base + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
        acc += tl.sum(m * m, axis=1)
    tl.store(norm_ptr + b * N + rows, tl.sqrt_rn(acc), mask=row_ok)


# grid (cdiv(NA, BLOCK_A), B); BLOCK_A=32, BLOCK_B=64, BLOCK_D=32, 4 warps
@triton.jit
def tome_match(metric_ptr, norm_ptr, best_ptr, match_ptr, N, D, prefix,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows are divided by their norm before the dot, as the reference does, and the dot is IEEE fp32 (no
    TF32) so near-equal scores keep their order; B tiles are visited in order and only a strictly better tile
    replaces the running best, which keeps the first index on ties."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    a_start = 2 * ((prefix + 1) // 2)
    b_start = 2 * (prefix // 2) + 1
    NA = tl.maximum(N - a_start + 1, 0) // 2
    NB = tl.maximum(N - b_start + 1, 0) // 2
    ai = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = ai < NA
    a_row = a_start + 2 * ai
    base = metric_ptr + b * N * D
    a_norm = tl.load(norm_ptr + b * N + a_row, mask=a_ok, other=1.0)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_A], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        bj = b0 + tl.arange(0, BLOCK_B)
        b_ok = bj < NB
        b_row = b_start + 2 * bj
        b_norm = tl.load(norm_ptr + b * N + b_row, mask=b_ok, other=1.0)
        acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < D
            ma = tl.load(base + a_row[:, None] * D + cols[None, :], mask=a_ok[:, None] & c_ok[None, :], other=0.0)
            mb = tl.load(base + b_row[None, :] * D + cols[:, None], mask=c_ok[:, None] & b_ok[None, :], other=0.0)
            acc = tl.dot(tl.div_rn(ma, a_norm[:, None]), tl.div_rn(mb, b_norm[None, :]), acc, input_precision="ieee")
        acc = tl.where(b_ok[None, :], acc, float("-inf"))
        tile_best, tile_arg = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        arg = tl.where(better, b0 + tile_arg, arg)
    tl.store(best_ptr + b * NA + ai, best, mask=a_ok)
    tl.store(match_ptr + b * NA + ai, arg, mask=a_ok)


# grid (cdiv(NA, BLOCK_A), B); BLOCK_A=32, BLOCK_J=128, 4 warps
@triton.jit
def tome_rank(best_ptr, rank_ptr, N, prefix, BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr):
    """A rank by counting (O(NA^2) compares, a few hundred tokens) instead of a sort: every token's rank is
    independent, so there is no cross-program step; it equals the position in a stable descending sort."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    a_start = 2 * ((prefix + 1) // 2)
    NA = tl.maximum(N - a_start + 1, 0) // 2
    ai = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = ai < NA
    bi = tl.load(best_ptr + b * NA + ai, mask=a_ok, other=0.0)
    rank = tl.zeros([BLOCK_A], tl.int32)
    for j0 in range(0, NA, BLOCK_J):
        aj = j0 + tl.arange(0, BLOCK_J)
        j_ok = aj < NA
        bj = tl.load(best_ptr + b * NA + aj, mask=j_ok, other=0.0)
        ahead = (bj[None, :] > bi[:, None]) | ((bj[None, :] == bi[:, None]) & (aj[None, :] < ai[:, None]))
        rank += tl.sum((ahead & j_ok[None, :]).to(tl.int32), axis=1)
    tl.store(rank_ptr + b * NA + ai, rank, mask=a_ok)


# grid (cdiv(NA, BLOCK_A), B); BLOCK_A=32, BLOCK_J=128, 4 warps
@triton.jit
def tome_slot(match_ptr, rank_ptr, kept_ptr, sources_ptr, N, r, prefix, class_token,
              BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr):
    """Both outputs are permutations (each slot written by exactly one token), so plain stores suffice.
    ``sources`` lists the r merged tokens sorted by (destination, rank): the merge kernel then sums each
    destination's sources in rank order, the reference's order. ``kept`` maps unmerged A rows to tokens."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    a_start = 2 * ((prefix + 1) // 2)
    NA = tl.maximum(N - a_start + 1, 0) // 2
    ai = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = ai < NA
    mi = tl.load(match_ptr + b * NA + ai, mask=a_ok, other=0)
    ri = tl.load(rank_ptr + b * NA + ai, mask=a_ok, other=0)
    merged_before = tl.zeros([BLOCK_A], tl.int32)  # merged tokens at lower positions
    listed_before = tl.zeros([BLOCK_A], tl.int32)  # merged tokens ahead in (destination, rank) order
    for j0 in range(0, NA, BLOCK_J):
        aj = j0 + tl.arange(0, BLOCK_J)
        j_ok = aj < NA
        mj = tl.load(match_ptr + b * NA + aj, mask=j_ok, other=0)
        rj = tl.load(rank_ptr + b * NA + aj, mask=j_ok, other=0)
        merged_j = j_ok & (rj < r)
        lower = aj[None, :] < ai[:, None]
        ahead = (mj[None, :] < mi[:, None]) | ((mj[None, :] == mi[:, None]) & (rj[None, :] < ri[:, None]))
        merged_before += tl.sum((merged_j[None, :] & lower).to(tl.int32), axis=1)
        listed_before += tl.sum((merged_j[None, :] & ahead).to(tl.int32), axis=1)
    slot = tl.where(class_token != 0, ai - merged_before, ri - r)
    tl.store(kept_ptr + b * NA + slot, ai, mask=a_ok & (ri >= r))
    tl.store(sources_ptr + b * NA + listed_before, ai, mask=a_ok & (ri < r))


# grid (N - r, B); BLOCK_A=128, BLOCK_C=256, 4 warps
@triton.jit
def tome_merge(x_ptr, size_ptr, match_ptr, rank_ptr, kept_ptr, sources_ptr, out_ptr, out_size_ptr,
               N, C, r, prefix, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr):
    """A gather per output row: prefix rows and unmerged A rows have no sources; the row of B token k sums
    the sources listed for k (found by counting matches below and equal to k). Same arithmetic as the
    reference: (x*size + sum of sources' x*size) / (size + sum of their sizes). r == 0 copies unchanged."""
    o = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    a_start = 2 * ((prefix + 1) // 2)
    b_start = 2 * (prefix // 2) + 1
    NA = tl.maximum(N - a_start + 1, 0) // 2
    M = N - r
    first_b = prefix + NA - r
    merging = r > 0
    is_a = merging & (o >= prefix) & (o < first_b)
    is_b = merging & (o >= first_b)
    k = o - first_b
    a_idx = tl.load(kept_ptr + b * NA + (o - prefix), mask=is_a, other=0)
    src = tl.where(is_a, a_start + 2 * a_idx, tl.where(is_b, b_start + 2 * k, o))
    start = tl.full([], 0, tl.int32)
    count = tl.full([], 0, tl.int32)
    for j0 in range(0, tl.where(is_b, NA, 0), BLOCK_A):
        aj = j0 + tl.arange(0, BLOCK_A)
        j_ok = aj < NA
        mj = tl.load(match_ptr + b * NA + aj, mask=j_ok, other=0)
        rj = tl.load(rank_ptr + b * NA + aj, mask=j_ok, other=0)
        merged_j = j_ok & (rj < r)
        start += tl.sum((merged_j & (mj < k)).to(tl.int32), axis=0)
        count += tl.sum((merged_j & (mj == k)).to(tl.int32), axis=0)
    x_base = x_ptr + b * N * C
    s_base = size_ptr + b * N
    src_list = sources_ptr + b * NA
    s_keep = tl.load(s_base + src)
    s_moved = tl.full([], 0.0, tl.float32)
    for t in range(start, start + count):
        s_moved += tl.load(s_base + a_start + 2 * tl.load(src_list + t))
    s_total = s_keep + s_moved
    tl.store(out_size_ptr + b * M + o, s_total)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_ok = cols < C
        x_keep = tl.load(x_base + src * C + cols, mask=c_ok, other=0.0)
        moved = tl.zeros([BLOCK_C], tl.float32)
        for t in range(start, start + count):
            p = a_start + 2 * tl.load(src_list + t)
            moved += tl.load(x_base + p * C + cols, mask=c_ok, other=0.0) * tl.load(s_base + p)
        merged = tl.div_rn(x_keep * s_keep + moved, s_total)
        tl.store(out_ptr + b * M * C + o * C + cols, tl.where(merging, merged, x_keep), mask=c_ok)
