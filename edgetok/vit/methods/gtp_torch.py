"""GTP-ViT: graph propagation (Xu et al., WACV 2024), as a many-to-many token transform.

As the reference's ``models_v3.py`` (Ackesnal/GTP-ViT 97a1178) does it (selection "MixedAttnMax", propagation
"GraphProp", token scales on): a graph over the patch tokens is built once per image from the embedded tokens
(after position embedding) — ``spatial``: the 8 grid neighbours; ``semantic``: the k = 8 most cosine-similar tokens (those at
or above the (k+1)-th largest similarity, itself excluded); ``mixed``: either — then symmetrically
normalised, D^-1/2·G·D^-1/2. In each block, after the attention residual, token i is ranked by
max_h A_h[i, i] × max_h Σ_q A_h[q, i] (A: the block's attention with + log size); the P lowest are
propagated and removed: kept tokens (in rank order, highest first) += α·W[kept, removed]·x_removed, sizes
likewise, and the graph keeps W[kept, kept] (not renormalised). Prefix tokens (class, registers) stay in front
and out of the graph; the reference handles only a class token. Ties rank by position.

Sparsity θ (``--sparsity``, the reference's ``--sparsity``, default 1 = off): in every block, each head's attention
probabilities below the k-th smallest of its N² (k = int(N²·(1 − θ))) are set to 0 after the softmax, not
renormalised; the thinned matrix is both what the block attends with and what the ranking reads.

P = 0 is refused: in the reference it does not mean "nothing" but "every patch token" (``token_rank[:, :-0]`` is
an empty slice, so no token is kept and only the class token is left). A per-block list shorter than the depth
leaves the later blocks alone (the reference has no such blocks).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from edgetok.errors import EdgetokError
from edgetok.vit.token_transform import TokenTransform, apply_transform
from edgetok.vit.methods.tome_torch import rank_descending

GRAPHS = ("spatial", "semantic", "mixed")
# --alpha is bounded (the reference takes any): a propagated token may weigh as much as the token it joins
# (weight 1), no more; beyond that the residual stream grows block after block until float32 overflows
# (alpha 1e30 on the digits model: outputs inf, an export that cannot validate).
MAX_ALPHA = 1.0
NEIGHBOURS = 8


def parse_propagate(spec, depth: int) -> list[int]:
    """``P`` for every block, or a per-block list ``8,8,4`` (blocks past the list propagate nothing). A 0 is
    refused: the reference's P = 0 removes every patch token (see the module docstring)."""
    if isinstance(spec, (list, tuple)):
        values = [int(v) for v in spec]
    else:
        try:
            values = [int(v) for v in str(spec).split(",")]
        except ValueError:
            raise EdgetokError(f"--propagate {spec!r} is not a token count or a list of them, e.g. 8 or 8,8,4") from None
        if "," not in str(spec):
            values = values * depth
    if len(values) > depth:
        raise EdgetokError(f"--propagate {spec} has {len(values)} entries but the model has {depth} blocks")
    if any(v < 0 for v in values):
        raise EdgetokError(f"--propagate {spec}: token counts must be >= 0")
    listed = len(values)
    while listed and values[listed - 1] == 0:  # trailing zeros (a sidecar's padded list): blocks past the list
        listed -= 1
    if listed == 0 or 0 in values[:listed]:
        block = values.index(0)
        raise EdgetokError(f"--propagate {spec}: P = 0 in block {block} would remove every patch token in GTP-ViT's "
                           "code ([:, :-0] keeps none), which edgetok does not reproduce; give P >= 1 for each block "
                           "listed (blocks past the list propagate nothing), or use --method none")
    return values + [0] * (depth - len(values))


def spatial_graph(tokens: int) -> torch.Tensor:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise EdgetokError(f"--graph spatial needs a square grid of patch tokens, and this model has {tokens}; "
                           "use --graph semantic")
    row, col = torch.arange(tokens) // side, torch.arange(tokens) % side
    near = ((row[:, None] - row[None]).abs() <= 1) & ((col[:, None] - col[None]).abs() <= 1)
    return near.float() - torch.eye(tokens)


def semantic_graph(x: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: 1 where j is among i's NEIGHBOURS most similar tokens (ties at the cut included)."""
    unit = x / x.norm(dim=-1, keepdim=True)
    cos = unit @ unit.transpose(-1, -2)
    cut = cos.topk(min(NEIGHBOURS + 1, cos.shape[-1]), dim=-1).values[..., -1:]  # the (k+1)-th largest: self first
    return (cos >= cut).to(x.dtype) - torch.eye(cos.shape[-1], dtype=x.dtype, device=x.device)


def sparsify(attn: torch.Tensor, theta: float) -> torch.Tensor:
    """The reference's θ on attention probabilities [B, H, N, N]: in each head, entries below the k-th smallest
    of the N² (k = int(N²·(1 − θ)), as the reference computes it) become 0. TopK of the k smallest gives the
    reference's ``kthvalue`` and exports (ONNX TopK; TensorRT caps K at 3840: N² (1 − θ) beyond that will not build)."""
    n = int(attn.shape[-1])  # a Python int even while tracing: k in double precision, as the reference's
    k = int(n * n * (1 - theta))
    if k < 1:  # nothing lies below the smallest entry
        return attn
    cut = attn.flatten(-2).topk(k, dim=-1, largest=False).values[..., -1:].unsqueeze(-1)  # [B, H, 1, 1]
    return attn.masked_fill(attn < cut, 0.0)


class GTP:
    name = "gtp"
    proportional_attention = True  # token scales: log(size) in attention
    attention_probs = True  # ranks by the block's whole attention matrix: patch.py hands it over when it can

    def __init__(self, propagate: list[int], alpha: float, graph: str, sparsity: float | None = None):
        if graph not in GRAPHS:
            raise EdgetokError(f"--graph {graph!r} is unknown; choose {', '.join(GRAPHS)}")
        if not 0 <= alpha <= MAX_ALPHA:
            raise EdgetokError(f"--alpha {alpha} must be a finite number >= 0 and <= {MAX_ALPHA:g}: the weight of the "
                               "propagated tokens (a kept token's own is 1), e.g. 0.1")
        theta = 1.0 if sparsity is None else sparsity
        if not 0 < theta <= 1:
            raise EdgetokError(f"--sparsity {sparsity} is out of range: give θ in (0, 1], the share of each head's "
                               "attention kept (1 keeps all), e.g. 0.8")
        self.propagate, self.alpha, self.graph_kind, self.sparsity = propagate, alpha, graph, theta
        # patch.py thins every block's attention probabilities with this (None: θ = 1, the attention untouched)
        self.sparsify = partial(sparsify, theta=theta) if theta < 1 else None
        self.graph = None  # this forward's graph over the tokens left, [B, T, T]

    def params(self, amounts: list[int]) -> dict:
        return {"propagate_per_layer": amounts, "alpha": self.alpha, "graph": self.graph_kind,
                "sparsity": self.sparsity, "proportional_attention": True}

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        p = self.propagate[layer]
        if p and p >= tokens - prefix:
            raise EdgetokError(f"--propagate {p} in block {layer}: it has {tokens - prefix} patch tokens, so at most "
                               f"{tokens - prefix - 1} can be propagated; lower --propagate")
        return p, tokens - p

    def start(self, x: torch.Tensor, prefix: int) -> None:
        """The graph of this forward, from the embedded tokens entering the first block."""
        patches = x[:, prefix:]
        graph = None
        if self.graph_kind in ("spatial", "mixed"):
            graph = spatial_graph(patches.shape[1]).to(x)[None].expand(x.shape[0], -1, -1)
        if self.graph_kind in ("semantic", "mixed"):
            near = semantic_graph(patches)
            graph = near if graph is None else ((graph + near) > 0).to(x.dtype)
        degree = graph.sum(dim=-1).rsqrt()
        self.graph = degree[..., :, None] * graph * degree[..., None, :]

    def reduce(self, p: int, taps: dict, x: torch.Tensor, size: torch.Tensor, prefix: int, class_token: bool):
        if p == 0:
            return x, size
        attn = taps.get("attn")  # the block's own softmax (with + log size), or computed again where not exposed
        if attn is None:
            q, k, scale = taps["q"], taps["k"], taps["scale"]
            attn = ((q @ k.transpose(-1, -2)) * scale + size.log()[:, None, None, :, 0]).softmax(dim=-1)
        diagonal = attn.diagonal(dim1=-2, dim2=-1).amax(dim=1)[:, prefix:]
        received = attn.sum(dim=-2).amax(dim=1)[:, prefix:]
        order = rank_descending(diagonal * received)
        kept, gone = order[:, :-p], order[:, -p:]
        rows = self.graph.gather(1, kept.unsqueeze(-1).expand(-1, -1, self.graph.shape[2]))
        batch = x.shape[0]
        mix = self.alpha * rows.gather(2, gone.unsqueeze(1).expand(-1, kept.shape[1], -1))  # [B, K, P]
        self.graph = rows.gather(2, kept.unsqueeze(1).expand(-1, kept.shape[1], -1))
        prefix_idx = torch.arange(prefix, device=x.device).expand(batch, prefix)
        step = TokenTransform(keep=torch.cat([prefix_idx, kept + prefix], dim=1), src=gone + prefix,
                              mix=torch.nn.functional.pad(mix, (0, 0, prefix, 0)), normalize=False)
        return apply_transform(step, x, size, torch.ones_like(size))
