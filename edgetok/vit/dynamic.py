"""What data-dependent reduction needs in PyTorch: the ``edgetok::token_prune`` op and padding-aware pooling.

When the number of tokens depends on the image, a batch keeps the batch maximum and pads each image's rows
with x = 0, size = 0. Proportional attention's ``log(size)`` is then -inf for those keys (no query attends to
them) and pooling ignores them, so each image's result is what it would be alone. The prune itself is one
``edgetok::TokenPrune`` plugin node in an export (a data-dependent count has no TensorRT-friendly standard-op
form); in eager PyTorch it is the same gather.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from edgetok.errors import EdgetokError


def dynamic_size(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.shape[dim]`` as a 0-d int64 tensor, so an export keeps it dynamic (a Python int would be frozen)."""
    return torch.onnx.operators.shape_as_tensor(x)[dim]


@torch.library.custom_op("edgetok::token_prune", mutates_args=())
def token_prune(x: torch.Tensor, size: torch.Tensor, keep: torch.Tensor,
                prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and every token with ``keep != 0`` and size > 0, in order; pad each image to the
    batch maximum with x = 0, size = 0. Returns tokens, sizes and the kept count K (0-d int64)."""
    positions = torch.arange(x.shape[1], device=x.device)
    kept = (positions < prefix) | ((keep != 0) & (size[..., 0] > 0))
    counts = kept.sum(dim=1)
    most = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, :most]  # kept first, in order
    valid = (torch.arange(most, device=x.device) < counts[:, None]).unsqueeze(-1).to(x.dtype)
    pruned = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1])) * valid
    pruned_size = torch.gather(size, 1, order.unsqueeze(-1)) * valid
    return pruned, pruned_size, torch.tensor(most, dtype=torch.int64)


@token_prune.register_kernel("cuda")
def _token_prune_cuda(x, size, keep, prefix):
    """On a GPU the prune runs as the TokenPrune plugin's Triton kernels (fp32, as the plugin)."""
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import get

    inputs = [t.float().contiguous() for t in (x, size, keep)]
    pruned, pruned_size, count = kernels.run_torch(get("TokenPrune"), inputs, {"prefix": prefix})
    return pruned.to(x.dtype), pruned_size.to(size.dtype), count


@token_prune.register_fake
def _(x, size, keep, prefix):
    kept = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty(x.shape[0], kept, x.shape[2]), size.new_empty(x.shape[0], kept, 1), x.new_empty((), dtype=torch.int64)


def _token_prune_node(g, x, size, keep, prefix):
    from torch.onnx import symbolic_helper

    from edgetok.plugins.spec import NAMESPACE, node_attributes

    prefix = symbolic_helper._get_const(prefix, "i", "prefix")
    pruned, pruned_size, count = g.op(f"{NAMESPACE}::TokenPrune", x, size, keep, prefix_i=prefix,
                                      **node_attributes(), outputs=3)
    channels = (x.type().varyingSizes() or [None] * 3)[2]
    pruned.setType(x.type().with_sizes([None, None, channels]))
    pruned_size.setType(size.type().with_sizes([None, None, 1]))
    count.setType(x.type().with_dtype(torch.int64).with_sizes([]))
    return pruned, pruned_size, count


torch.onnx.register_custom_op_symbolic("edgetok::token_prune", _token_prune_node, 17)


def key_bias(size: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, N] attention bias that removes padding keys (size 0): 0 for real tokens, -inf for padding."""
    return torch.where(size[:, None, None, :, 0] > 0, 0.0, float("-inf")).to(size.dtype)


class PaddingAwareViT(VisionTransformer):
    """A timm ViT whose pooling skips padding rows (size 0): average pooling over the real tokens, attention
    pooling with padding keys masked. Class-token pooling needs nothing (the class token is never padding)."""

    _edgetok_state = None

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        size = self._edgetok_state.size if self._edgetok_state is not None else None
        if size is None or size.shape[1] != x.shape[1]:
            return super().pool(x, pool_type)
        prefix = self.num_prefix_tokens
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x, size = x[:, prefix:], size[:, prefix:]
            return self.attn_pool(x, attn_mask=key_bias(size))
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if pool_type == "avg":
            if not self.pool_include_prefix:
                x, size = x[:, prefix:], size[:, prefix:]
            real = (size > 0).to(x.dtype)
            return (x * real).sum(dim=1) / real.sum(dim=1)
        return super().pool(x, pool_type)


def padding_aware(vit, state) -> None:
    """Let ``vit``'s pooling ignore padding rows; a pooling that cannot is refused in one line. A method whose
    reference attends its own way over padded rows (ATS: ``softmax_with_policy``) installs that attention in
    every block here (``own_attention``), as its reference does in every block, not only where it reduces."""
    if hasattr(state.method, "own_attention"):
        state.method.own_attention(vit.blocks)
    model = vit.module
    if vit.family != "timm":
        return  # Hugging Face ViT pools the class token
    if type(model) is not VisionTransformer:
        raise EdgetokError(f"{vit.name} ({type(model).__name__}): data-dependent reduction needs a timm "
                           "VisionTransformer (its pooling must skip padding rows); use --method tome or evit")
    if model.attn_pool is None and model.global_pool not in ("token", "avg"):
        raise EdgetokError(f"{vit.name} pools with {model.global_pool!r}, which cannot skip padding rows yet; "
                           "data-dependent reduction supports token, avg and attention (map) pooling")
    model.__class__ = PaddingAwareViT
    model._edgetok_state = state
