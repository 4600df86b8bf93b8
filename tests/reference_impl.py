"""A second, deliberately naive implementation of every token-reduction method for timm VisionTransformers.

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


def tome_merge(x, sizes, k, r: int, prefix: int, class_token: bool, distill_token: bool, stats: dict):
    """Bipartite soft matching as Bolya et al. (ICLR 2023) describe it and their released code does it.

    1. Split *all* tokens by position into A (0, 2, 4, ...) and B (1, 3, 5, ...).
    2. Score every (a, b) pair by the cosine similarity of the head-averaged keys. The class token
       (A's first) gets a -inf row, so it is never merged; a distillation token (B's first) gets a
       -inf column, so nothing merges into it. Register tokens, which the paper predates, are
       protected the same way: a -inf row where they fall in A, a -inf column where they fall in B.
    3. Each a keeps its best b; the r edges with the highest scores are merged (size-weighted mean,
       sizes add up).
    4. The output is the unmerged A tokens, then B. With a class token the unmerged A tokens are put
       back in position order; without one they stay in score order. With a distillation token it
       moves to second place (cls, dist, rest of A, rest of B); in general every prefix token comes
       first, in position order.
    """
    metric = k.mean(dim=0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    set_a, set_b = list(range(0, n, 2)), list(range(1, n, 2))
    score = {}
    for a in set_a:
        for b in set_b:
            score[a, b] = -math.inf if a < prefix or b < prefix else float(metric[a] @ metric[b])
    best = {}  # a -> (score, b)
    for a in set_a:
        sims = sorted(((score[a, b], b) for b in set_b), reverse=True)
        best[a] = sims[0]
        finite = [s for s, _ in sims if s > -math.inf]
        if len(finite) > 1:
            note_gap(stats, finite[0] - finite[1])
    ranked = sorted(set_a, key=lambda a: best[a][0], reverse=True)
    if r < len(ranked) and best[ranked[r]][0] > -math.inf:
        note_gap(stats, best[ranked[r - 1]][0] - best[ranked[r]][0])
    merged = ranked[:r]
    assert all(a >= prefix for a in merged), "a protected token was merged: r is larger than ToMe allows"
    total = {b: x[b] * sizes[b] for b in set_b}
    weight = {b: sizes[b] for b in set_b}
    for a in merged:
        b = best[a][1]
        assert b >= prefix
        total[b] = total[b] + x[a] * sizes[a]
        weight[b] += sizes[a]
    unmerged = ranked[r:]
    if class_token:
        unmerged = sorted(unmerged)
    if distill_token:  # the reference's cat([unm[:1], dst[:1], unm[1:], dst[1:]])
        order = unmerged[:1] + set_b[:1] + unmerged[1:] + set_b[1:]
    else:
        order = unmerged + set_b
    # Registers: every prefix token first, in position order (a no-op for class/distillation tokens).
    order = sorted(i for i in order if i < prefix) + [i for i in order if i >= prefix]
    rows = [total[i] / weight[i] if i in total else x[i] for i in order]
    new_sizes = [weight[i] if i in total else sizes[i] for i in order]
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


def pitome_merge(x, sizes, k, r: int, prefix: int, margin: float, stats: dict):
    """PiToMe as Tran et al. (NeurIPS 2024) describe it and their released merge.py does it.

    1. The metric: keys averaged over heads, L2-normalised, of the non-prefix tokens.
    2. Energy of token i: the mean over all j of ELU(cos(i, j) - margin).
    3. Tokens by energy, highest first (equal energies by position); the first 2r alternate A, B, ...;
       the rest are protected.
    4. Each A token merges into its most similar B token (equal similarities: the earlier B); size-weighted.
    5. Output: the prefix tokens, the protected ones (energy order), then B (energy order).
    """
    metric = k.mean(dim=0)[prefix:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = metric.shape[0]
    cos = [[float(metric[i] @ metric[j]) for j in range(n)] for i in range(n)]

    def elu(v):
        return v if v > 0 else math.exp(v) - 1.0

    energy = [sum(elu(cos[i][j] - margin) for j in range(n)) / n for i in range(n)]
    order = sorted(range(n), key=lambda i: (-energy[i], i))
    for i, j in zip(order, order[1:]):
        note_gap(stats, energy[i] - energy[j])
    set_a, set_b, protected = order[0:2 * r:2], order[1:2 * r:2], order[2 * r:]
    groups = {b: [b] for b in set_b}
    for a in set_a:
        ranked = sorted(set_b, key=lambda b: -cos[a][b])
        if len(ranked) > 1:
            note_gap(stats, cos[a][ranked[0]] - cos[a][ranked[1]])
        groups[ranked[0]].append(a)
    rows = [x[i] for i in range(prefix)] + [x[prefix + i] for i in protected]
    new_sizes = [sizes[i] for i in range(prefix)] + [sizes[prefix + i] for i in protected]
    for b in set_b:
        members = [prefix + m for m in groups[b]]
        total = sum(sizes[m] for m in members)
        rows.append(sum(sizes[m] * x[m] for m in members) / total)
        new_sizes.append(total)
    return torch.stack(rows), new_sizes


def pitome_bsm_merge(x, sizes, k, r: int, prefix: int, margin: float, stats: dict):
    """``pitome_bsm`` of the authors' merge.py (hchautran/PiToMe 550b5de), the rule of their DeiT patch's first
    ceil(L/2) blocks.

    1-3. As ``pitome_merge``: energies, tokens by energy (highest first, equal energies by position).
    4. *All* tokens alternate A, B, A, ... along that order (``indices[..., ::2]``, ``indices[..., 1::2]``).
    5. Each A token's most similar B token (equal similarities: the earlier B); A tokens ranked by that best
       similarity, highest first (equal: the earlier A); the first r merge into their B (size-weighted).
    6. Output: the prefix tokens, the unmerged A tokens in that ranking, then B (energy order).
    """
    metric = k.mean(dim=0)[prefix:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = metric.shape[0]
    cos = [[float(metric[i] @ metric[j]) for j in range(n)] for i in range(n)]

    def elu(v):
        return v if v > 0 else math.exp(v) - 1.0

    energy = [sum(elu(cos[i][j] - margin) for j in range(n)) / n for i in range(n)]
    order = sorted(range(n), key=lambda i: (-energy[i], i))
    for i, j in zip(order, order[1:]):
        note_gap(stats, energy[i] - energy[j])
    set_a, set_b = order[0::2], order[1::2]
    best = {}
    for a in set_a:
        ranked = sorted(set_b, key=lambda b: -cos[a][b])
        if len(ranked) > 1:
            note_gap(stats, cos[a][ranked[0]] - cos[a][ranked[1]])
        best[a] = ranked[0]
    edges = sorted(set_a, key=lambda a: -cos[a][best[a]])
    for a, b in zip(edges, edges[1:]):
        note_gap(stats, cos[a][best[a]] - cos[b][best[b]])
    groups = {b: [b] for b in set_b}
    for a in edges[:r]:
        groups[best[a]].append(a)
    rows = [x[i] for i in range(prefix)] + [x[prefix + a] for a in edges[r:]]
    new_sizes = [sizes[i] for i in range(prefix)] + [sizes[prefix + a] for a in edges[r:]]
    for b in set_b:
        members = [prefix + m for m in groups[b]]
        total = sum(sizes[m] for m in members)
        rows.append(sum(sizes[m] * x[m] for m in members) / total)
        new_sizes.append(total)
    return torch.stack(rows), new_sizes


@torch.no_grad()
def pitome_forward(model, images, r_per_layer, variant: str = "reference"):
    """Logits with PiToMe, and the tokens entering each MLP. ``reference``: the authors' DeiT patch
    (algo/pitome/patch/deit.py at 550b5de): margins 0.75 - 0.75*l/L, ``pitome_bsm`` in the first ceil(L/2)
    blocks, ``pitome`` after, attention without sizes (their block calls ``self.attn(self.norm1(x))``).
    ``protected``: margins 0.9 - 0.8*l/L, ``pitome`` in every block, proportional attention."""
    depth = len(model.blocks)
    if variant == "reference":
        margins, bsm, proportional = [0.75 - 0.75 * (i / depth) for i in range(depth)], math.ceil(depth * 0.5), False
    else:
        margins, bsm, proportional = [0.9 - 0.8 * (i / depth) for i in range(depth)], 0, True
    prefix = model.num_prefix_tokens
    stats: dict = {}
    outputs, counts = [], []
    for image in images:
        x = embedded(model, image)
        sizes = [1.0] * x.shape[0]
        image_counts = []
        for layer, block in enumerate(model.blocks):
            out, q, k = attention(block, x, sizes, proportional=proportional)
            x = x + block.ls1(out)
            if r_per_layer[layer]:
                merge = pitome_bsm_merge if layer < bsm else pitome_merge
                x, sizes = merge(x, sizes, k, r_per_layer[layer], prefix, margins[layer], stats)
            image_counts.append(x.shape[0])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        outputs.append(model.forward_head(model.norm(x[None]))[0])
        counts = counts or image_counts
    return torch.stack(outputs), counts, stats


def gtp_graph(x, prefix: int, kind: str, neighbours: int = 8):
    """GTP's graph over one image's embedded patch tokens, entry by entry: spatial (grid cells touching,
    itself excluded), semantic (j at or above i's (k+1)-th largest cosine similarity, itself excluded) or
    either; then D^-1/2 G D^-1/2 with D the row sums."""
    patches = x[prefix:]
    n = patches.shape[0]
    side = math.isqrt(n)
    unit = patches / patches.norm(dim=-1, keepdim=True)
    cos = [[float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    graph = [[0.0] * n for _ in range(n)]
    for i in range(n):
        cut = sorted(cos[i], reverse=True)[neighbours]
        for j in range(n):
            near = abs(i // side - j // side) <= 1 and abs(i % side - j % side) <= 1
            similar = cos[i][j] >= cut
            linked = {"spatial": near, "semantic": similar, "mixed": near or similar}[kind]
            graph[i][j] = 1.0 if linked and i != j else 0.0
    degree = [sum(row) for row in graph]
    return [[graph[i][j] / math.sqrt(degree[i] * degree[j]) if graph[i][j] else 0.0 for j in range(n)] for i in range(n)]


def gtp_attention(block, x, sizes, theta: float, stats: dict):
    """One block's attention as models_v3.py's ``Attention`` computes it: softmax of q·k·scale + log(size); with
    θ < 1, in each head the entries below the k-th smallest of the N² (k = int(N*N*(1 - theta)), its
    ``kthvalue``) set to 0, not renormalised. Returns (output [N, C], probabilities [H, N, N])."""
    attn = block.attn
    n = x.shape[0]
    qkv = attn.qkv(block.norm1(x)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale + torch.tensor(sizes, dtype=x.dtype).log()[None, None, :]
    probs = logits.softmax(dim=-1)
    count = int(n * n * (1 - theta))
    if theta < 1 and count >= 1:
        for h in range(probs.shape[0]):
            values = sorted(float(v) for v in probs[h].flatten())
            cut = values[count - 1]
            if count >= 2:
                note_gap(stats, cut - values[count - 2])  # the largest entry zeroed against the cut
            for i in range(n):
                for j in range(n):
                    if float(probs[h, i, j]) < cut:
                        probs[h, i, j] = 0.0
    out = (probs @ v).transpose(0, 1).reshape(n, -1)
    return attn.proj(attn.norm(out)), probs


def gtp_propagate(x, sizes, attn, graph, p: int, prefix: int, alpha: float, stats: dict):
    """One GTP step on one image: rank = max over heads of A[i, i] times max over heads of the attention token
    i receives (A: the block's probabilities, with log(size) and θ, all queries); the p lowest-ranked patch tokens
    are removed and each kept token (in rank order, highest first) adds alpha * graph[kept, removed] * removed,
    tokens and sizes alike."""
    n = x.shape[0]
    rank = {}
    for i in range(prefix, n):
        rank[i] = max(float(attn[h, i, i]) for h in range(attn.shape[0])) * \
            max(float(attn[h, :, i].sum()) for h in range(attn.shape[0]))
    order = sorted(rank, key=lambda i: (-rank[i], i))
    for i, j in zip(order, order[1:]):
        note_gap(stats, rank[i] - rank[j])
    kept, gone = order[:-p], order[-p:]
    rows = [x[i] for i in range(prefix)]
    new_sizes = [sizes[i] for i in range(prefix)]
    for i in kept:
        w = [graph[i - prefix][j - prefix] for j in gone]
        rows.append(x[i] + alpha * sum(wj * x[j] for wj, j in zip(w, gone)))
        new_sizes.append(sizes[i] + alpha * sum(wj * sizes[j] for wj, j in zip(w, gone)))
    new_graph = [[graph[i - prefix][j - prefix] for j in kept] for i in kept]
    return torch.stack(rows), new_sizes, new_graph


def zerotprune_prune(x, q, k, scale, r: int, steps: int, prefix: int, class_token: bool, bounds, share: float,
                     stats: dict):
    """Zero-TPrune's pruning layer (Wang et al., CVPR 2024) on one image's tokens ``x`` [N, C], read from the paper's
    description loop by loop: per head, attention a[h][j][i] = softmax_i(q_j·k_i·scale).

    - importance(nodes, steps): per head, the graph over ``nodes`` (rows renormalised over them); scores start
      uniform, the class token at sqrt(len(nodes)) times the others, summing to 1; each step
      s'[i] = sum_j a[j][i]·s[j]. A head counts if the variance of len(nodes)·s lies within ``bounds`` (every head
      if none does); a token's importance is the root mean square of its scores over the heads that count.
    - I′: importance(all, 1). S: patch tokens by it (highest first, equal by position); the last floor(t/2) are
      A, the rest B; each A token's best cosine (head-averaged keys) to B; the floor(r·share) best-matching A
      tokens (equal: the more important first) are discarded.
    - I: importance(survivors, steps); the r − floor(r·share) least important survivors (equal: by position) go.
    Survivors stay in position order; prefix tokens are never pruned.
    """
    heads, n = q.shape[0], q.shape[1]
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1).tolist()

    def importance(nodes, iterations):
        per_head = []
        for h in range(heads):
            rows = []
            for j in nodes:
                row = [attn[h][j][i] for i in nodes]
                rows.append([v / sum(row) for v in row])
            start = [math.sqrt(len(nodes)) if class_token and node == 0 else 1.0 for node in nodes]
            score = [v / sum(start) for v in start]
            for _ in range(iterations):
                score = [sum(rows[j][i] * score[j] for j in range(len(nodes))) for i in range(len(nodes))]
            per_head.append(score)
        use = []
        for score in per_head:
            scaled = [len(nodes) * v for v in score]
            mean = sum(scaled) / len(scaled)
            variance = sum((v - mean) ** 2 for v in scaled) / len(scaled)
            note_gap(stats, min(abs(variance - bounds[0]), abs(variance - bounds[1])))
            use.append(bounds[0] <= variance <= bounds[1])
        chosen = [score for score, counts in zip(per_head, use) if counts] or per_head
        return {node: math.sqrt(sum(score[i] ** 2 for score in chosen) / len(chosen)) for i, node in enumerate(nodes)}

    def cut_gap(values, at):
        if 0 < at < len(values):
            note_gap(stats, abs(values[at - 1] - values[at]))

    by_similarity = math.floor(r * share)
    survivors = list(range(n))
    if by_similarity:
        vote = importance(survivors, 1)
        ranked = sorted(range(prefix, n), key=lambda i: (-vote[i], i))
        t = len(ranked)
        cut_gap([vote[i] for i in ranked], t - t // 2)
        set_b, set_a = ranked[:t - t // 2], ranked[t - t // 2:]
        metric = k.mean(dim=0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        best = [max(float(metric[a] @ metric[b]) for b in set_b) for a in set_a]
        order = sorted(range(len(set_a)), key=lambda i: (-best[i], i))
        cut_gap([best[i] for i in order], by_similarity)
        discarded = {set_a[i] for i in order[:by_similarity]}
        survivors = [i for i in survivors if i not in discarded]
    score = importance(survivors, steps)
    ranked = sorted((i for i in survivors if i >= prefix), key=lambda i: (-score[i], i))
    gone = len(ranked) - (r - by_similarity)
    cut_gap([score[i] for i in ranked], gone)
    dropped = set(ranked[gone:])
    kept = [i for i in survivors if i not in dropped]
    return x[kept], [1.0] * len(kept)


@torch.no_grad()
def gtp_forward(model, images, propagate, alpha: float, kind: str, theta: float = 1.0):
    """Logits with GTP in every block (``propagate``: tokens per block; θ in every block's attention), and the
    tokens entering each MLP."""
    prefix = model.num_prefix_tokens
    stats: dict = {}
    outputs, counts = [], []
    for image in images:
        x = embedded(model, image)
        graph = gtp_graph(x, prefix, kind)
        sizes = [1.0] * x.shape[0]
        image_counts = []
        for layer, block in enumerate(model.blocks):
            out, attn = gtp_attention(block, x, sizes, theta, stats)
            x = x + block.ls1(out)
            if propagate[layer]:
                x, sizes, graph = gtp_propagate(x, sizes, attn, graph, propagate[layer], prefix, alpha, stats)
            image_counts.append(x.shape[0])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        outputs.append(model.forward_head(model.norm(x[None]))[0])
        counts = counts or image_counts
    return torch.stack(outputs), counts, stats


def embedded(model, image):
    """One image's tokens entering the first block (the model's own embedding, position and pre-norm)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]


def note_gap(stats: dict, gap: float) -> None:
    """Remember the closest call: a gap near rounding error means the choice is a near-tie."""
    stats["min_gap"] = min(stats.get("min_gap", math.inf), gap)


@torch.no_grad()
def reference_forward(model, images, method: str = "none", r_per_layer=None, keep_rate=None, keep_layers=(),
                      zerotprune=None):
    """Logits of ``model`` (an unpatched timm VisionTransformer) with the method applied.

    Returns (logits [B, classes], tokens entering each block's MLP for the first image, stats).
    """
    prefix = model.num_prefix_tokens
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    stats: dict = {}
    outputs, counts = [], []
    for image in images:
        x = embedded(model, image)
        sizes = [1.0] * x.shape[0]
        image_counts = []
        for layer, block in enumerate(model.blocks):
            out, q, k = attention(block, x, sizes, proportional=method == "tome")
            x = x + block.ls1(out)
            if method == "zerotprune" and r_per_layer[layer] > 0:
                x, sizes = zerotprune_prune(x, q, k, block.attn.scale, r_per_layer[layer], zerotprune["steps"][layer],
                                            prefix, class_token, zerotprune["bounds"], zerotprune["share"], stats)
            elif method == "tome" and r_per_layer[layer] > 0:
                x, sizes = tome_merge(x, sizes, k, r_per_layer[layer], prefix, class_token, distill_token, stats)
            elif method == "evit" and layer in keep_layers:
                kept = math.ceil(keep_rate * (x.shape[0] - prefix))
                if kept < x.shape[0] - prefix:
                    x, sizes = evit_fuse(x, sizes, q, k, block.attn.scale, kept, prefix, stats)
            image_counts.append(x.shape[0])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        outputs.append(model.forward_head(model.norm(x[None]))[0])
        counts = counts or image_counts
    return torch.stack(outputs), counts, stats


def dtome_merge(x, sizes, k, threshold: float, prefix: int, cap, stats: dict):
    """DyMU's dynamic ToMe on one image's real tokens ``x`` [N, C] (no padding), as the paper describes it.

    ToMe's split and scores (see ``tome_merge``: A = even positions, B = odd, prefix tokens protected by
    the set they fall in), but instead of the r best edges, every A token whose best similarity is
    *above* ``threshold`` merges into its match; with a ``cap``, only the image's ``cap`` best-matching A
    tokens may (ties: the first position). The survivors come out as DyMU's (and ToMe's) merge writes them:
    prefix tokens, the unmerged A tokens, then the B tokens, each in position order -- unless no A token's
    best similarity exceeds the threshold (before the cap): DyMU's per-image step (``bipartite_soft_matching``
    with ``specified_threshold``) then returns ``do_nothing`` and the tokens stay where they are.
    Returns (tokens, sizes, number merged).
    """
    metric = k.mean(dim=0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    n = x.shape[0]
    set_a = [a for a in range(0, n, 2) if a >= prefix]
    set_b = [b for b in range(1, n, 2) if b >= prefix]
    best = {}  # a -> (score, b): the first b with the highest score
    for a in set_a:
        scores = [(float(metric[a] @ metric[b]), b) for b in set_b]
        top = None
        for s, b in scores:
            if top is None or s > top[0]:
                top = (s, b)
        if top is None:
            continue
        best[a] = top
        others = [s for s, b in scores if b != top[1]]
        if others:
            note_gap(stats, top[0] - max(others))
        note_gap(stats, abs(top[0] - threshold))
    if not any(score > threshold for score, _ in best.values()):
        return x, list(sizes), 0
    ranked = sorted(best, key=lambda a: (-best[a][0], a))
    if cap is not None:
        if 0 < cap < len(ranked):
            note_gap(stats, best[ranked[cap - 1]][0] - best[ranked[cap]][0])
        ranked = ranked[:cap]
    merged = [a for a in ranked if best[a][0] > threshold]
    total = {i: x[i] * sizes[i] for i in range(n)}
    weight = {i: sizes[i] for i in range(n)}
    for a in merged:
        b = best[a][1]
        total[b] = total[b] + x[a] * sizes[a]
        weight[b] += sizes[a]
    order = list(range(min(prefix, n))) + [a for a in set_a if a not in merged] + set_b
    return torch.stack([total[i] / weight[i] for i in order]), [weight[i] for i in order], len(merged)


@torch.no_grad()
def dtome_forward(model, images, thresholds, cap=None):
    """Logits of ``model`` (an unpatched timm VisionTransformer) with dtome applied, each image on its own.

    Returns (logits [B, classes], per image the tokens entering each block's MLP, stats)."""
    prefix = model.num_prefix_tokens
    stats: dict = {}
    outputs, counts = [], []
    for image in images:
        x = embedded(model, image)
        sizes = [1.0] * x.shape[0]
        image_counts = []
        for layer, block in enumerate(model.blocks):
            out, q, k = attention(block, x, sizes, proportional=True)
            x = x + block.ls1(out)
            if thresholds[layer] != math.inf:
                layer_cap = cap[layer] if isinstance(cap, (list, tuple)) else cap
                x, sizes, _ = dtome_merge(x, sizes, k, thresholds[layer], prefix, layer_cap, stats)
            image_counts.append(x.shape[0])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        outputs.append(model.forward_head(model.norm(x[None]))[0])
        counts.append(image_counts)
    return torch.stack(outputs), counts, stats
