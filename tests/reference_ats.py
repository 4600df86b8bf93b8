"""ATS's token sampling for one image, written from the reference code's steps as plain Python loops
(independent of edgetok/vit/ats.py): the tokens kept for given class-attention and value-norm scores."""

import math


def ats_keep(cls_attention, value_norm, n_ref, budget):
    """Kept token indices (position 0 is the class token, always kept) for one image of N tokens.

    cls_attention[j]: the class token's attention to token j summed over heads; value_norm[j]: ||V_j||."""
    n = len(cls_attention)
    # n_tokens rules (reference forward): cap at N, fraction of N, at least 8, rounded, at most N
    n_tokens = budget
    if n_tokens > n:
        n_tokens = n
    if n_tokens <= 1.0:
        n_tokens = n_tokens * n
    if n_tokens < 8:
        n_tokens = 8
    n_tokens = round(n_tokens)
    if n < n_tokens:
        n_tokens = n
    scores = [cls_attention[j] * value_norm[j] for j in range(1, n)]
    total = sum(scores)
    scores = [s / total for s in scores]
    order = sorted(range(n - 1), key=lambda j: scores[j])  # ascending (stable: equal scores by index)
    cdf, running = [], 0.0
    for j in order:
        running += scores[j]
        cdf.append(running)
    low, high = min(cdf), max(cdf)
    cdf = [(c - low) / (high - low) for c in cdf]
    # targets: n_ref - 1 points, evenly from the smallest non-zero CDF value to 1
    start = min(c if c != 0 else 1e8 for c in cdf)
    targets = [start + (i - start * i) / (n_ref - 2) for i in range(n_ref - 1)]
    # the reference pads the CDF on the left with zeros up to n_ref - 1 entries, then removes the offset
    diff = (n_ref - 1) - (n - 1)
    padded = [0.0] * diff + cdf
    picks = []
    for y in targets:
        best, at = math.inf, 0
        for i, c in enumerate(padded):
            if abs(y - c) < best:  # the first nearest
                best, at = abs(y - c), i
        picks.append(at - diff)
    # repeats collapse as the reference's get_unique_indices does: sorted, an entry equal to the next one is
    # dropped, and the last one is compared with 1 (so a last pick of 1 is dropped too)
    picks = sorted(picks)
    unique = [p for i, p in enumerate(picks) if p != (picks[i + 1] if i + 1 < len(picks) else 1)]
    unique = sorted(unique)[-(n_tokens - 1):]  # a budget below the count keeps the best-scoring picks
    return [0] + sorted(order[p] + 1 for p in unique)
