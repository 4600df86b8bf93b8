"""PiToMe: energy-protected bipartite merging (Tran et al., NeurIPS 2024), as a token transform.

Between attention and MLP, on the keys averaged over heads (L2-normalised, prefix tokens left out): each token's
energy is the mean over all tokens of ELU(cos − m_l), with a margin m_l that falls with depth. Tokens are ranked
by energy, highest first (the most redundant), and one of two merge rules runs, both from the authors' ``merge.py``:

- ``pitome``: the first 2r alternate into A and B, every A token merges into its most similar B token
  (size-weighted) and the other T − 2r are protected; output prefix, protected (by energy), B.
- ``pitome_bsm``: *all* tokens alternate into A and B by energy rank, and ToMe's matching runs on them: the r A
  tokens whose best B match is the most similar merge into it; output prefix, the unmerged A tokens (best match
  first, the reference's order), B.

Two configurations (``--pitome-variant``):

- ``reference`` (default): the authors' DeiT patch as of hchautran/PiToMe 550b5de (``algo/pitome/patch/deit.py``,
  last changed in 69c56a2): m_l = 0.75 − 0.75·l/L, ``pitome_bsm`` in the first ⌈L/2⌉ blocks and ``pitome`` after,
  no proportional attention (their block calls the attention without sizes; the merge is still size-weighted).
- ``protected``: what edgetok shipped first: m_l = 0.9 − 0.8·l/L (the schedule of the repository's early version,
  b54bb7f, whose merge rule differed), ``pitome`` in every block, proportional attention (+ log size).

r per block is ``--r`` (a constant r is clamped in late blocks, as ToMe's), ``--r-schedule``, or
``floor(T − T·keep_rate)`` of the T tokens there (``--keep-rate``, the reference's ``ratio``).
Ties rank by position (ONNX TopK's rule), as ToMe's do here; of equal best matches the first. Prefix tokens
(class, distillation, registers) are never merged; the reference leaves out only the class token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgetok.errors import EdgetokError
from edgetok.vit.token_transform import TokenTransform
from edgetok.vit.methods.tome_torch import rank_descending

VARIANTS = ("reference", "protected")


def margins(depth: int, variant: str = "reference") -> list[float]:
    if variant == "protected":
        return [0.9 - 0.8 * layer / depth for layer in range(depth)]
    return [0.75 - 0.75 * layer / depth for layer in range(depth)]


def bsm_blocks(depth: int, variant: str = "reference") -> int:
    """How many leading blocks merge with ``pitome_bsm`` (the reference: ceil(L/2))."""
    return math.ceil(depth * 0.5) if variant == "reference" else 0


class PiToMe:
    name = "pitome"
    per_layer = True  # its step depends on the block (the margin, the merge rule)

    def __init__(self, r: list[int] | None, keep_rate: float | None, depth: int, clamp: bool = False,
                 variant: str | None = None):
        if (r is None) == (keep_rate is None):
            raise EdgetokError("--method pitome takes --r N (tokens merged per block) or --keep-rate F, one of them")
        if keep_rate is not None and not 0.0 < keep_rate <= 1.0:
            raise EdgetokError(f"--keep-rate {keep_rate} is out of range: give a value in (0, 1], e.g. 0.9")
        variant = variant or "reference"
        if variant not in VARIANTS:
            raise EdgetokError(f"--pitome-variant {variant!r} is unknown; choose {' or '.join(VARIANTS)}")
        self.r, self.keep_rate, self.clamp, self.variant = r, keep_rate, clamp, variant
        self.margins, self.bsm = margins(depth, variant), bsm_blocks(depth, variant)
        self.proportional_attention = variant == "protected"

    def params(self, amounts: list[int]) -> dict:
        return {"r_per_layer": amounts, "keep_rate": self.keep_rate, "variant": self.variant,
                "margins": [round(m, 6) for m in self.margins], "bsm_blocks": self.bsm,
                "proportional_attention": self.proportional_attention}

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        """(r merged in this block, tokens left). ``pitome`` merges at most half the candidates; ``pitome_bsm``
        every A token, ceil(half)."""
        candidates = tokens - prefix
        most = (candidates + 1) // 2 if layer < self.bsm else candidates // 2
        r = self.r[layer] if self.r is not None else math.floor(candidates - candidates * self.keep_rate)
        if r > most and self.clamp and layer > 0:  # a constant --r, as ToMe: what the block can merge
            r = most
        if r > most:
            raise EdgetokError(f"r={r} is too large for block {layer}: it has {candidates} mergeable tokens, so r can "
                               f"be at most {most}; lower --r")
        return r, tokens - r

    def transform(self, r: int, q, k, scale, prefix: int, class_token: bool = True, layer: int = 0):
        if r == 0:
            return None
        metric = F.normalize(k.mean(dim=1)[:, prefix:], dim=-1)
        sim = metric @ metric.transpose(-1, -2)  # [B, T, T]
        energy = F.elu(sim - self.margins[layer]).mean(dim=-1)
        order = rank_descending(energy)
        batch, tokens = metric.shape[:2]
        prefix_idx = torch.arange(prefix, device=k.device).expand(batch, prefix)
        if layer < self.bsm:
            return _bipartite(sim, order, r, prefix, prefix_idx), None
        a, b, protected = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
        best = _similarity(sim, a, b).argmax(dim=-1)  # the first of equal maxima, as ONNX ArgMax
        keep = torch.cat([prefix_idx, protected + prefix, b + prefix], dim=1)
        return TokenTransform(keep=keep, src=a + prefix, dst=best + (prefix + tokens - 2 * r)), None


def _similarity(sim: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sim[a][:, b]: [B, |A|, |B|]."""
    rows = sim.gather(1, a.unsqueeze(-1).expand(-1, -1, sim.shape[2]))
    return rows.gather(2, b.unsqueeze(1).expand(-1, a.shape[1], -1))


def _bipartite(sim: torch.Tensor, order: torch.Tensor, r: int, prefix: int, prefix_idx: torch.Tensor):
    """``pitome_bsm``: A, B alternate along the energy ranking; ToMe's matching on them."""
    a, b = order[:, 0::2], order[:, 1::2]
    scores = _similarity(sim, a, b)
    match = scores.argmax(dim=-1, keepdim=True)  # the first of equal maxima, as ONNX ArgMax
    edges = rank_descending(scores.gather(2, match)[..., 0])  # A tokens by their best match, best first
    src, unmerged = edges[:, :r], edges[:, r:]
    keep = torch.cat([prefix_idx, a.gather(1, unmerged) + prefix, b + prefix], dim=1)
    dst = match[..., 0].gather(1, src) + (prefix + a.shape[1] - r)
    return TokenTransform(keep=keep, src=a.gather(1, src) + prefix, dst=dst)
