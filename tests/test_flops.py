"""The MACs model: DeiT-S figures from the notes, and agreement with PyTorch's own FLOP counter."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgetok.vit.flops import vit_macs
from edgetok.vit.loading import from_timm, load_vit
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import plan, reduce_vit


def notes_formula(n0: int, c: int, r: int, depth: int = 12) -> float:
    """ToMe's per-block MACs from the notes, 4NC² + 2N²C + 8C²(N − r) with r clamped as ToMe does,
    plus the 16×16 patch embedding and the 1000-class head."""
    total, n = (n0 - 1) * 3 * 16 * 16 * c + c * 1000, n0
    for _ in range(depth):
        r_l = min(r, (n - 1) // 2)
        total += 4 * n * c * c + 2 * n * n * c + 8 * c * c * (n - r_l)
        n -= r_l
    return total / 1e9


@pytest.fixture(scope="module")
def deit_s():
    return load_vit("deit_small_patch16_224")


def test_dense_deit_small_is_4_6_gmacs(deit_s):
    gmacs = vit_macs(deit_s, plan(deit_s, None).tokens) / 1e9
    assert gmacs == pytest.approx(4.6, rel=0.02)


@pytest.mark.parametrize("r, published", [(8, 3.42), (13, 2.70), (16, 2.29)])
def test_tome_deit_small_matches_the_formula(deit_s, r, published):
    gmacs = vit_macs(deit_s, plan(deit_s, make_method("tome", 12, r=r)).tokens) / 1e9
    assert gmacs == pytest.approx(notes_formula(197, 384, r), rel=0.02)
    assert gmacs == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("method", [dict(name="none"), dict(name="tome", r=6), dict(name="evit", keep_rate=0.5)])
def test_macs_agree_with_torch_flop_counter(method):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=128, depth=4)
    for blk in model.blocks:
        blk.attn.fused_attn = False  # the counter does not see the CPU fused-attention kernel
    vit = from_timm(model, "deit_tiny")
    spec = dict(method)
    result = reduce_vit(vit, make_method(spec.pop("name"), vit.depth, **spec))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vit.module(torch.randn(1, 3, 128, 128))
    counted_macs = counter.get_total_flops() / 2
    # The counter also sees the matching and the merge's one-hot product, which the model leaves out.
    assert vit_macs(vit, result.tokens) == pytest.approx(counted_macs, rel=0.02)
