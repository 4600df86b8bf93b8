"""Choose a reduction method, plan its per-layer token counts, and patch a model with it."""

from __future__ import annotations

from dataclasses import dataclass

from edgetok.errors import EdgetokError
from edgetok.vit.loading import LoadedViT
from edgetok.vit.patch import patch_blocks


@dataclass
class ReductionPlan:
    method: str
    params: dict
    tokens: list[tuple[int, int]]  # per block: (tokens in, tokens after its reduction)
    amounts: list[int]  # per block: what the method does there (ToMe: r; EViT: tokens kept; 0: nothing)

    @property
    def reduces(self) -> bool:
        return any(n_in != n_out for n_in, n_out in self.tokens)


def plan(vit: LoadedViT, method) -> ReductionPlan:
    """Per-block token counts (static for a given image size); checks the method fits the model."""
    if getattr(method, "needs_class_token", False) and not vit.class_token:
        raise EdgetokError(f"--method {method.name} scores tokens by the class token's attention, and {vit.name} "
                           "has no class token; use --method tome")
    tokens, amounts, n = [], [], vit.num_tokens
    for layer in range(vit.depth):
        amount, after = (0, n) if method is None else method.plan_layer(layer, n, vit.prefix_tokens)
        tokens.append((n, after))
        amounts.append(amount)
        n = after
    if method is None:
        return ReductionPlan("none", {}, tokens, amounts)
    return ReductionPlan(method.name, method.params(amounts), tokens, amounts)


class NoReduction:
    """``none`` when the blocks must still be patched (their attention replaced): every step keeps all tokens."""
    name = "none"
    proportional_attention = False

    def transform(self, *args):
        return None


def reduce_vit(vit: LoadedViT, method, plugins: bool = False, attention: str = "dense",
               sparsity=None) -> ReductionPlan:
    """Plan, then patch ``vit`` in place (nothing to patch for ``none`` with dense attention); ``plugins``:
    steps that fit a plugin export as its node; ``attention``: "biased" / "sparse" makes every block's
    attention one SizeBiasedAttention / BlockSparseAttention op (edgetok/vit/attention.py), the latter with
    ``sparsity`` (an attention.Sparsity; its defaults if None)."""
    from edgetok.vit.attention import Sparsity, check

    check(attention, vit.blocks)
    if attention == "sparse":
        sparsity = sparsity or Sparsity()
        sparsity.check(vit.num_tokens)
    result = plan(vit, method)
    if method is not None or attention != "dense":
        patch_blocks(vit, method or NoReduction(), result.amounts, plugins, attention, sparsity)
    return result
