"""A block's attention as one ``edgetok::SizeBiasedAttention`` plugin node (``--attention biased``).

In eager PyTorch on a CPU the op is the standard form (SDPA with the float mask log(size)); on a GPU with
``--plugins`` it is the plugin's Triton kernels; in an export it is the plugin node. Sizes come from the
reduction state: proportional methods bias each key by log(size); the others only mask padding keys (size 0),
which is exactly the bias the dense path adds, so the block computes what it did before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from transformers.models.vit.modeling_vit import ViTAttention

from edgetok.errors import EdgetokError

KINDS = ("dense", "biased")


@torch.library.custom_op("edgetok::size_biased_attention", mutates_args=())
def size_biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scale + log size) v, and the class token's attention row averaged over heads."""
    bias = torch.where(size[..., 0] > 0, size[..., 0].clamp_min(torch.finfo(size.dtype).tiny).log(),
                       float("-inf"))[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    row = ((q[:, :, :1] @ k.transpose(-1, -2)) * scale + bias).softmax(dim=-1)[:, :, 0].mean(dim=1)
    return out, row


@size_biased_attention.register_kernel("cuda")
def _size_biased_attention_cuda(q, k, v, size, scale):
    """On a GPU: the plugin's Triton kernels (fp32, as the plugin)."""
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import get

    inputs = [t.float().contiguous() for t in (q, k, v, size)]
    out, row = kernels.run_torch(get("SizeBiasedAttention"), inputs, {"scale": scale})
    return out.to(q.dtype), row.to(q.dtype)


@size_biased_attention.register_fake
def _(q, k, v, size, scale):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2])


def _node(g, q, k, v, size, scale):
    from torch.onnx import symbolic_helper

    from edgetok.plugins.spec import NAMESPACE, VERSION

    scale = symbolic_helper._get_const(scale, "f", "scale")
    out, row = g.op(f"{NAMESPACE}::SizeBiasedAttention", q, k, v, size, scale_f=scale, plugin_version_s=VERSION,
                    outputs=2)
    out.setType(q.type())
    sizes = q.type().varyingSizes() or [None] * 4
    row.setType(q.type().with_sizes([sizes[0], sizes[2]]))
    return out, row


torch.onnx.register_custom_op_symbolic("edgetok::size_biased_attention", _node, 17)


def check(kind: str, blocks) -> None:
    """One line for an unknown kind or a block whose attention this cannot replace."""
    if kind not in KINDS:
        raise EdgetokError(f"--attention {kind!r} is unknown; choose {' or '.join(KINDS)}")
    if kind == "dense":
        return
    for block in blocks:
        attn = getattr(block, "attn", None) or getattr(block, "attention", None)
        if type(attn) in (Attention, ViTAttention):
            continue
        raise EdgetokError(f"--attention {kind}: {type(block).__name__} blocks with {type(attn).__name__} attention "
                           "cannot be patched; use --attention dense (timm Attention and Hugging Face ViTAttention can)")


def attend(attn, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``attn``'s forward (timm Attention or Hugging Face ViTAttention, with their own projections and norms)
    with its softmax(qkᵀ)v as the plugin op."""
    b, n, _ = x.shape
    if isinstance(attn, Attention):
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out, _ = size_biased_attention(q, k, v, size, float(attn.scale))
        out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
        return attn.proj_drop(attn.proj(out if gate is None else out * gate))
    shape = (b, n, -1, attn.head_dim)
    q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out, _ = size_biased_attention(q, k, v, size, float(attn.scaling))
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
