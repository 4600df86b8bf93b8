"""A block's attention as one plugin node: ``edgetok::SizeBiasedAttention`` (``--attention biased``) or
``edgetok::BlockSparseAttention`` (``--attention sparse``).

In eager PyTorch on a CPU the op is its standard form (SDPA with the float mask log(size); for block-sparse
attention, the selection then SDPA with the unselected blocks masked); on CUDA tensors the plugin's Triton
kernels; in an export the plugin node. Sizes come from the
reduction state: proportional methods bias each key by log(size); the others only mask padding keys (size 0),
which is exactly the bias the dense path adds, so the block computes what it did before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from transformers.models.vit.modeling_vit import ViTAttention

from edgetok.errors import EdgetokError

KINDS = ("dense", "biased", "sparse")


@dataclass(frozen=True)
class Sparsity:
    """BlockSparseAttention's fields (edgetok/plugins/block_sparse_attention.py)."""
    block: int = 64
    mass: float = 0.95
    keep: float = 0.0

    def check(self, tokens: int) -> None:
        from edgetok.plugins.block_sparse_attention import MAX_BLOCKS, blocks_of, largest_block

        if self.block >= 16 and not self.block & (self.block - 1) and blocks_of(tokens, self.block) > MAX_BLOCKS:
            raise EdgetokError(f"--attention-block {self.block}: the model's {tokens} tokens make "
                               f"{blocks_of(tokens, self.block)} blocks, more than {MAX_BLOCKS}; use a larger block")
        if self.block < 16 or self.block & (self.block - 1):
            raise EdgetokError(f"--attention-block {self.block} must be a power of two >= 16 (the kernel tile), e.g. 64")
        if self.block > largest_block(tokens):
            raise EdgetokError(f"--attention-block {self.block} is larger than the model's {tokens} tokens need (one "
                               f"block of {largest_block(tokens)} holds them all; a larger one only pads): give "
                               f"16..{largest_block(tokens)}")
        if not 0 < self.mass <= 1:
            raise EdgetokError(f"--attention-mass {self.mass} must be in (0, 1], e.g. 0.95")
        if not 0 <= self.keep <= 1 or self.keep != self.keep:
            raise EdgetokError(f"--attention-keep {self.keep} must be in (0, 1] (or 0: select by --attention-mass)")


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

    from edgetok.plugins.spec import NAMESPACE, node_attributes

    scale = symbolic_helper._get_const(scale, "f", "scale")
    out, row = g.op(f"{NAMESPACE}::SizeBiasedAttention", q, k, v, size, scale_f=scale, **node_attributes(),
                    outputs=2)
    out.setType(q.type())
    sizes = q.type().varyingSizes() or [None] * 4
    row.setType(q.type().with_sizes([sizes[0], sizes[2]]))
    return out, row


torch.onnx.register_custom_op_symbolic("edgetok::size_biased_attention", _node, 17)


def _selection(q, k, size, scale: float, block: int, mass: float, keep: float, prefix: int):
    """BlockSparseAttention's steps 1-3 in PyTorch (the spec's words, as its numpy reference):
    ([B, H, N, N] bool: which keys each query attends, [B] kept fraction of real block pairs)."""
    batch, heads, tokens, dim = q.shape
    nb = -(-tokens // block)
    pad = nb * block - tokens
    real = F.pad((size[..., 0] > 0).to(q.dtype), (0, pad)).view(batch, 1, nb, block, 1)
    count = real.sum(dim=3).clamp_min(1)

    def mean(x):
        return (F.pad(x, (0, 0, 0, pad)).view(batch, heads, nb, block, dim) * real).sum(dim=3) / count

    weight = F.pad(size[..., 0].clamp_min(0), (0, pad)).view(batch, nb, block).sum(dim=2)
    real_block = weight > 0
    log_w = torch.where(real_block, weight.clamp_min(torch.finfo(weight.dtype).tiny).log(), float("-inf"))
    p = (mean(q) @ mean(k).transpose(-1, -2) * scale + log_w[:, None, None, :]).softmax(dim=-1)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices  # ties: the lower block first
    ranked = p.gather(-1, order)
    before = ranked.cumsum(dim=-1) - ranked
    if keep > 0:
        n_keep = torch.ceil(torch.tensor(keep, dtype=torch.float32) * real_block.sum(dim=1).float())
        chosen = (torch.arange(nb, device=q.device) < n_keep[:, None, None, None].to(q.device)).expand_as(p)
    else:
        limit = float(torch.tensor(mass, dtype=torch.float32))  # compared in float32, as the kernels do
        chosen = (before < limit) | (mass >= 1)
    selected = torch.zeros_like(chosen).scatter(-1, order, chosen)
    selected |= torch.eye(nb, dtype=torch.bool, device=q.device)
    if prefix > 0:
        selected[..., 0] = True
    pairs = (selected & real_block[:, None, :, None] & real_block[:, None, None, :]).sum(dim=(2, 3))
    kept = (pairs / real_block.sum(dim=1, keepdim=True) ** 2).mean(dim=1)
    token_block = torch.arange(tokens, device=q.device) // block
    return selected[:, :, token_block][:, :, :, token_block], kept.to(q.dtype)


@torch.library.custom_op("edgetok::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, scale: float,
                           block: int, mass: float, keep: float, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the selected key blocks only (the rest masked), and the kept fraction per image."""
    allowed, kept = _selection(q, k, size, scale, block, mass, keep, prefix)
    bias = torch.where(size[..., 0] > 0, size[..., 0].clamp_min(torch.finfo(size.dtype).tiny).log(),
                       float("-inf"))[:, None, None, :].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~allowed, float("-inf")), scale=scale)
    return out, kept


@block_sparse_attention.register_kernel("cuda")
def _block_sparse_attention_cuda(q, k, v, size, scale, block, mass, keep, prefix):
    """On a GPU: the plugin's Triton kernels (fp32, as the plugin)."""
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import get

    inputs = [t.float().contiguous() for t in (q, k, v, size)]
    out, kept = kernels.run_torch(get("BlockSparseAttention"), inputs,
                                  {"scale": scale, "block": block, "mass": mass, "keep": keep, "prefix": prefix})
    return out.to(q.dtype), kept.to(q.dtype)


@block_sparse_attention.register_fake
def _(q, k, v, size, scale, block, mass, keep, prefix):
    return torch.empty_like(q), q.new_empty(q.shape[0])


def _sparse_node(g, q, k, v, size, scale, block, mass, keep, prefix):
    from torch.onnx import symbolic_helper as sh

    from edgetok.plugins.spec import NAMESPACE, node_attributes

    out, kept = g.op(f"{NAMESPACE}::BlockSparseAttention", q, k, v, size, scale_f=sh._get_const(scale, "f", "scale"),
                     block_i=sh._get_const(block, "i", "block"), mass_f=sh._get_const(mass, "f", "mass"),
                     keep_f=sh._get_const(keep, "f", "keep"), prefix_i=sh._get_const(prefix, "i", "prefix"),
                     **node_attributes(), outputs=2)
    out.setType(q.type())
    kept.setType(q.type().with_sizes([(q.type().varyingSizes() or [None])[0]]))
    return out, kept


torch.onnx.register_custom_op_symbolic("edgetok::block_sparse_attention", _sparse_node, 17)


def check(kind: str, blocks) -> None:
    """One line for an unknown kind or a block whose attention this cannot replace."""
    if kind not in (*KINDS, "biased_after_reduction"):
        raise EdgetokError(f"--attention {kind!r} is unknown; choose {', '.join(KINDS)}")
    if kind == "dense":
        return
    for block in blocks:
        attn = getattr(block, "attn", None) or getattr(block, "attention", None)
        if type(attn) in (Attention, ViTAttention):
            continue
        raise EdgetokError(f"--attention {kind}: {type(block).__name__} blocks with {type(attn).__name__} attention "
                           "cannot be patched; use --attention dense (timm Attention and Hugging Face ViTAttention can)")


def attend(attn, x: torch.Tensor, size: torch.Tensor, sparsity: Sparsity | None = None, prefix: int = 1) -> torch.Tensor:
    """``attn``'s forward (timm Attention or Hugging Face ViTAttention, with their own projections and norms)
    with its softmax(qkᵀ)v as one plugin op: SizeBiasedAttention, or BlockSparseAttention with ``sparsity``."""
    def op(q, k, v, scale):
        if sparsity is None:
            return size_biased_attention(q, k, v, size, scale)[0]
        return block_sparse_attention(q, k, v, size, scale, sparsity.block, sparsity.mass, sparsity.keep, prefix)[0]

    b, n, _ = x.shape
    if isinstance(attn, Attention):
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = op(q, k, v, float(attn.scale))
        out = attn.norm(out.transpose(1, 2).reshape(b, n, -1))
        return attn.proj_drop(attn.proj(out if gate is None else out * gate))
    shape = (b, n, -1, attn.head_dim)
    q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = op(q, k, v, float(attn.scaling))
    return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
