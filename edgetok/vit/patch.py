"""Patch a loaded ViT's own blocks so that a reduction method runs between attention and MLP.

As in ToMe, each block's class is swapped for a subclass whose forward is the original one with
one line added (the reduction) and the proportional-attention bias passed through the block's own
``attn_mask`` argument. The block's own modules (LayerScale, q/k-norm, fused or plain attention,
drop-path) are untouched, so with nothing to reduce the output is exactly the original model's.
Queries and keys are read by forward hooks on the modules that produce them. Token sizes live in a
state object shared by the blocks; the first block starts each forward afresh.

Blocks patched: timm's ``Block``, Hugging Face's ``ViTLayer``, and the encoder layers of the CLIP and SigLIP
vision towers that LLaVA-style models use (``CLIPEncoderLayer``, ``SiglipEncoderLayer``; edgetok/vlm). The
subclasses stay instances of the originals, so transformers' output recording (hooks installed on every
``isinstance`` of the layer class, which LLaVA's ``get_image_features`` reads its feature layer from) still
sees them.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention, Block
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.models.vit.modeling_vit import ViTLayer

from edgetok.errors import EdgetokError
from edgetok.vit.loading import LoadedViT
from edgetok.vit.token_transform import apply_transform

AFTER_REDUCTION = "biased_after_reduction"  # --plugins: SizeBiasedAttention where sizes exist (past a reduction)


class ReductionState:
    """State shared by the patched blocks: the method, its per-block amounts, and token sizes."""

    def __init__(self, method, amounts: list[int], prefix: int, class_token: bool = True, plugins: bool = False,
                 attention: str = "dense", sparsity=None):
        self.method = method
        self.attention = attention  # "biased" / "sparse": attention as one plugin op (edgetok/vit/attention.py)
        self.sparsity = sparsity  # "sparse": BlockSparseAttention's block, mass, keep
        self.plugins = plugins  # steps the method can do as one plugin node export as that node
        self.amounts = amounts
        self.prefix = prefix
        self.class_token = class_token
        self.size: torch.Tensor | None = None


class _ReducingMixin:
    _edgetok_state: ReductionState
    _edgetok_layer: int
    _edgetok_taps: dict

    def _edgetok_start(self, mask):
        """Resets sizes in the first block; returns the attention mask plus log(size) if proportional."""
        state = self._edgetok_state
        if self._edgetok_layer == 0:
            state.size = None
        if state.size is None or not state.method.proportional_attention:
            return mask
        bias = state.size.log()[:, None, None, :, 0]  # [B, 1, 1, N]: + log(size) of each key
        return bias if mask is None else mask + bias

    def _edgetok_attend(self, attn, x: torch.Tensor, mask, dense, causal: bool = False):
        """The block's attention: the SizeBiasedAttention op when asked for (and no mask or causality came from
        outside), else the block's own module with the mask plus the proportional bias (``dense(mask)``)."""
        state = self._edgetok_state
        outside = mask is not None or causal
        mask = self._edgetok_start(mask)
        own = state.attention in ("biased", "sparse") or (state.attention == AFTER_REDUCTION and state.size is not None)
        if outside or not own:
            return dense(mask)
        from edgetok.vit.attention import attend

        size = state.size if state.size is not None else torch.ones_like(x[..., :1])
        if not state.method.proportional_attention:
            size = (size > 0).to(x.dtype)  # padding keys masked, real ones unbiased: what the dense path adds
        return attend(attn, x, size, state.sparsity if state.attention == "sparse" else None, state.prefix)

    def _edgetok_reduce(self, x: torch.Tensor) -> torch.Tensor:
        state = self._edgetok_state
        taps = self._edgetok_taps
        amount = state.amounts[self._edgetok_layer]
        if hasattr(state.method, "reduce"):  # a step of its own (data-dependent ones prune through a plugin op)
            size = state.size if state.size is not None else torch.ones_like(x[..., :1])
            x, state.size = state.method.reduce(amount, taps, x, size, state.prefix, state.class_token)
            taps.pop("q"), taps.pop("k"), taps.pop("v", None), taps.pop("attn", None)
            return x
        if state.plugins and amount and hasattr(state.method, "plugin_step"):
            size = state.size if state.size is not None else torch.ones_like(x[..., :1])
            x, state.size = state.method.plugin_step(amount, taps.pop("k"), x, size, state.prefix, state.class_token)
            taps.pop("q")
            return x
        layer = {"layer": self._edgetok_layer} if getattr(state.method, "per_layer", False) else {}
        if getattr(state.method, "attention_probs", False):  # the block's own probabilities, when it exposed them
            layer["attn"] = taps.pop("attn", None)
        step = state.method.transform(amount, taps["q"], taps["k"], taps["scale"], state.prefix, state.class_token,
                                      **layer)
        taps.pop("q"), taps.pop("k")
        if step is None:
            return x
        transform, weight = step
        size = state.size if state.size is not None else torch.ones_like(x[..., :1])
        if weight is None:
            weight = size
        else:
            weight = weight.clamp_min(torch.finfo(x.dtype).tiny)
        x, state.size = apply_transform(transform, x, size, weight)
        return x


class ReducingBlock(Block, _ReducingMixin):
    def forward(self, x, attn_mask=None, is_causal=False):
        normed = self.norm1(x)
        x = x + self.drop_path1(self.ls1(self._edgetok_attend(
            self.attn, normed, attn_mask, lambda mask: self.attn(normed, attn_mask=mask, is_causal=is_causal),
            is_causal)))
        x = self._edgetok_reduce(x)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ReducingViTLayer(ViTLayer, _ReducingMixin):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        normed = hidden_states
        hidden_states = self._edgetok_attend(self.attention, normed, attention_mask,
                                             lambda mask: self.attention(normed, mask, **kwargs)[0])
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual
        hidden_states = self._edgetok_reduce(hidden_states)

        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return hidden_states + residual


def _encoder_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """``CLIPEncoderLayer.forward`` (``SiglipEncoderLayer``'s is the same) with the reduction after attention."""
    residual = hidden_states
    normed = self.layer_norm1(hidden_states)
    hidden_states = self._edgetok_attend(
        self.self_attn, normed, attention_mask,
        lambda mask: self.self_attn(hidden_states=normed, attention_mask=mask, **kwargs)[0])
    hidden_states = residual + hidden_states
    hidden_states = self._edgetok_reduce(hidden_states)

    residual = hidden_states
    hidden_states = self.layer_norm2(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


class ReducingCLIPEncoderLayer(CLIPEncoderLayer, _ReducingMixin):
    forward = _encoder_layer_forward


class ReducingSiglipEncoderLayer(SiglipEncoderLayer, _ReducingMixin):
    forward = _encoder_layer_forward


ENCODER_LAYERS = {CLIPEncoderLayer: ReducingCLIPEncoderLayer, SiglipEncoderLayer: ReducingSiglipEncoderLayer}


def _tap(taps: dict, key: str, heads: int | None = None, part: int | None = None):
    def hook(module, args, output):
        if part is not None:  # fused [B, N, 3*H*D] qkv projection: take q, k or v
            output = output.view(*output.shape[:2], 3, -1)[:, :, part]
        if heads is not None:  # [B, N, H*D] projection -> [B, H, N, D]
            b, n, _ = output.shape
            output = output.view(b, n, heads, -1).transpose(1, 2)
        taps[key] = output

    return hook


def patch_blocks(vit: LoadedViT, method, amounts: list[int], plugins: bool = False,
                 attention: str = "dense", sparsity=None) -> ReductionState:
    """Swap every block of ``vit`` for its reducing subclass, driven by ``method``'s plan."""
    state = ReductionState(method, amounts, vit.prefix_tokens, vit.class_token, plugins, attention, sparsity)
    sparsify = getattr(method, "sparsify", None)
    if sparsify is not None and (attention != "dense" or any(type(b) is not Block or type(b.attn) is not Attention for b in vit.blocks)):
        raise EdgetokError(f"--sparsity {method.sparsity} thins each block's own attention probabilities, which needs "
                           "timm Blocks with the standard attention: leave out --attention/--plugins (or use --sparsity 1)")
    for layer, block in enumerate(vit.blocks):
        taps: dict = {}
        if type(block) is Block and type(block.attn) is Attention:
            block.__class__ = ReducingBlock
            taps["scale"] = block.attn.scale
            block.attn.q_norm.register_forward_hook(_tap(taps, "q"))
            block.attn.k_norm.register_forward_hook(_tap(taps, "k"))
            if getattr(method, "data_dependent", False):  # ATS scores tokens by their values' norm too
                block.attn.qkv.register_forward_hook(_tap(taps, "v", block.attn.num_heads, part=2))
            if sparsify is not None:  # GTP's θ: every block attends with thinned probabilities (timm's unfused path)
                block.attn.fused_attn = False
                block.attn.attn_drop.register_forward_hook(lambda module, args, out: sparsify(out))
            if getattr(method, "attention_probs", False) and amounts[layer]:
                # A method that ranks by the whole attention matrix reads the block's own softmax (timm's unfused
                # path, what attn_drop hands on: in eval its input, thinned if θ < 1) instead of computing it a
                # second time; only where it reduces, so blocks that keep every token stay exactly the model
                # (fused attention left alone).
                block.attn.fused_attn = False
                block.attn.attn_drop.register_forward_hook(lambda module, args, out, taps=taps: taps.update(attn=out))
        elif type(block) is ViTLayer:
            block.__class__ = ReducingViTLayer
            attn = block.attention
            taps["scale"] = attn.scaling
            attn.q_proj.register_forward_hook(_tap(taps, "q", attn.num_attention_heads))
            attn.k_proj.register_forward_hook(_tap(taps, "k", attn.num_attention_heads))
            if getattr(method, "data_dependent", False):
                attn.v_proj.register_forward_hook(_tap(taps, "v", attn.num_attention_heads))
        elif type(block) in ENCODER_LAYERS:  # CLIP / SigLIP vision towers (separate q, k, v projections)
            block.__class__ = ENCODER_LAYERS[type(block)]
            attn = block.self_attn
            taps["scale"] = attn.scale
            attn.q_proj.register_forward_hook(_tap(taps, "q", attn.num_heads))
            attn.k_proj.register_forward_hook(_tap(taps, "k", attn.num_heads))
            if getattr(method, "data_dependent", False):
                attn.v_proj.register_forward_hook(_tap(taps, "v", attn.num_heads))
        else:
            raise EdgetokError(
                f"{vit.name} uses {type(block).__name__} blocks, which edgetok cannot reduce yet; "
                "use --method none or a model built from timm Block / HF ViTLayer / CLIP or SigLIP encoder layers"
            )
        if layer == 0 and hasattr(method, "start"):  # a method that looks at the embedded tokens first (GTP)
            block.register_forward_pre_hook(lambda module, args: method.start(args[0], state.prefix))
        block._edgetok_state = state
        block._edgetok_layer = layer
        block._edgetok_taps = taps
    if getattr(method, "data_dependent", False):
        from edgetok.vit.dynamic import padding_aware

        padding_aware(vit, state)
    return state
