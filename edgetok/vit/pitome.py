"""PiToMe: energy-protected bipartite merging (Tran et al., NeurIPS 2024), as a token transform.

Between attention and MLP, on the keys averaged over heads (L2-normalised, prefix tokens left out):
each token's energy is the mean over all tokens of ELU(cos − m_l), with a margin that falls with depth
(the reference's DeiT patch: m_l = 0.9 − 0.8·l/L). Tokens sorted by energy, highest first (the most
redundant): the first 2r split alternately into A and B, every A token merges into its most similar B token
(size-weighted), and the other T − 2r are protected. Output order as the reference's: prefix, protected (by
energy), B. r per block is ``--r`` (a constant r is clamped in late blocks, as ToMe's), ``--r-schedule``, or
``floor(T − T·keep_rate)`` of the T tokens there (``--keep-rate``).
Ties rank by position (ONNX TopK's rule), as ToMe's do here. Prefix tokens (class, distillation, registers)
are never merged; the reference leaves out only the class token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgetok.errors import EdgetokError
from edgetok.vit.token_transform import TokenTransform
from edgetok.vit.tome import rank_descending


def margins(depth: int) -> list[float]:
    return [0.9 - 0.8 * layer / depth for layer in range(depth)]


class PiToMe:
    name = "pitome"
    proportional_attention = True
    per_layer = True  # its step depends on the block (the margin)

    def __init__(self, r: list[int] | None, keep_rate: float | None, depth: int, clamp: bool = False):
        if (r is None) == (keep_rate is None):
            raise EdgetokError("--method pitome takes --r N (tokens merged per block) or --keep-rate F, one of them")
        if keep_rate is not None and not 0.0 < keep_rate <= 1.0:
            raise EdgetokError(f"--keep-rate {keep_rate} is out of range: give a value in (0, 1], e.g. 0.9")
        self.r, self.keep_rate, self.margins, self.clamp = r, keep_rate, margins(depth), clamp

    def params(self, amounts: list[int]) -> dict:
        return {"r_per_layer": amounts, "keep_rate": self.keep_rate, "margins": [round(m, 6) for m in self.margins],
                "proportional_attention": True}

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        """(r merged in this block, tokens left)."""
        candidates = tokens - prefix
        r = self.r[layer] if self.r is not None else math.floor(candidates - candidates * self.keep_rate)
        if r > candidates // 2 and self.clamp and layer > 0:  # a constant --r, as ToMe: what the block can merge
            r = candidates // 2
        if r > candidates // 2:
            raise EdgetokError(f"r={r} is too large for block {layer}: it has {candidates} mergeable tokens, so r can "
                               f"be at most {candidates // 2}; lower --r")
        return r, tokens - r

    def transform(self, r: int, q, k, scale, prefix: int, class_token: bool = True, layer: int = 0):
        if r == 0:
            return None
        metric = F.normalize(k.mean(dim=1)[:, prefix:], dim=-1)
        sim = metric @ metric.transpose(-1, -2)  # [B, T, T]
        energy = F.elu(sim - self.margins[layer]).mean(dim=-1)
        order = rank_descending(energy)
        a, b, protected = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
        scores = sim.gather(1, a.unsqueeze(-1).expand(-1, -1, sim.shape[2]))
        scores = scores.gather(2, b.unsqueeze(1).expand(-1, r, -1))  # [B, r (A), r (B)]
        best = scores.argmax(dim=-1)  # the first of equal maxima, as ONNX ArgMax
        batch, tokens = metric.shape[:2]
        prefix_idx = torch.arange(prefix, device=k.device).expand(batch, prefix)
        keep = torch.cat([prefix_idx, protected + prefix, b + prefix], dim=1)
        return TokenTransform(keep=keep, src=a + prefix, dst=best + (prefix + tokens - 2 * r)), None
