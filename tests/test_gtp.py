"""GTP-ViT graph propagation: the many-to-many transform sums exactly (not a convex average); the patched model
equals a loop-by-loop reading of the reference code (tests/reference_impl.py) for every graph kind and prefix
layout; zero propagation is the model; ONNX Runtime parity on real digits; a TensorRT-RTX build; bad
options in one line."""

import copy
import math

import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from method_checks import assert_deit_export_builds, assert_export_matches_pytorch, assert_zero_reduction_is_the_model
from reference_impl import gtp_forward
from test_reference import ATOL, MIN_GAP, build

from edgetok.vit.loading import from_timm
from edgetok.vit.reduction import make_method, reduce_vit
from edgetok.vit.token_transform import TokenTransform, apply_transform


def test_the_transform_adds_weighted_sources_without_normalising():
    gen = torch.Generator().manual_seed(0)
    x, size = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64), torch.rand(2, 6, 1, generator=gen) + 1
    keep, src = torch.tensor([[0, 3, 1], [0, 1, 2]]), torch.tensor([[2, 5], [4, 3]])
    mix = torch.rand(2, 3, 2, generator=gen, dtype=torch.float64)
    out, out_size = apply_transform(TokenTransform(keep=keep, src=src, mix=mix, normalize=False), x,
                                    size.double(), torch.ones_like(size.double()))
    for b in range(2):
        for j in range(3):
            want = x[b, keep[b, j]] + sum(mix[b, j, m] * x[b, src[b, m]] for m in range(2))
            want_size = size[b, keep[b, j], 0] + sum(mix[b, j, m] * size[b, src[b, m], 0] for m in range(2))
            assert torch.allclose(out[b, j], want, atol=1e-12) and abs(float(out_size[b, j, 0] - want_size)) < 1e-9


def _compare(config, propagate, kind, alpha=0.1):
    model = build(config)
    ref_model = copy.deepcopy(model)
    vit = from_timm(model, config)
    plan = reduce_vit(vit, make_method("gtp", vit.depth, propagate=propagate, alpha=alpha, graph=kind))
    images = torch.randn(2, 3, vit.img_size, vit.img_size, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        out = vit.module(images)
    ref, counts, stats = gtp_forward(ref_model, images, plan.params["propagate_per_layer"], alpha, kind)
    assert stats.get("min_gap", math.inf) > MIN_GAP, f"near-tie in the reference's choices: {stats}"
    assert counts == [after for _, after in plan.tokens]
    assert (out - ref).abs().max().item() < ATOL
    return counts


@pytest.mark.parametrize("kind", ["spatial", "semantic", "mixed"])
@pytest.mark.parametrize("config", ["vit17", "vit37", "distilled", "registers", "no_cls"])
def test_matches_the_loop_reference(config, kind):
    _compare(config, "2", kind)


def test_a_per_block_list_and_alpha():
    assert _compare("vit37", "4,0,6,3", "mixed", alpha=0.5) == [33, 33, 27, 24]


def test_zero_propagation_is_the_model_exactly():
    assert_zero_reduction_is_the_model("gtp", propagate=0)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    return export_vit(ViTExportOptions(model="edgetok_digits_vit", method="gtp", propagate="4", graph="mixed",
                                       output=str(tmp_path_factory.mktemp("g") / "g.onnx")))


def test_export_equals_pytorch_on_real_digits(digits_export, tmp_path):
    assert_export_matches_pytorch(digits_export, tmp_path / "h", "gtp", propagate="4", graph="mixed")
    red = digits_export["reduction"]
    assert (red["method"], red["propagate_per_layer"], red["alpha"], red["graph"]) == ("gtp", [4] * 6, 0.1, "mixed")


def test_deit_export_builds_with_tensorrt_rtx(capsys, tmp_path):
    assert_deit_export_builds(capsys, tmp_path, method="gtp", propagate="2,2,2,2,2", graph="mixed")


@pytest.mark.parametrize("args,message", [
    (["--propagate", "64"], "--propagate 64 in block 0: it has 64 patch tokens, so at most 63 can be propagated"),
    (["--propagate", "1,1,1,1,1,1,1"], "--propagate 1,1,1,1,1,1,1 has 7 entries but the model has 6 blocks"),
    (["--propagate", "x"], "--propagate 'x' is not a token count"),
    (["--propagate", "4", "--graph", "knn"], "--graph 'knn' is unknown; choose spatial, semantic, mixed"),
    (["--propagate", "4", "--alpha", "-1"], "--alpha -1.0 must be a finite number >= 0"),
    ([], "--method gtp needs --propagate P"),
    (["--propagate", "4", "--r", "2"], "--method gtp takes --propagate P, --alpha and --graph"),
])
def test_bad_options_are_one_line_and_write_nothing(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "gtp", *args,
                           "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, message)
    assert not list(tmp_path.iterdir())


def test_gtp_options_need_gtp(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "tome", "--r", "2",
                           "--propagate", "4", "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, "--propagate/--alpha/--graph are GTP options; they need --method gtp")


def test_deit_small_recipes_sit_at_tomes_gmacs():
    from edgetok import recipe
    from edgetok.vit.export import ViTExportOptions
    from edgetok.vit.flops import vit_macs
    from edgetok.vit.loading import load_vit
    from edgetok.vit.reduction import plan

    vit = load_vit("deit_small_patch16_224")
    for name, r, want in (("deit_small_gtp_p11", 11, 2.986), ("deit_small_gtp_p16", 16, 2.284)):
        values = recipe.section(recipe.load(name, lambda s: None), "export", ViTExportOptions.fields(), name)
        gtp = plan(vit, make_method("gtp", vit.depth, propagate=values["propagate"], graph=values["graph"]))
        assert round(vit_macs(vit, gtp.tokens) / 1e9, 3) == want
        tome = plan(vit, make_method("tome", vit.depth, r=r))
        assert abs(vit_macs(vit, tome.tokens) - vit_macs(vit, gtp.tokens)) / vit_macs(vit, tome.tokens) < 0.005
