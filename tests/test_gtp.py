"""GTP-ViT graph propagation: the many-to-many transform sums exactly (not a convex average); the patched model
equals a loop-by-loop reading of the reference code (tests/reference_impl.py) for every graph kind and prefix
layout, with and without the attention sparsity θ; P = 0 (which the reference takes as "every patch token") is
refused; ONNX Runtime parity on real digits; a TensorRT-RTX build; bad options in one line."""

import copy
import math

import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from method_checks import assert_deit_export_builds, assert_export_matches_pytorch
from reference_impl import gtp_forward
from test_reference import ATOL, MIN_GAP, build

from edgetok.errors import EdgetokError
from edgetok.vit.methods.gtp_torch import parse_propagate, sparsify
from edgetok.vit.loading import from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit
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


def _compare(config, propagate, kind, alpha=0.1, sparsity=None):
    model = build(config)
    ref_model = copy.deepcopy(model)
    vit = from_timm(model, config)
    plan = reduce_vit(vit, make_method("gtp", vit.depth, propagate=propagate, alpha=alpha, graph=kind,
                                       sparsity=sparsity))
    images = torch.randn(2, 3, vit.img_size, vit.img_size, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        out = vit.module(images)
    ref, counts, stats = gtp_forward(ref_model, images, plan.params["propagate_per_layer"], alpha, kind,
                                     1.0 if sparsity is None else sparsity)
    assert stats.get("min_gap", math.inf) > MIN_GAP, f"near-tie in the reference's choices: {stats}"
    assert counts == [after for _, after in plan.tokens]
    assert (out - ref).abs().max().item() < ATOL
    return counts


@pytest.mark.parametrize("kind", ["spatial", "semantic", "mixed"])
@pytest.mark.parametrize("config", ["vit17", "vit37", "distilled", "registers", "no_cls"])
def test_matches_the_loop_reference(config, kind):
    _compare(config, "2", kind)


def test_a_per_block_list_and_alpha():
    assert _compare("vit37", "4,1,6,3", "mixed", alpha=0.5) == [33, 32, 26, 23]


@pytest.mark.parametrize("config,theta", [("vit17", 0.6), ("registers", 0.8), ("no_cls", 0.5)])
def test_sparsity_matches_the_loop_reference(config, theta):
    """θ thins every block's attention (what it attends with and what the ranking reads), blocks past a short
    list included."""
    _compare(config, "2,3", "spatial" if config != "registers" else "mixed", sparsity=theta)


def test_sparsity_zeroes_each_heads_smallest_entries():
    """k = int(N²(1 − θ)): entries below the k-th smallest of each head's N² are 0, the rest untouched."""
    attn = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)
    out = sparsify(attn, 0.7)
    k = int(25 * (1 - 0.7))  # 7
    for b in range(2):
        for h in range(3):
            cut = sorted(attn[b, h].flatten().tolist())[k - 1]
            want = torch.where(attn[b, h] < cut, 0.0, attn[b, h])
            assert torch.equal(out[b, h], want) and int((out[b, h] == 0).sum()) == k - 1


def test_a_short_list_leaves_later_blocks_alone():
    """Trailing blocks (as a sidecar's padded list records them) propagate nothing; an explicit 0 before the last
    listed block is refused."""
    assert parse_propagate([4, 4, 0, 0], 4) == parse_propagate("4,4", 4) == [4, 4, 0, 0]
    with pytest.raises(EdgetokError, match="P = 0 in block 1"):
        parse_propagate([4, 0, 4, 0], 4)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    return export_vit(ViTExportOptions(model="edgetok_digits_vit", method="gtp", propagate="4", graph="mixed",
                                       sparsity=0.8, output=str(tmp_path_factory.mktemp("g") / "g.onnx")))


@pytest.mark.slow
def test_export_equals_pytorch_on_real_digits(digits_export, tmp_path):
    """With θ = 0.8: the threshold as ONNX TopK of the k smallest."""
    assert_export_matches_pytorch(digits_export, tmp_path / "h", "gtp", propagate="4", graph="mixed", sparsity=0.8)
    red = digits_export["reduction"]
    assert (red["method"], red["propagate_per_layer"], red["alpha"], red["graph"], red["sparsity"]) == \
        ("gtp", [4] * 6, 0.1, "mixed", 0.8)


@pytest.mark.slow
def test_the_pytorch_runner_rebuilds_theta_from_the_sidecar(digits_export):
    import numpy as np

    from edgetok.onnx.validate import ort_session
    from edgetok.runtime.runners import TorchRunner

    runner = TorchRunner(digits_export["path"], "cpu", 2, False)
    assert runner.module.blocks[0]._edgetok_state.method.sparsity == 0.8
    pixels = np.random.default_rng(1).standard_normal((2, *digits_export["input_shape"][1:])).astype(np.float32)
    with torch.no_grad():
        want = runner.module(torch.from_numpy(pixels)).numpy()
    assert np.abs(ort_session(digits_export["path"]).run(None, {"pixel_values": pixels})[0] - want).max() <= 1e-4


@pytest.mark.slow
def test_deit_export_builds_with_tensorrt_rtx(capsys, tmp_path):
    assert_deit_export_builds(capsys, tmp_path, method="gtp", propagate="2,2,2,2,2", graph="mixed")


@pytest.mark.parametrize("args,message", [
    (["--propagate", "64"], "--propagate 64 in block 0: it has 64 patch tokens, so at most 63 can be propagated"),
    (["--propagate", "1,1,1,1,1,1,1"], "--propagate 1,1,1,1,1,1,1 has 7 entries but the model has 6 blocks"),
    (["--propagate", "x"], "--propagate 'x' is not a token count"),
    (["--propagate", "4", "--graph", "knn"], "--graph 'knn' is unknown; choose spatial, semantic, mixed"),
    (["--propagate", "4", "--alpha", "-1"], "--alpha -1.0 is out of range"),
    ([], "--method gtp needs --propagate P"),
    (["--propagate", "4", "--r", "2"], "--method gtp takes --propagate P, --alpha, --graph and --sparsity"),
    (["--propagate", "0"], "--propagate 0: P = 0 in block 0 would remove every patch token in GTP-ViT's code"),
    (["--propagate", "4,0,6"], "--propagate 4,0,6: P = 0 in block 1"),
    (["--propagate", "4", "--sparsity", "0"], "--sparsity 0.0 is out of range: give θ in (0, 1]"),
    (["--propagate", "4", "--sparsity", "1.5"], "--sparsity 1.5 is out of range"),
    (["--propagate", "4", "--sparsity", "0.8", "--attention", "biased"], "--sparsity 0.8 thins each block's own"),
    (["--propagate", "4", "--sparsity", "0.8", "--plugins"], "leave out --attention/--plugins"),
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
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "tome", "--r", "2",
                           "--sparsity", "0.5", "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, "--sparsity is a GTP option (its θ); it needs --method gtp")


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
