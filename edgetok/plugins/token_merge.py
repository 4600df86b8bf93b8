"""TokenMerge: one fused ToMe step for a fixed r (bipartite soft matching, then a size-weighted merge).

Inputs: tokens ``x`` [B, N, C], the keys averaged over heads ``metric`` [B, N, D] and the token sizes
``size`` [B, N, 1]. Outputs: the merged tokens [B, N - r, C] and their sizes [B, N - r, 1].
Exactly the token-transform step of ``edgetok.vit.methods.tome_torch`` for one block: tokens at even positions
from ``prefix`` on (rounded up to even) form A, odd positions form B; prefix tokens are neither merged nor
merged into; each A token's best match is its most similar B token (cosine; the first on ties); the
r A tokens with the best scores (the lower index first on ties) are merged into their match, weighted
by size. Output order: prefix tokens, unmerged A tokens (in position order when ``class_token``, else
best-match order), then all B tokens.
"""

from __future__ import annotations

import numpy as np

from edgetok.plugins.agreement import (Margins, argmax_margin, boundary_margin, least_margin, near_tie, noise,
                                       order_margin)
from edgetok.plugins.declaration import Field, PluginError, PluginSpec, Tensor, reference, register


def split(tokens: int, prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of set A and set B among ``tokens`` tokens with ``prefix`` protected ones in front."""
    a_prefix, b_prefix = (prefix + 1) // 2, prefix // 2
    return np.arange(2 * a_prefix, tokens, 2), np.arange(2 * b_prefix + 1, tokens, 2)


def max_r(tokens: int, prefix: int) -> int:
    """The most tokens one step can merge (the reference's (t - protected) // 2)."""
    return max(tokens - prefix, 0) // 2


def _output_shapes(dims: list[list], f: dict) -> list[list]:
    (batch, tokens, channels), _, _ = dims
    return [[batch, tokens - f["r"], channels], [batch, tokens - f["r"], 1]]


def _check(shapes: list[tuple[int, ...]], f: dict) -> None:
    (batch, tokens, _), metric, size = shapes
    if f["r"] < 0 or f["prefix"] < 0 or f["class_token"] not in (0, 1):
        raise PluginError(f"TokenMerge: r={f['r']}, prefix={f['prefix']}, class_token={f['class_token']} must be "
                          "r >= 0, prefix >= 0, class_token 0 or 1")
    if metric[:2] != (batch, tokens) or size != (batch, tokens, 1):
        raise PluginError(f"TokenMerge: metric {list(metric)} and size {list(size)} must be [{batch}, {tokens}, D] "
                          f"and [{batch}, {tokens}, 1] for tokens [{batch}, {tokens}, C]")
    most = max_r(tokens, f["prefix"])
    if f["r"] > most:
        raise PluginError(f"TokenMerge: r={f['r']} is too large for {tokens} tokens with {f['prefix']} protected; "
                          f"at most {most}: export with a lower --r")


def _cases(rng: np.random.Generator) -> list[tuple[str, list[np.ndarray], dict]]:
    """Random calls, and the adversarial ones: exact ties (keys along three axes: cosines exactly 0 or 1),
    every prefix layout, r = 0 and r = max, batch > 1, and a DeiT-S sized step."""
    def call(batch, tokens, channels, dim, ties=False):
        x = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
        if ties:
            metric = np.eye(dim, dtype=np.float32)[rng.integers(0, 3, (batch, tokens))]
            metric *= rng.integers(1, 4, (batch, tokens, 1)).astype(np.float32)
        else:
            metric = rng.standard_normal((batch, tokens, dim)).astype(np.float32)
        size = rng.integers(1, 5, (batch, tokens, 1)).astype(np.float32)
        return [x, metric, size]

    cases = []
    for tokens, prefix, class_token in [(17, 1, 1), (18, 2, 1), (21, 5, 1), (16, 0, 0), (21, 5, 0)]:
        for r in sorted({0, 1, max_r(tokens, prefix) // 2, max_r(tokens, prefix)}):
            fields = {"r": r, "prefix": prefix, "class_token": class_token}
            cases.append((f"random N={tokens} prefix={prefix} cls={class_token} r={r}", call(3, tokens, 40, 12), fields))
            cases.append((f"ties N={tokens} prefix={prefix} cls={class_token} r={r}", call(2, tokens, 40, 8, True), fields))
    cases.append(("deit-s N=197 C=384 r=13", call(2, 197, 384, 64), {"r": 13, "prefix": 1, "class_token": 1}))
    return cases


def _intermediates(inputs: list[np.ndarray], f: dict) -> dict[str, list[np.ndarray]]:
    """Per sample, what the kernels compute on the way: row norms, each A token's best score and match, its
    rank, the unmerged A tokens by output slot, and the merged ones by (destination, rank)."""
    _, metric, _ = inputs
    found: dict[str, list[np.ndarray]] = {k: [] for k in ("norm", "best", "match", "rank", "kept", "sources")}
    for sample in metric:
        a_pos, b_pos = split(len(sample), f["prefix"])
        norm = np.linalg.norm(sample, axis=-1)
        unit = sample / norm[:, None]
        scores = unit[a_pos] @ unit[b_pos].T
        match = scores.argmax(axis=-1)
        best = scores[np.arange(len(a_pos)), match]
        order = np.argsort(-best, kind="stable")
        rank = np.empty(len(a_pos), np.int64)
        rank[order] = np.arange(len(a_pos))
        merged, unmerged = order[:f["r"]], order[f["r"]:]
        found["norm"].append(norm)
        found["best"].append(best)
        found["match"].append(match)
        found["rank"].append(rank)
        found["kept"].append(np.sort(unmerged) if f["class_token"] else unmerged)
        found["sources"].append(merged[np.lexsort((rank[merged], match[merged]))])
    return found


def _margins(inputs: list[np.ndarray], f: dict) -> Margins:
    """On a GPU, the reference's margin of each decision the kernels write (scores are cosines of unit
    vectors, summed from magnitude 1: near ties within noise(1)): ``match`` <- the A token's best score over
    its second best; ``rank`` <- its best score's distance to the nearest other A token's; ``kept`` and
    ``sources`` (index lists, where one swap shifts the entries after it) <- per sample, the least of the
    boundary at r (half the gap between the r-th and the (r+1)-th best score) and the margins of the orders
    they are listed in. A sample is settled (its merged tokens compared) when no decision its merge rests on
    is a near tie: which r merge, their matches, and without class_token the order of the others."""
    _, metric, _ = inputs
    tie = float(noise(1.0))
    found: dict[str, list[np.ndarray]] = {k: [] for k in ("match", "rank", "kept", "sources")}
    settled = []
    for sample in np.asarray(metric, np.float64):
        a_pos, b_pos = split(len(sample), f["prefix"])
        unit = sample / np.linalg.norm(sample, axis=-1, keepdims=True)
        scores = unit[a_pos] @ unit[b_pos].T
        best = scores.max(axis=-1)
        match, rank = argmax_margin(scores), order_margin(best)
        order = np.argsort(-best, kind="stable")
        merged, unmerged = order[:f["r"]], order[f["r"]:]
        boundary = boundary_margin(best, f["r"])
        listed = [boundary] if f["class_token"] else [boundary, rank[unmerged]]
        found["match"].append(match)
        found["rank"].append(rank)
        found["kept"].append(np.full(len(unmerged), least_margin(*listed)))
        found["sources"].append(np.full(len(merged), least_margin(boundary, match[merged], rank[merged])))
        settled.append(not near_tie(least_margin(*listed, match[merged]), tie))
    return Margins({name: (margins, tie) for name, margins in found.items()}, magnitude=1.0,
                   settled=np.array(settled, bool))


def token_merge_margin(metric: np.ndarray, r: int, prefix: int, class_token: int) -> np.ndarray:
    """Per sample [B]: the smallest reference margin among the decisions its TokenMerge step rests on (each
    merged A token's best match; which r A tokens merge; without class_token, the order of the unmerged ones).
    Scores are cosines of unit vectors, summed from magnitude 1: compare with noise(1.0)."""
    margins = []
    for sample in np.asarray(metric, np.float64):
        a_pos, b_pos = split(len(sample), prefix)
        if r == 0 or not len(a_pos) or not len(b_pos):
            margins.append(np.inf)
            continue
        unit = sample / np.linalg.norm(sample, axis=-1, keepdims=True)
        scores = unit[a_pos] @ unit[b_pos].T
        best = scores.max(axis=-1)
        merged = np.argsort(-best, kind="stable")[:r]
        found = [argmax_margin(scores)[merged].min(), boundary_margin(best, r).min()]
        if not class_token:
            found.append(order_margin(np.delete(best, merged)).min(initial=np.inf))
        margins.append(min(found))
    return np.array(margins)


SPEC = register(PluginSpec(
    name="TokenMerge",
    doc="one ToMe step: bipartite matching on head-averaged keys, size-weighted merge of the r best pairs",
    fields=(
        Field("r", int, 0, "tokens merged away"),
        Field("prefix", int, 1, "protected tokens in front (class, distillation, registers)"),
        Field("class_token", int, 1, "1: unmerged A tokens keep position order (the reference with a class token)"),
    ),
    inputs=(
        Tensor("x", 3, "tokens [B, N, C]"),
        Tensor("metric", 3, "keys averaged over heads [B, N, D]"),
        Tensor("size", 3, "patches each token stands for [B, N, 1]"),
    ),
    outputs=(
        Tensor("merged", 3, "tokens [B, N - r, C]"),
        Tensor("merged_size", 3, "sizes [B, N - r, 1]"),
    ),
    output_shapes=_output_shapes,
    check=_check,
    kernels="token_merge",
    cases=_cases,
    intermediates=_intermediates,
    margins=_margins,
))


def plan(metric: np.ndarray, r: int, prefix: int, class_token: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The matching for one sample: (kept source positions, merged A positions in rank order, their output rows)."""
    tokens = metric.shape[0]
    a_pos, b_pos = split(tokens, prefix)
    unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    scores = unit[a_pos] @ unit[b_pos].T
    match = scores.argmax(axis=-1)  # first maximum on ties
    best = scores[np.arange(len(a_pos)), match]
    order = np.argsort(-best, kind="stable")  # best first; equal scores: lower index first
    merged, unmerged = order[:r], order[r:]
    if class_token:
        unmerged = np.sort(unmerged)
    keep = np.concatenate([np.arange(prefix), a_pos[unmerged], b_pos])
    rows = prefix + len(a_pos) - r + match[merged]
    return keep, a_pos[merged], rows


@reference("TokenMerge")
def token_merge(x: np.ndarray, metric: np.ndarray, size: np.ndarray, r: int, prefix: int, class_token: int):
    """Per sample: kept tokens weighted by size, plus the sum of the weighted sources sent to each row
    (sources summed first, in rank order, then added: the same arithmetic as the one-hot MatMul)."""
    if r == 0:
        return x.copy(), size.copy()
    batch, tokens, channels = x.shape
    out = np.empty((batch, tokens - r, channels), x.dtype)
    out_size = np.empty((batch, tokens - r, 1), size.dtype)
    for b in range(batch):
        keep, sources, rows = plan(metric[b], r, prefix, class_token)
        packed = np.concatenate([x[b] * size[b], size[b]], axis=-1)
        moved = np.zeros((tokens - r, channels + 1), x.dtype)
        for source, row in zip(sources, rows):
            moved[row] += packed[source]
        total = packed[keep] + moved
        out[b] = total[:, :channels] / total[:, channels:]
        out_size[b] = total[:, channels:]
    return out, out_size
