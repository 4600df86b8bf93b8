"""EViT: attentive token keep and fuse (Liang et al., ICLR 2022), as a token transform.

At the chosen blocks, the non-prefix tokens with the highest class-token attention (averaged over
heads) are kept; the others are fused into one new token, their average weighted by that attention
(normalised, so the fused token stays on the scale of the others).
"""

from __future__ import annotations

import math

import torch

from edgetok.errors import EdgetokError
from edgetok.vit.token_transform import TokenTransform


def default_keep_layers(depth: int) -> list[int]:
    """Blocks 3, 6 and 9 of 0..11 (the paper's 4th, 7th and 10th), scaled to the model's depth."""
    return sorted({depth // 4, depth // 2, (3 * depth) // 4})


class EViT:
    name = "evit"
    proportional_attention = False
    needs_class_token = True  # its scores are the class token's attention

    def __init__(self, keep_rate: float, keep_layers: list[int], depth: int):
        if not 0.0 < keep_rate <= 1.0:
            raise EdgetokError(f"--keep-rate {keep_rate} is out of range: give a value in (0, 1], e.g. 0.7")
        bad = [i for i in keep_layers if not 0 <= i < depth]
        if bad:
            raise EdgetokError(f"--keep-layers {bad} outside the model's blocks 0..{depth - 1}")
        self.keep_rate = keep_rate
        self.keep_layers = sorted(set(keep_layers))

    def params(self, amounts: list[int]) -> dict:
        return {"keep_rate": self.keep_rate, "keep_layers": self.keep_layers}

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        """(non-prefix tokens kept in this block, 0 if it keeps all; tokens left)."""
        candidates = tokens - prefix
        kept = math.ceil(self.keep_rate * candidates)
        if layer not in self.keep_layers or kept >= candidates:
            return 0, tokens
        return kept, prefix + kept + 1

    def transform(self, kept: int, q, k, scale, prefix: int, class_token: bool = True):
        """Keep-and-fuse for one block, from the class token's query and the keys [B, H, N, D]."""
        if kept == 0:
            return None
        cls_attn = ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, N]
        cls_attn = cls_attn.mean(dim=1)[:, 0]  # [B, N]
        candidates = cls_attn.shape[1] - prefix
        order = cls_attn[:, prefix:].topk(candidates, dim=-1).indices + prefix
        batch = q.shape[0]
        prefix_idx = torch.arange(prefix, device=q.device).expand(batch, prefix)
        keep = torch.cat([prefix_idx, order[:, :kept]], dim=1)
        src = order[:, kept:]
        dst = src.new_full(src.shape, prefix + kept)
        return TokenTransform(keep=keep, src=src, dst=dst, num_new=1), cls_attn.unsqueeze(-1)

