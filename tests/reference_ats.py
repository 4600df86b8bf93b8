"""ATS for one image, written from the reference code's steps as plain Python loops (independent of
edgetok/vit/methods/ats_torch.py): the reference's softmax_with_policy, the scores, the tokens kept for given scores, and a
whole model's forward (adaptivetokensampling/ATS, libs/models/transformers/transformer_block.py, ats_block.py)."""

import math

import torch

EPS = 1e-6  # softmax_with_policy's eps


def policy_softmax_row(logits, eps=EPS):
    """One attention row as the reference's softmax_with_policy computes it for an image alone (every policy 1,
    N = its tokens): (exp(l - max) + eps/N) / (sum exp(l - max) + eps). eps = 0 is a plain softmax."""
    n = len(logits)
    top = max(logits)
    e = [math.exp(value - top) for value in logits]
    total = sum(e)
    return [(value + eps / n) / (total + eps) for value in e]


def ats_scores(q, k, v, scale, eps=EPS):
    """score_assignment_step's inputs for one image from its q, k, v [H][N][D] (nested lists): the class token's
    attention row (softmax_with_policy of (q kᵀ)·scale) summed over heads, and each token's value norm over
    all heads."""
    heads, n, dim = len(q), len(k[0]), len(q[0][0])
    attention = [0.0] * n
    for h in range(heads):
        logits = [sum(q[h][0][d] * k[h][j][d] for d in range(dim)) * scale for j in range(n)]
        for j, p in enumerate(policy_softmax_row(logits, eps)):
            attention[j] += p
    norms = [math.sqrt(sum(v[h][j][d] ** 2 for h in range(heads) for d in range(dim))) for j in range(n)]
    return attention, norms


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


def _policy_attention(block, x):
    """One image's attention [N, C] with softmax_with_policy, each row written out as the formula; and the
    q, k, v [H, N, D] it came from."""
    attn = block.attn
    n = x.shape[0]
    qkv = attn.qkv(block.norm1(x)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale  # [H, N, N]
    e = (logits - logits.max(dim=-1, keepdim=True).values).exp()
    probs = (e + EPS / n) / (e.sum(dim=-1, keepdim=True) + EPS)
    out = (probs @ v).transpose(0, 1).reshape(n, -1)
    return attn.proj(attn.norm(out)), q, k, v


@torch.no_grad()
def ats_forward(model, images, blocks, budget, n_ref):
    """Logits of ``model`` (an unpatched timm VisionTransformer with a class token) with ATS sampling in
    ``blocks``, each image alone as the reference runs it at batch 1: every block attends with
    softmax_with_policy; an ATS block scores from its own attention and values, keeps ``ats_keep``'s tokens
    (their rows after attention) and runs the MLP on them. Returns (logits [B, classes], per image the tokens
    left after each block)."""
    outputs, counts = [], []
    for image in images:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
        left = []
        for layer, block in enumerate(model.blocks):
            out, q, k, v = _policy_attention(block, x)
            x = x + block.ls1(out)
            if layer in blocks:
                n = x.shape[0]
                attention = [0.0] * n
                for h in range(q.shape[0]):  # the class token's row, as ats_scores (tensors for speed)
                    logits = ((q[h, 0] @ k[h].T) * block.attn.scale).tolist()
                    for j, p in enumerate(policy_softmax_row(logits)):
                        attention[j] += p
                norms = v.transpose(0, 1).reshape(n, -1).norm(dim=-1).tolist()
                x = x[ats_keep(attention, norms, n_ref, budget)]
            left.append(x.shape[0])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        outputs.append(model.forward_head(model.norm(x[None]))[0])
        counts.append(left)
    return torch.stack(outputs), counts
