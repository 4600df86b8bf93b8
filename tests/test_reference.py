"""The patched models equal an independent, loop-based reference (tests/reference_impl.py).

Everything runs in float64 with random weights drawn from a seeded generator at a scale that makes
attention and key similarities clearly non-uniform, so discrete choices (matches, merges, kept
tokens) are well separated; the reference reports its smallest decision gap and each test checks
that gap first, so a failure is a genuine difference and not a near-tie flipping a choice.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from reference_impl import reference_forward

from edgetok.errors import EdgetokError
from edgetok.vit.loading import from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit

ATOL = 1e-9
MIN_GAP = 1e-6  # decisions closer than this could flip on rounding; pick another seed if hit

COMMON = dict(pretrained=False, embed_dim=64, num_heads=4, num_classes=10)
CONFIGS = {
    "vit17": ("vit_tiny_patch16_224", dict(img_size=64, depth=4)),  # 16 patches + cls
    "vit37": ("vit_tiny_patch16_224", dict(img_size=96, depth=4)),  # 36 patches + cls
    "distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=4)),  # P = 2
    "registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=3)),  # P = 5, LayerScale
    "qknorm_avg": (  # q/k LayerNorm, LayerScale, mean-pooled head (fc_norm)
        "vit_tiny_patch16_224",
        dict(img_size=64, depth=4, qk_norm=True, init_values=0.1, global_pool="avg"),
    ),
    "no_cls": ("vit_tiny_patch16_224", dict(img_size=64, depth=4, class_token=False, global_pool="avg")),  # P = 0
    "registers_no_cls": (  # P = 3 registers, no class token (the reg*_gap models)
        "vit_tiny_patch16_224",
        dict(img_size=64, depth=4, class_token=False, reg_tokens=3, global_pool="avg"),
    ),
}


def build(config: str, seed: int = 0) -> torch.nn.Module:
    """A tiny float64 timm ViT whose weights are all redrawn so that attention is far from uniform."""
    name, kwargs = CONFIGS[config]
    model = timm.create_model(name, **COMMON, **kwargs).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "token" in pname or "pos_embed" in pname:
                p.copy_(0.5 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))  # unit-scale outputs
            elif pname.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # norm weights, LayerScale gammas
                p.copy_(1.0 + 0.2 * noise)
    return model


def expected_counts(n: int, prefix: int, depth: int, method: str, **kw) -> list[int]:
    """Tokens entering each block's MLP, from the methods' arithmetic alone."""
    counts = []
    for layer in range(depth):
        if method == "tome":
            r = kw["r"][layer]
            if kw["clamp"]:
                r = min(r, (n - prefix) // 2)
            n -= r
        elif layer in kw["keep_layers"]:
            kept = math.ceil(kw["keep_rate"] * (n - prefix))
            n = n if kept >= n - prefix else prefix + kept + 1
        counts.append(n)
    return counts


def compare(config: str, method: str, fused: bool = True, batch: int = 2, seed: int = 0, **kw):
    """Patch a copy, run both on the same random images; check logits and token counts agree."""
    model = build(config, seed)
    ref_model = copy.deepcopy(model)
    vit = from_timm(model, config)
    plan = reduce_vit(vit, make_method(method, vit.depth, **kw))
    if not fused:
        for blk in model.blocks:
            blk.attn.fused_attn = False
    seen: list[int] = []
    for blk in model.blocks:
        blk.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch, 3, vit.img_size, vit.img_size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = vit.module(images)

    n, prefix = vit.num_tokens, vit.prefix_tokens
    if method == "tome":
        r_list = plan.params["r_per_layer"]
        ref, ref_counts, stats = reference_forward(ref_model, images, "tome", r_per_layer=r_list)
        given = [kw["r"]] * vit.depth if "r" in kw else [int(v) for v in str(kw["r_schedule"]).split(",")]
        given += [0] * (vit.depth - len(given))
        expect = expected_counts(n, prefix, vit.depth, "tome", r=given, clamp="r" in kw)
        assert r_list == [a - b for a, b in zip([n] + expect[:-1], expect)]
    else:
        ref, ref_counts, stats = reference_forward(
            ref_model, images, "evit", keep_rate=kw["keep_rate"], keep_layers=kw["keep_layers"]
        )
        expect = expected_counts(n, prefix, vit.depth, "evit", **kw)

    assert stats.get("min_gap", math.inf) > MIN_GAP, f"near-tie in the reference's choices: {stats}"
    assert seen == [after for _, after in plan.tokens] == ref_counts == expect
    assert [before for before, _ in plan.tokens] == [n] + expect[:-1]
    diff = (out - ref).abs().max().item()
    print(f"{config} {method} {kw} fused={fused}: max |patched - reference| = {diff:.2e}, tokens {expect}")
    assert diff < ATOL, f"patched differs from the reference by {diff:.3e}"
    return expect


@pytest.mark.parametrize("config", list(CONFIGS))
def test_reference_without_reduction_matches_timm(config):
    """The reference's hand-written attention reproduces the unmodified timm model."""
    model = build(config)
    size = model.patch_embed.img_size[0]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = model(images)
    ref, counts, _ = reference_forward(model, images, "none")
    assert (ref - expected).abs().max().item() < ATOL
    assert counts == [model.patch_embed.num_patches + model.num_prefix_tokens] * len(model.blocks)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_tome_constant_r_matches_reference(config):
    compare(config, "tome", batch=3, r=3)


def test_tome_constant_r_clamped_in_late_blocks():
    """r=4 on 17 tokens: the last block has only 4 mergeable tokens, so r is clamped to 2."""
    assert compare("vit17", "tome", r=4) == [13, 9, 5, 3]


@pytest.mark.parametrize(
    "config, schedule, counts",
    [
        ("vit17", "3,2,0,1", [14, 12, 12, 11]),
        ("vit37", "8,0,5,4", [29, 29, 24, 20]),
        ("distilled", "2,4,0,3", [16, 12, 12, 9]),
        ("registers", "1,6,2", [20, 14, 12]),
        ("no_cls", "3,2,0,4", [13, 11, 11, 7]),
        ("registers_no_cls", "2,4,1,3", [17, 13, 12, 9]),
    ],
)
def test_tome_schedule_matches_reference(config, schedule, counts):
    assert compare(config, "tome", r_schedule=schedule) == counts


@pytest.mark.parametrize("config", ["vit17", "distilled", "registers", "qknorm_avg", "no_cls"])
def test_tome_plain_attention_matches_reference(config):
    """The non-fused attention path (explicit softmax) gets the same size bias as the fused one."""
    compare(config, "tome", fused=False, r=3)


@pytest.mark.parametrize(
    "config, keep_rate, counts",
    [
        ("vit17", 0.7, [17, 14, 12, 12]),
        ("vit17", 0.5, [17, 10, 7, 7]),
        ("vit37", 0.7, [37, 28, 21, 21]),
        ("distilled", 0.7, [18, 15, 13, 13]),
        ("registers", 0.5, [21, 14, 11]),
        ("qknorm_avg", 0.7, [17, 14, 12, 12]),
        ("vit17", 0.95, [17, 17, 17, 17]),  # ceil(0.95 * 16) = 16: nothing to drop, block skipped
    ],
)
def test_evit_matches_reference(config, keep_rate, counts):
    assert compare(config, "evit", batch=3, keep_rate=keep_rate, keep_layers=[1, 2]) == counts


@pytest.mark.parametrize("config", ["vit17", "registers"])
def test_evit_plain_attention_matches_reference(config):
    compare(config, "evit", fused=False, keep_rate=0.7, keep_layers=[1, 2])


def test_evit_refuses_a_model_without_class_token():
    vit = from_timm(build("no_cls"), "no_cls")
    with pytest.raises(EdgetokError, match="no class token"):
        reduce_vit(vit, make_method("evit", vit.depth, keep_rate=0.7))


def _transform(keys: torch.Tensor, r: int, prefix: int, class_token: bool = True):
    """ToMe's step on keys [N, D] of one image (one head)."""
    return make_method("tome", 1, r=r).transform(r, None, keys[None, None], None, prefix, class_token)[0]


def test_tome_split_is_the_references_class_token_never_merged_distillation_never_a_destination():
    """A = even positions of all tokens, B = odd ones. The class token (A) copies a B token's key and the
    distillation token (B) copies A tokens' keys, so only their -inf row and column keep them out."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    keys[0] = keys[3]  # cls would be the best-matched A token (cosine 1)
    keys[4] = keys[1] * 2  # ... and A token 4 would merge into the distillation token
    t = _transform(keys, r=2, prefix=2)
    assert 0 not in t.src[0].tolist()  # the best-matched A token is the class token: skipped
    t = _transform(keys, r=5, prefix=2)  # the most ToMe allows: every unprotected A token
    src, keep, dst = t.src[0].tolist(), t.keep[0].tolist(), t.dst[0].tolist()
    assert sorted(src) == [2, 4, 6, 8, 10]
    assert keep == [0, 1, 3, 5, 7, 9, 11]  # cls, dist first, as the reference's cat([unm[:1], dst[:1], ...])
    assert all(j >= 2 for j in dst)  # only unprotected B tokens receive merges, never the distillation token


def test_tome_first_patch_is_in_b_with_a_class_token():
    """With only a class token, patch 1 sits at position 1 (B): the reference's split, not one over patches."""
    keys = torch.randn(9, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = _transform(keys, r=4, prefix=1)  # all four unprotected A tokens (2, 4, 6, 8) merge
    assert sorted(t.src[0].tolist()) == [2, 4, 6, 8]
    assert t.keep[0].tolist() == [0, 1, 3, 5, 7]


def test_tome_without_class_token_keeps_unmerged_tokens_in_score_order():
    """The reference sorts unmerged A tokens back into position order only when there is a class token."""
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    metric = keys / keys.norm(dim=-1, keepdim=True)
    best = (metric[0::2] @ metric[1::2].T).max(dim=-1).values
    ranked = (best.argsort(descending=True) * 2).tolist()
    t = _transform(keys, r=1, prefix=0, class_token=False)
    assert t.src[0].tolist() == ranked[:1]
    assert t.keep[0].tolist() == ranked[1:] + [1, 3, 5, 7, 9]
