"""Multiply-accumulates of a (token-reduced) ViT, from its dimensions and per-block token counts.

Counts the matrix products: patch embedding, per block QKV, attention (QKᵀ and AV), projection and
MLP (the MLP sees the tokens left after the block's reduction), and the classifier head. Norms,
softmax and the matching itself ((N/2)²·D per block) are negligible and left out, as in ToMe.
"""

from __future__ import annotations

from edgetok.vit.loading import LoadedViT


def block_macs(n_in: int, n_out: int, dim: int, attn_dim: int, mlp_hidden: int, attention_kept: float = 1.0) -> float:
    """``attention_kept``: the fraction of the N×N attention computed (block-sparse attention's kept pairs)."""
    attention = 3 * n_in * dim * attn_dim + 2 * n_in * n_in * attn_dim * attention_kept + n_in * attn_dim * dim
    return attention + 2 * n_out * dim * mlp_hidden


def vit_macs(vit: LoadedViT, tokens: list[tuple[int, int]], attention_kept: list[float] | None = None) -> float:
    patches = (vit.img_size // vit.patch_size) ** 2
    embed = patches * vit.in_chans * vit.patch_size**2 * vit.embed_dim
    kept = attention_kept or [1.0] * len(tokens)
    blocks = sum(block_macs(a, b, vit.embed_dim, vit.attn_dim, vit.mlp_hidden, f) for (a, b), f in zip(tokens, kept))
    return embed + blocks + vit.embed_dim * vit.num_classes


def record_gmacs(record: dict, tokens_kept: dict, attention_kept: dict, images: int) -> list[float] | None:
    """Each image's GMACs from an export record (sidecar, or an engine report's copy) and what the images kept;
    None for an export made before the model's dimensions were recorded."""
    from types import SimpleNamespace

    dims = record.get("model") or {}
    if "attn_dim" not in dims:
        return None
    return per_image_gmacs(SimpleNamespace(**dims), record["reduction"]["tokens_per_layer"], tokens_kept,
                           attention_kept, images)


def per_image_gmacs(vit, tokens_per_layer: list, tokens_kept: dict, attention_kept: dict, images: int) -> list[float]:
    """GMACs of each image from what it kept: ``tokens_kept`` {block: [tokens after that block, per image]}
    (data-dependent steps; other blocks keep ``tokens_per_layer``), ``attention_kept`` {block: [fraction, per
    image]} (block-sparse attention). ``vit`` needs the dimensions only (a LoadedViT or the sidecar's model)."""
    out = []
    for i in range(images):
        n, tokens = tokens_per_layer[0][0], []
        for block, (_, after) in enumerate(tokens_per_layer):
            after = tokens_kept[block][i] if block in tokens_kept else min(after, n)
            tokens.append((n, after))
            n = after
        kept = [attention_kept[b][i] if b in attention_kept else 1.0 for b in range(len(tokens_per_layer))]
        out.append(vit_macs(vit, tokens, kept) / 1e9)
    return out
