"""Zero-TPrune (Wang, Dedhia, Jha, CVPR 2024): zero-shot pruning on the attention graph, as a token transform.

No official code was released; this follows the paper as ../shared/notes/token-reduction.md summarises it. In a
block that prunes r tokens, after the attention residual (pruning is token-wise, so the kept tokens leave the
MLP exactly as they would if pruned after it), from the block's attention A = softmax(q·kᵀ·scale) per head:

- I′ stage: one Weighted-PageRank vote (no pruning) ranks the patch tokens by importance;
- S stage: the less important half is A, the rest B; each A token's best cosine similarity to B (keys averaged
  over heads); the floor(r·share) most similar A tokens are *discarded* (pruned, not merged; share 0.5);
- I stage: Weighted PageRank on the graph of the survivors (A's rows and columns, rows renormalised),
  s ← Aᵀ·s from uniform with the class token starting at √N times the others (Emphasizing Informative Region),
  30 iterations in the first three blocks, 5 in the middle, 1 in the last three (the low end of the paper's
  30–50 / 5–10 / 1); heads combined by the root mean square over the heads whose score variance (of N·s, mean
  1) lies in [0.01, 0.7] (all heads if none does); the remaining least important patch tokens are pruned.

Our choices where the summary is silent, each an option where it changes accuracy: the share of r the S stage
prunes (``--similarity-share``, 0.5), the variance taken of N·s (mean 1: the only scale on which both bounds
can bite; ``--head-variance``), the survivors' graph renormalised, the survivors kept in position order.
Prefix tokens (class, distillation, registers) are never pruned and vote as nodes of the graph; ties rank by
position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgetok.errors import EdgetokError
from edgetok.vit.token_transform import TokenTransform, gather_tokens
from edgetok.vit.methods.tome_torch import rank_descending

ITERATIONS = (30, 5, 1)  # Weighted-PageRank steps: first three blocks, the middle ones, the last three
HEAD_VARIANCE = (0.01, 0.7)  # heads whose N·score variance lies outside are left out of the combination
SIMILARITY_SHARE = 0.5  # of each block's r, pruned by the S stage


def iterations(layer: int, depth: int) -> int:
    return ITERATIONS[0] if layer < 3 else ITERATIONS[2] if layer >= depth - 3 else ITERATIONS[1]


def split(r: int, share: float) -> tuple[int, int]:
    """(pruned by the S stage, pruned by the I stage)."""
    by_similarity = math.floor(r * share)
    return by_similarity, r - by_similarity


def parse_head_variance(spec) -> tuple[float, float]:
    """``LOW,HIGH`` (``0,inf`` keeps every head)."""
    try:
        low, high = (float(v) for v in (spec.split(",") if isinstance(spec, str) else spec))
    except (TypeError, ValueError):
        raise EdgetokError(f"--head-variance {spec!r} is not two numbers LOW,HIGH, e.g. 0.01,0.7 (0,inf keeps every "
                           "head)") from None
    if not 0 <= low <= high or math.isnan(high):
        raise EdgetokError(f"--head-variance {spec}: need 0 <= LOW <= HIGH, e.g. 0.01,0.7")
    return low, high


def page_rank(attn: torch.Tensor, steps: int, class_token: bool, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted PageRank per head: s ← Aᵀ·s (token i collects the importance of the tokens attending to it),
    from uniform with the class token at √N times the others. attn [B, H, N, N] row-stochastic → [B, H, N].
    ``alive`` [B, N] (1 = survivor): the graph of the survivors only, as masks rather than gathers (a discarded
    token starts at 0 and receives nothing, so it stays 0)."""
    n = attn.shape[-1]
    start = torch.ones(n, dtype=attn.dtype, device=attn.device)
    if alive is None:
        if class_token:
            start[0] = math.sqrt(n)
        s = (start / start.sum()).expand(*attn.shape[:2], 1, n)
        for _ in range(steps):
            s = s @ attn
        return s[..., 0, :]
    if class_token:
        start[0] = 0.0
    survivors = alive.sum(dim=-1, keepdim=True)
    start = alive * (start + (1 - start) * survivors.sqrt()) if class_token else alive
    s = (start / start.sum(dim=-1, keepdim=True))[:, None, None, :].expand(-1, attn.shape[1], -1, -1)
    # The survivors' graph D⁻¹·A·diag(alive), D its row sums, without touching the N×N matrix: scale s, multiply,
    # mask (a discarded token's score stays 0).
    keep = alive[:, None, None, :]
    inverse = 1.0 / (attn @ keep.transpose(-1, -2)).transpose(-1, -2)  # [B, H, 1, N]: 1 / each row's survivor mass
    for _ in range(steps):
        s = ((s * inverse) @ attn) * keep
    return s[..., 0, :]


def combine_heads(s: torch.Tensor, bounds: tuple[float, float], nodes: int) -> torch.Tensor:
    """Root mean square over the heads whose variance of nodes·s (over the ``nodes`` tokens that carry a score, the
    others being 0) lies in ``bounds`` (all heads if none does): [B, H, N] → [B, N]."""
    variance = (s * nodes).square().sum(dim=-1) / nodes - 1.0  # E[x²] − E[x]², E[x] = 1 as s sums to 1
    use = ((variance >= bounds[0]) & (variance <= bounds[1])).to(s.dtype)
    use = use + (use.sum(dim=1, keepdim=True) == 0).to(s.dtype)  # no head qualifies: every head
    return ((s * s * use[..., None]).sum(dim=1) / use.sum(dim=1, keepdim=True)).sqrt()


def ascending(index: torch.Tensor) -> torch.Tensor:
    """Token indices [B, K] in position order (TopK on their float positions: exact below 2**24, TensorRT-friendly)."""
    return index.to(torch.float32).topk(index.shape[1], dim=-1, largest=False).values.to(index.dtype)


class ZeroTPrune:
    name = "zerotprune"
    proportional_attention = False  # pruning only: every token stands for one patch
    per_layer = True  # the PageRank steps depend on the block
    attention_probs = True  # ranks by the block's whole attention matrix: patch.py hands it over when it can

    def __init__(self, r: list[int] | None, keep_rate: float | None, depth: int, clamp: bool = False,
                 head_variance=None, similarity_share: float | None = None):
        if (r is None) == (keep_rate is None):
            raise EdgetokError("--method zerotprune takes --r N (tokens pruned per block) or --keep-rate F, one of them")
        if keep_rate is not None and not 0.0 < keep_rate <= 1.0:
            raise EdgetokError(f"--keep-rate {keep_rate} is out of range: give a value in (0, 1], e.g. 0.9")
        share = SIMILARITY_SHARE if similarity_share is None else similarity_share
        if not 0.0 <= share <= 1.0:
            raise EdgetokError(f"--similarity-share {share} is out of range: give a value in [0, 1], e.g. 0.5")
        self.r, self.keep_rate, self.depth, self.clamp, self.share = r, keep_rate, depth, clamp, share
        self.head_variance = HEAD_VARIANCE if head_variance is None else parse_head_variance(head_variance)

    def params(self, amounts: list[int]) -> dict:
        return {"r_per_layer": amounts, "keep_rate": self.keep_rate,
                "similarity_pruned_per_layer": [split(r, self.share)[0] for r in amounts],
                "similarity_share": self.share,
                "page_rank_iterations": [iterations(layer, self.depth) for layer in range(self.depth)],
                "head_variance": list(self.head_variance)}

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        """(r pruned in this block, tokens left): at least one patch token stays."""
        candidates = tokens - prefix
        r = self.r[layer] if self.r is not None else math.floor(candidates - candidates * self.keep_rate)
        if r >= candidates and self.clamp and layer > 0:  # a constant --r, as ToMe's: what the block can prune
            r = candidates - 1
        if r >= candidates:
            raise EdgetokError(f"r={r} is too large for block {layer}: it has {candidates} patch tokens, so r can be "
                               f"at most {candidates - 1}; lower --r")
        if split(r, self.share)[0] > candidates // 2:
            raise EdgetokError(f"--similarity-share {self.share} with r={r} in block {layer}: the S stage can discard at "
                               f"most {candidates // 2} of its {candidates} patch tokens (the less important half); "
                               "lower --similarity-share or --r")
        return r, tokens - r

    def transform(self, r: int, q, k, scale, prefix: int, class_token: bool = True, layer: int = 0, attn=None):
        if r == 0:
            return None
        if attn is None:  # the block's attention was not exposed (HF layers, plugin attention): compute it again
            attn = ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1)  # [B, H, N, N]
        batch, _, n, _ = attn.shape
        tokens = n - prefix
        by_similarity, by_importance = split(r, self.share)
        alive = None
        if by_similarity:
            vote = combine_heads(page_rank(attn, 1, class_token), self.head_variance, n)[:, prefix:]  # I′
            order = rank_descending(vote)
            set_b, set_a = order[:, :tokens - tokens // 2], order[:, tokens - tokens // 2:]
            metric = F.normalize(k.mean(dim=1)[:, prefix:], dim=-1)
            sim = gather_tokens(metric, set_a) @ gather_tokens(metric, set_b).transpose(-1, -2)
            ranked = rank_descending(sim.amax(dim=-1))  # A's positions, most similar first
            gone = set_a.gather(1, ranked[:, :by_similarity]) + prefix
            positions = torch.arange(n, device=k.device)
            alive = 1 - (gone.unsqueeze(-1) == positions).to(attn.dtype).sum(dim=1)  # [B, N], no scatter
        survivors = n - by_similarity
        score = combine_heads(page_rank(attn, iterations(layer, self.depth), class_token, alive),
                              self.head_variance, survivors)[:, prefix:]
        if alive is not None:  # the discarded rank below every survivor (scores are >= 0)
            score = score - (1 - alive[:, prefix:])
        kept = rank_descending(score)[:, :tokens - r] + prefix
        prefix_idx = torch.arange(prefix, device=k.device).expand(batch, prefix)
        return TokenTransform(keep=torch.cat([prefix_idx, ascending(kept)], dim=1)), None
