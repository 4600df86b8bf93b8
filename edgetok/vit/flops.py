"""Multiply-accumulates of a (token-reduced) ViT, from its dimensions and per-block token counts.

Counts the matrix products: patch embedding, per block QKV, attention (QKᵀ and AV), projection and
MLP (the MLP sees the tokens left after the block's reduction), and the classifier head. Norms,
softmax and the matching itself ((N/2)²·D per block) are negligible and left out, as in ToMe.
"""

from __future__ import annotations

from edgetok.vit.loading import LoadedViT


def block_macs(n_in: int, n_out: int, dim: int, attn_dim: int, mlp_hidden: int) -> int:
    attention = 3 * n_in * dim * attn_dim + 2 * n_in * n_in * attn_dim + n_in * attn_dim * dim
    return attention + 2 * n_out * dim * mlp_hidden


def vit_macs(vit: LoadedViT, tokens: list[tuple[int, int]]) -> int:
    patches = (vit.img_size // vit.patch_size) ** 2
    embed = patches * vit.in_chans * vit.patch_size**2 * vit.embed_dim
    blocks = sum(block_macs(a, b, vit.embed_dim, vit.attn_dim, vit.mlp_hidden) for a, b in tokens)
    return embed + blocks + vit.embed_dim * vit.num_classes
