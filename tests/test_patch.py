"""Patched models behave like ordinary modules: any entry point, any number of calls, reusable plans."""

import timm
import torch

from edgetok.vit.loading import from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import plan, reduce_vit


def _tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, num_classes=5).eval()


def test_forward_features_after_forward_starts_afresh():
    model = _tiny()
    reduce_vit(from_timm(model, "tiny"), make_method("tome", 4, r=3))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first = model.forward_features(x)
        model(x)
        again = model.forward_features(x)
    assert first.shape == (2, 17 - 4 * 3, 192)
    assert torch.equal(first, again)


def test_one_method_object_plans_two_models_independently():
    method = make_method("tome", 4, r=8)
    small = from_timm(_tiny(), "tiny64")
    big = from_timm(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=128, depth=4), "tiny128")
    assert plan(small, method).amounts == [8, 4, 2, 1]  # clamped to what 16, 8, 4, 2 patches allow
    assert plan(big, method).amounts == [8, 8, 8, 8]
    assert plan(small, method).amounts == [8, 4, 2, 1]
