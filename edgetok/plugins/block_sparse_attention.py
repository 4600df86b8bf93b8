"""BlockSparseAttention: training-free block-sparse attention (SpargeAttn-style selection), exact inside the
kept blocks, with the same log(size) key bias as SizeBiasedAttention.

Inputs: ``q``, ``k``, ``v`` [B, H, N, D] float32 and token sizes ``size`` [B, N, 1]. Fields: ``scale`` (0:
D^-0.5), ``block`` (tokens per block, a power of two >= 16), ``mass`` in (0, 1], ``keep`` in [0, 1] (0: select
by mass; else keep that fraction of the key blocks, rounded up), ``prefix`` (> 0: key block 0, which holds the
class/register tokens, is always kept).

Tokens are cut into NB = ceil(N / block) blocks. A token is real when its size is > 0, a block when it has a
real token. Per image and head:

1. pool: q̄_i, k̄_i = mean of q, k over block i's real rows (0 for none); w_i = sum of its sizes;
2. score: s_ij = q̄_i·k̄_j·scale + log w_j (−inf for a block of padding), p_ij = softmax over j;
3. select, for each query block i: the key blocks in order of p_ij, highest first (ties: lower j first), as
   many as it takes for their mass to reach ``mass`` — j is kept iff the mass of the blocks before it is
   < mass (all of them when mass = 1) — or, with ``keep``, the first ceil(keep × real blocks); plus block 0
   (prefix > 0) and the diagonal j = i;
4. attend: each query row attends exactly (softmax with + log size) over the keys of its block's kept blocks.

Outputs: ``out`` [B, H, N, D] and ``kept`` [B]: the fraction of (real query block, real key block) pairs
attended, averaged over heads — what the attention's FLOPs scale with. With mass = 1 every block is kept and
``out`` is SizeBiasedAttention's. An image computes the same in a padded batch as alone (pooling, weights and
fractions count real tokens only; padding sits at the end).
"""

from __future__ import annotations

import math

import numpy as np

from edgetok.plugins.agreement import Margins, near_tie, noise
from edgetok.plugins.size_biased_attention import INPUTS, SCALE, check_attention, logit_magnitude, scale_of
from edgetok.plugins.declaration import Field, PluginError, PluginSpec, Tensor, reference, register

MIN_BLOCK = 16  # the attention kernel's tile: a block is a whole number of tiles
MAX_BLOCKS = 128  # the selection kernel scores one query block against up to this many key blocks at once
# The largest block: every kernel loops over a block's tiles (and the reference pads N up to whole blocks), so
# a block is work even where it holds no token; 1024 covers any ViT edgetok exports in one block (DeiT at 448:
# 785 tokens). A model's own bound is lower: its token count rounded up to a power of two (largest_block).
MAX_BLOCK = 1024


def _output_shapes(dims: list[list], f: dict) -> list[list]:
    (batch, heads, tokens, dim), _, _, _ = dims
    return [[batch, heads, tokens, dim], [batch]]


def _check(shapes: list[tuple[int, ...]], f: dict) -> None:
    check_attention("BlockSparseAttention", shapes, f)
    tokens = shapes[0][2]
    block = f["block"]
    if block < MIN_BLOCK or block & (block - 1) or block > MAX_BLOCK:
        raise PluginError(f"BlockSparseAttention: block={block} must be a power of two >= {MIN_BLOCK} and <= "
                          f"{MAX_BLOCK} (the kernel tile .. one block for any ViT), e.g. 64")
    if math.ceil(tokens / block) > MAX_BLOCKS:
        raise PluginError(f"BlockSparseAttention: {tokens} tokens make {math.ceil(tokens / block)} blocks of {block}, "
                          f"more than {MAX_BLOCKS}; use a larger block (at least {_smallest_block(tokens)})")
    if not 0 < f["mass"] <= 1:
        raise PluginError(f"BlockSparseAttention: mass={f['mass']} must be in (0, 1], e.g. 0.95")
    if not 0 <= f["keep"] <= 1:
        raise PluginError(f"BlockSparseAttention: keep={f['keep']} must be in (0, 1] (or 0: select by mass)")
    if f["prefix"] < 0:
        raise PluginError(f"BlockSparseAttention: prefix={f['prefix']} must be >= 0")


def _smallest_block(tokens: int) -> int:
    block = MIN_BLOCK
    while math.ceil(tokens / block) > MAX_BLOCKS:
        block *= 2
    return block


def largest_block(tokens: int) -> int:
    """The largest useful block for ``tokens`` tokens: one block holding them all (a larger one only pads)."""
    block = MIN_BLOCK
    while block < min(tokens, MAX_BLOCK):
        block *= 2
    return block


def blocks_of(tokens: int, block: int) -> int:
    return -(-tokens // block)


def pool(q: np.ndarray, k: np.ndarray, size: np.ndarray, block: int):
    """(q̄, k̄ [B, H, NB, D], w [B, NB]): means over each block's real rows, sums of its sizes."""
    batch, heads, tokens, dim = q.shape
    nb = blocks_of(tokens, block)
    pad = nb * block - tokens
    real = np.pad((size[..., 0] > 0).astype(q.dtype), ((0, 0), (0, pad))).reshape(batch, 1, nb, block, 1)
    count = np.maximum(real.sum(axis=3), 1)

    def mean(x):
        return (np.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(batch, heads, nb, block, dim) * real).sum(3) / count

    weight = np.pad(np.maximum(size[..., 0], 0), ((0, 0), (0, pad))).reshape(batch, nb, block).sum(axis=2)
    return mean(q), mean(k), weight


def select(q: np.ndarray, k: np.ndarray, size: np.ndarray, scale: float, block: int, mass: float, keep: float,
           prefix: int) -> np.ndarray:
    """[B, H, NB, NB] bool: the key blocks each query block attends (steps 1-3)."""
    qp, kp, weight = pool(q, k, size, block)
    nb = weight.shape[1]
    with np.errstate(divide="ignore"):
        logits = qp @ np.swapaxes(kp, -1, -2) * scale + np.log(weight)[:, None, None, :]
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")  # highest first, ties to the lower index
    ranked = np.take_along_axis(p, order, axis=-1)
    before = np.cumsum(ranked, axis=-1) - ranked  # mass of the blocks ranked before each
    if keep > 0:
        real = (weight > 0).sum(axis=1).astype(np.float32)
        n_keep = np.ceil(np.float32(keep) * real)[:, None, None, None]
        chosen = np.broadcast_to(np.arange(nb)[None, None, None, :] < n_keep, p.shape)
    else:
        chosen = (before < np.float32(mass)) | (mass >= 1)  # float32, as the kernels compare
    selected = np.zeros_like(chosen)
    np.put_along_axis(selected, order, chosen, axis=-1)
    selected |= np.eye(nb, dtype=bool)[None, None]
    if prefix > 0:
        selected[..., 0] = True
    return selected


def kept_fraction(selected: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[B]: attended (real, real) block pairs over all of them, mean over heads."""
    real = weight > 0
    pairs = (selected & real[:, None, :, None] & real[:, None, None, :]).sum(axis=(2, 3))
    return (pairs / (real.sum(axis=1)[:, None] ** 2)).mean(axis=1)


def _cases(rng: np.random.Generator) -> list[tuple[str, list[np.ndarray], dict]]:
    """Random selections at several masses and keep fractions; N not a multiple of the block, N below one
    block; padding blocks; B > 1; duplicated key blocks (tied scores); mass = 1 (dense)."""
    def call(batch, heads, tokens, dim, padded=0):
        q, k, v = (rng.standard_normal((batch, heads, tokens, dim)).astype(np.float32) for _ in range(3))
        q *= 2.0  # sharper block scores: selections that keep some blocks and drop others
        size = rng.integers(1, 4, (batch, tokens, 1)).astype(np.float32)
        if padded:
            size[0, tokens - padded:] = 0.0
        return [q, k, v, size]

    tied = call(1, 2, 64, 32)
    tied[1][:, :, 32:48] = tied[1][:, :, 16:32]  # key blocks 1 and 2 identical: equal scores
    tied[3][:, 32:48] = tied[3][:, 16:32]
    base = {"scale": 0.0, "block": 16, "mass": 0.9, "keep": 0.0, "prefix": 1}
    return [
        ("mass 0.9, N=100 B=2 (N not a block multiple)", call(2, 2, 100, 32), base),
        ("mass 0.5, block 32, D=64", call(2, 3, 130, 64), {**base, "block": 32, "mass": 0.5}),
        ("keep 0.3, prefix 0", call(2, 2, 97, 32), {**base, "keep": 0.3, "prefix": 0}),
        ("N=10 below one block", call(2, 2, 10, 32), base),
        ("padding blocks", call(3, 2, 90, 32, padded=40), {**base, "mass": 0.7}),
        ("tied key blocks", tied, {**base, "mass": 0.6}),
        ("mass 1 is dense", call(2, 2, 70, 32), {**base, "mass": 1.0}),
        ("D=80 block 64", call(1, 2, 200, 80), {**base, "block": 64, "mass": 0.8}),
    ]


def _intermediates(inputs: list[np.ndarray], f: dict) -> dict[str, list[np.ndarray]]:
    """Per (image, head): the pooled queries and keys, the block weights, the selection."""
    q, k, _, size = inputs
    qp, kp, weight = pool(q.astype(np.float64), k.astype(np.float64), size.astype(np.float64), f["block"])
    sel = select(q, k, size, scale_of(q.shape[3], f["scale"]), f["block"], f["mass"], f["keep"], f["prefix"])
    heads = q.shape[1]
    return {"qbar": [x.astype(np.float32).reshape(-1) for x in qp.reshape(-1, *qp.shape[2:])],
            "kbar": [x.astype(np.float32).reshape(-1) for x in kp.reshape(-1, *kp.shape[2:])],
            "weight": [weight[b].astype(np.float32) for b in range(len(weight)) for _ in range(heads)],
            "selected": [x.astype(np.int32).reshape(-1) for x in sel.reshape(-1, *sel.shape[2:])]}


def _margins(inputs: list[np.ndarray], f: dict) -> Margins:
    """On a GPU, the reference's margin of each ``selected`` entry, in multiples of its float32 noise (tie 1):
    the selection is a prefix of the key blocks ranked by p, so an entry flips when it is near the boundary of
    that prefix (its logit's distance to the midpoint of the last chosen and the first left out, against the
    noise of the logits' magnitude) or, by mass, when the mass before it is near ``mass`` (against the noise of
    a sum of probabilities from those logits). Forced entries (block 0, the diagonal) and padding blocks
    (p = 0 exactly) do not rest on arithmetic."""
    q, k, _, size = (np.asarray(x, np.float64) for x in inputs)
    scale = scale_of(q.shape[3], f["scale"])
    qp, kp, weight = pool(q, k, size, f["block"])
    nb = weight.shape[1]
    with np.errstate(divide="ignore"):
        logits = qp @ np.swapaxes(kp, -1, -2) * scale + np.log(weight)[:, None, None, :]
    magnitude = logit_magnitude(qp, kp, weight[..., None], scale)
    real = np.broadcast_to((weight > 0)[:, None, None, :], logits.shape)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    ranked_p = np.take_along_axis(p, order, axis=-1)
    before = np.cumsum(ranked_p, axis=-1) - ranked_p  # mass ranked before each block
    n_real = real.sum(axis=-1, keepdims=True)
    if f["keep"] > 0:  # the chosen prefix of the ranking, as select() takes it
        count = np.ceil(np.float32(f["keep"]) * n_real.astype(np.float32)).astype(int)
    else:
        count = np.where(f["mass"] >= 1, nb, (before < np.float32(f["mass"])).sum(axis=-1, keepdims=True))
    ranked = np.take_along_axis(np.where(real, logits, -np.inf), order, axis=-1)
    with np.errstate(invalid="ignore"):
        middle = (np.take_along_axis(ranked, np.clip(count - 1, 0, nb - 1), axis=-1)
                  + np.take_along_axis(ranked, np.clip(count, 0, nb - 1), axis=-1)) / 2
        edge = np.where((count > 0) & (count < n_real), np.abs(logits - middle), np.inf)
    margin = np.where(real & ~np.isnan(edge), edge, np.inf) / noise(magnitude)
    if not f["keep"] and f["mass"] < 1:
        by_mass = np.empty_like(before)
        np.put_along_axis(by_mass, order, np.abs(before - f["mass"]), axis=-1)
        margin = np.minimum(margin, by_mass / noise(2 * magnitude + nb))
    margin[..., np.arange(nb), np.arange(nb)] = np.inf
    if f["prefix"] > 0:
        margin[..., 0] = np.inf
    return Margins({"selected": ([m.reshape(-1) for m in margin.reshape(-1, nb, nb)], 1.0)},
                   magnitude=float(logit_magnitude(q, k, size, scale)), settled=~near_tie(margin, 1.0).any(axis=(1, 2, 3)))


SPEC = register(PluginSpec(
    name="BlockSparseAttention",
    doc="training-free block-sparse attention: pooled block scores pick key blocks by mass; exact inside them",
    fields=(SCALE,
            Field("block", int, 64, "tokens per block (a power of two >= 16)"),
            Field("mass", float, 0.95, "softmax mass of the pooled scores each query block keeps, in (0, 1]"),
            Field("keep", float, 0.0, "if > 0: keep this fraction of the key blocks instead of a mass"),
            Field("prefix", int, 1, "> 0: key block 0 (class/register tokens) is always kept")),
    inputs=INPUTS,
    outputs=(
        Tensor("out", 4, "attention output [B, H, N, D]"),
        Tensor("kept", 1, "fraction of real block pairs attended, mean over heads [B]"),
    ),
    output_shapes=_output_shapes,
    check=_check,
    kernels="block_sparse_attention",
    cases=_cases,
    intermediates=_intermediates,
    margins=_margins,
))


@reference("BlockSparseAttention")
def block_sparse_attention(q, k, v, size, scale: float, block: int, mass: float, keep: float, prefix: int):
    """Dense logits with the unselected blocks set to −inf: the same numbers as skipping them."""
    batch, heads, tokens, dim = q.shape
    scale = scale_of(dim, scale)
    selected = select(q, k, size, scale, block, mass, keep, prefix)
    _, _, weight = pool(q, k, size, block)
    token_block = np.arange(tokens) // block
    allowed = selected[:, :, token_block][:, :, :, token_block]  # [B, H, N, N]
    with np.errstate(divide="ignore"):
        logits = q @ np.swapaxes(k, -1, -2) * scale + np.log(size[..., 0])[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return (weights @ v).astype(q.dtype), kept_fraction(selected, weight).astype(q.dtype)
