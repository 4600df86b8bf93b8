"""With nothing to reduce, a patched model is exactly (bit for bit) the original model."""

import copy

import pytest
import timm
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from edgetok.errors import EdgetokError
from edgetok.vit.loading import from_hf, from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit

SMALL = dict(depth=3, embed_dim=64, num_heads=4, num_classes=10)

# (timm name, extra kwargs): one of each kind the exporter supports.
TIMM_VARIANTS = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=64)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(img_size=64)),
    "qk_norm": ("vit_small_patch16_224", dict(img_size=64, qk_norm=True)),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    "avg_pool": ("vit_small_patch16_224", dict(img_size=64, global_pool="avg", class_token=False)),
    "map_pool": ("vit_small_patch16_224", dict(img_size=64, global_pool="map")),
}

ZERO_REDUCTIONS = {
    "none": dict(name="none"),
    "tome_r0": dict(name="tome", r=0),
    "evit_keep1": dict(name="evit", keep_rate=1.0),
}


def _randomise(model):
    """Non-trivial LayerScale/norm parameters, so a dropped module would show."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fused_attn", "plain_attn"])
@pytest.mark.parametrize("reduction", ZERO_REDUCTIONS, ids=list(ZERO_REDUCTIONS))
@pytest.mark.parametrize("variant", TIMM_VARIANTS, ids=list(TIMM_VARIANTS))
def test_timm_zero_reduction_is_exact(variant, reduction, fused):
    name, kwargs = TIMM_VARIANTS[variant]
    model = _randomise(timm.create_model(name, pretrained=False, **SMALL, **kwargs)).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    original = copy.deepcopy(model)
    vit = from_timm(model, name)
    spec = dict(ZERO_REDUCTIONS[reduction])
    method = make_method(spec.pop("name"), vit.depth, **spec)
    if reduction == "evit_keep1" and not vit.class_token:  # EViT's scores are the class token's attention
        with pytest.raises(EdgetokError, match="has no class token"):
            reduce_vit(vit, method)
        return
    plan = reduce_vit(vit, method)
    assert not plan.reduces
    if reduction != "none":
        assert type(model.blocks[0]).__name__ == "ReducingBlock"  # the patched forward really runs
    x = torch.randn(2, 3, vit.img_size, vit.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vit.module(x), original(x))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", [ViTForImageClassification, ViTModel], ids=["classifier", "encoder"])
@pytest.mark.parametrize("reduction", ["tome_r0", "evit_keep1"])
def test_hf_zero_reduction_is_exact(cls, attn, reduction):
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=128, num_labels=7)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = cls(config).eval()
    original = copy.deepcopy(model)
    vit = from_hf(model, "hf-vit")
    spec = dict(ZERO_REDUCTIONS[reduction])
    reduce_vit(vit, make_method(spec.pop("name"), vit.depth, **spec))
    assert type(model.vit.layers[0] if hasattr(model, "vit") else model.layers[0]).__name__ == "ReducingViTLayer"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = vit.module(x)
        want = original(pixel_values=x)
    if cls is ViTForImageClassification:
        assert torch.equal(got, want.logits)
    else:
        assert torch.equal(got[0], want.last_hidden_state) and torch.equal(got[1], want.pooler_output)


def test_hf_tome_reduces_tokens_per_schedule():
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=128)
    torch.manual_seed(0)
    vit = from_hf(ViTModel(config, add_pooling_layer=False).eval(), "hf-vit")
    plan = reduce_vit(vit, make_method("tome", vit.depth, r=10))
    with torch.no_grad():
        hidden = vit.module(torch.randn(2, 3, 32, 32))
    assert [t[1] for t in plan.tokens] == [55, 45, 35]
    assert hidden.shape == (2, 35, 64)
