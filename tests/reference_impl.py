"""A second, deliberately naive implementation of ToMe and EViT for timm VisionTransformers.

It is written from the method descriptions, not from ``edgetok.vit``: every image is run on its
own, attention is computed by hand from the block's projections, and every discrete decision
(which B token an A token matches, which tokens merge, which tokens EViT keeps) is a plain Python
loop over tokens. Only the model's method-independent pieces (embedding, norms, MLP, projections,
head) are reused. Tests compare the patched model against this to catch indexing mistakes that a
vectorised implementation can hide.

Besides the logits it returns the tokens entering each block's MLP and the smallest gap seen in any
discrete decision, so a test can tell a real mismatch from a near-tie flipping a choice.
"""

from __future__ import annotations

import math

import torch


def attention(block, x: torch.Tensor, sizes: list[float], proportional: bool):
    """Self-attention of one image's tokens ``x`` [N, C]; returns (output [N, C], q, k [H, N, D]).

    Proportional attention (ToMe) adds log(size) of each key to the logits, so a merged token
    counts as the patches it stands for; log(1) = 0 leaves unmerged models unchanged.
    """
    attn = block.attn
    n = x.shape[0]
    qkv = attn.qkv(block.norm1(x)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale  # [H, N, N]
    if proportional:
        logits = logits + torch.tensor(sizes, dtype=x.dtype).log()[None, None, :]
    out = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, -1)  # concatenate the heads
    out = attn.proj(attn.norm(out))  # attn.norm is Identity unless the model asks for it
    return out, q, k


def tome_merge(x: torch.Tensor, sizes: list[float], k: torch.Tensor, r: int, prefix: int, stats: dict):
    """Bipartite soft matching: merge the r best-matched A tokens into their most similar B token.

    A = non-prefix positions prefix, prefix+2, ...; B = prefix+1, prefix+3, .... Similarity is the
    cosine of the head-averaged keys. Merging is the size-weighted average; sizes add up.
    """
    metric = k.mean(dim=0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    set_a, set_b = list(range(prefix, n, 2)), list(range(prefix + 1, n, 2))
    best = {}  # a -> (score, b)
    for a in set_a:
        sims = [(float(metric[a] @ metric[b]), b) for b in set_b]
        sims.sort(reverse=True)
        best[a] = sims[0]
        if len(sims) > 1:
            note_gap(stats, sims[0][0] - sims[1][0])
    ranked = sorted(set_a, key=lambda a: best[a][0], reverse=True)
    if r < len(ranked):
        note_gap(stats, best[ranked[r - 1]][0] - best[ranked[r]][0])
    merged = set(ranked[:r])
    total = {b: x[b] * sizes[b] for b in set_b}
    weight = {b: sizes[b] for b in set_b}
    for a in merged:
        b = best[a][1]
        total[b] = total[b] + x[a] * sizes[a]
        weight[b] += sizes[a]
    rows = [x[i] for i in range(prefix)] + [x[a] for a in set_a if a not in merged]
    new_sizes = [sizes[i] for i in range(prefix)] + [sizes[a] for a in set_a if a not in merged]
    for b in set_b:
        rows.append(total[b] / weight[b])
        new_sizes.append(weight[b])
    return torch.stack(rows), new_sizes


def evit_fuse(x, sizes, q, k, scale, kept: int, prefix: int, stats: dict):
    """Keep the ``kept`` non-prefix tokens the class token attends to most; fuse the rest into one.

    Class attention is the softmax of query 0 over all keys (no size bias), averaged over heads;
    the fused token is the attention-weighted average of the dropped tokens, appended last.
    """
    cls_attn = ((torch.einsum("hd,hnd->hn", q[:, 0], k) * scale).softmax(dim=-1)).mean(dim=0)
    ranked = sorted(range(prefix, x.shape[0]), key=lambda j: float(cls_attn[j]), reverse=True)
    note_gap(stats, float(cls_attn[ranked[kept - 1]] - cls_attn[ranked[kept]]))
    keep, drop = ranked[:kept], ranked[kept:]
    fused = sum(cls_attn[j] * x[j] for j in drop) / sum(cls_attn[j] for j in drop)
    rows = [x[i] for i in range(prefix)] + [x[j] for j in keep] + [fused]
    new_sizes = [sizes[i] for i in range(prefix)] + [sizes[j] for j in keep] + [sum(sizes[j] for j in drop)]
    return torch.stack(rows), new_sizes


def note_gap(stats: dict, gap: float) -> None:
    """Remember the closest call: a gap near rounding error means the choice is a near-tie."""
    stats["min_gap"] = min(stats.get("min_gap", math.inf), gap)


@torch.no_grad()
def reference_forward(model, images, method: str = "none", r_per_layer=None, keep_rate=None, keep_layers=()):
    """Logits of ``model`` (an unpatched timm VisionTransformer) with the method applied.

    Returns (logits [B, classes], tokens entering each block's MLP for the first image, stats).
    """
    prefix = model.num_prefix_tokens
    stats: dict = {}
    outputs, counts = [], []
    for image in images:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
        sizes = [1.0] * x.shape[0]
        image_counts = []
        for layer, block in enumerate(model.blocks):
            out, q, k = attention(block, x, sizes, proportional=method == "tome")
            x = x + block.ls1(out)
            if method == "tome" and r_per_layer[layer] > 0:
                x, sizes = tome_merge(x, sizes, k, r_per_layer[layer], prefix, stats)
            elif method == "evit" and layer in keep_layers:
                kept = math.ceil(keep_rate * (x.shape[0] - prefix))
                if kept < x.shape[0] - prefix:
                    x, sizes = evit_fuse(x, sizes, q, k, block.attn.scale, kept, prefix, stats)
            image_counts.append(x.shape[0])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        outputs.append(model.forward_head(model.norm(x[None]))[0])
        counts = counts or image_counts
    return torch.stack(outputs), counts, stats
