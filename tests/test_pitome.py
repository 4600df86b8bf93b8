"""PiToMe: the patched model equals a loop-by-loop reading of the authors' released code (tests/reference_impl.py)
in both configurations: ``reference`` (their current DeiT patch: pitome_bsm in the first ceil(L/2) blocks, margins
0.75 - 0.75*l/L, no proportional attention; the default) and ``protected`` (edgetok's first configuration), prefix
tokens of every kind protected; --keep-rate plans r per block; zero reduction is the model; ONNX Runtime parity on
real digits; a TensorRT-RTX build; bad options in one line."""

import copy
import math

import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from method_checks import assert_deit_export_builds, assert_export_matches_pytorch, assert_zero_reduction_is_the_model
from reference_impl import pitome_forward
from test_reference import ATOL, CONFIGS, MIN_GAP, build

from edgetok.vit.loading import from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit


def _compare(config, variant=None, **kw):
    model = build(config)
    ref_model = copy.deepcopy(model)
    vit = from_timm(model, config)
    plan = reduce_vit(vit, make_method("pitome", vit.depth, pitome_variant=variant, **kw))
    images = torch.randn(3, 3, vit.img_size, vit.img_size, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        out = vit.module(images)
    r_list = plan.params["r_per_layer"]
    ref, counts, stats = pitome_forward(ref_model, images, r_list, variant or "reference")
    assert stats.get("min_gap", math.inf) > MIN_GAP, f"near-tie in the reference's choices: {stats}"
    assert counts == [after for _, after in plan.tokens]
    assert (out - ref).abs().max().item() < ATOL
    return r_list


@pytest.mark.parametrize("config", list(CONFIGS))
def test_default_matches_the_authors_deit_patch(config):
    """pitome_bsm in blocks 0..ceil(L/2)-1 and pitome after, both with merges (r=2 in every block)."""
    assert sum(_compare(config, r=2)) > 0


@pytest.mark.parametrize("config", ["vit17", "distilled", "registers_no_cls"])
def test_protected_variant_matches_its_loop_reading(config):
    assert sum(_compare(config, "protected", r=2)) > 0


def test_bsm_blocks_can_merge_every_a_token():
    """pitome_bsm pairs all T tokens, so an odd T merges up to ceil(T/2) (the A set); pitome at most floor(T/2)."""
    method = make_method("pitome", 4, r_schedule="9,4")
    assert method.plan_layer(0, 18, 1) == (9, 9)  # 17 candidates: A holds 9
    with pytest.raises(Exception, match="r can be at most 8"):
        make_method("pitome", 4, r_schedule="0,0,9").plan_layer(2, 18, 1)  # a pitome block


def test_keep_rate_plans_r_from_the_tokens_left():
    """floor(T - T*0.75) of the T non-prefix tokens in each block: 16 -> 4, 12 -> 3, 9 -> 2, 7 -> 1."""
    assert _compare("vit17", keep_rate=0.75) == [4, 3, 2, 1]


def test_zero_reduction_is_the_model_exactly():
    assert_zero_reduction_is_the_model("pitome", r=0)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    return export_vit(ViTExportOptions(model="edgetok_digits_vit", method="pitome", r=6,
                                       output=str(tmp_path_factory.mktemp("p") / "p.onnx")))


@pytest.mark.slow
def test_export_equals_pytorch_on_real_digits(digits_export, tmp_path):
    assert_export_matches_pytorch(digits_export, tmp_path / "h", "pitome", r=6)
    red = digits_export["reduction"]
    assert red["method"] == "pitome" and red["r_per_layer"] == [6] * 6 and len(red["margins"]) == 6
    assert (red["variant"], red["bsm_blocks"], red["proportional_attention"]) == ("reference", 3, False)
    assert digits_export["request"]["pitome_variant"] == "reference"


@pytest.mark.slow
def test_the_pytorch_runner_rebuilds_the_variant_from_the_sidecar(digits_export, tmp_path):
    """profile --backend torch re-creates the recorded variant; a sidecar from before the option (no variant) was
    exported as ``protected``."""
    import json
    import shutil

    from edgetok import sidecar
    from edgetok.runtime.runners import TorchRunner

    assert TorchRunner(digits_export["path"], "cpu", 2, False).module.blocks[0]._edgetok_state.method.variant == \
        "reference"
    old = tmp_path / "old.onnx"
    shutil.copy(digits_export["path"], old)
    side = json.loads(sidecar.sidecar_path(digits_export["path"]).read_text())
    del side["reduction"]["variant"]
    sidecar.sidecar_path(old).write_text(json.dumps(side))
    assert TorchRunner(str(old), "cpu", 2, False).module.blocks[0]._edgetok_state.method.variant == "protected"


def test_the_variant_travels_through_a_recipe(tmp_path):
    """A recipe's export.pitome_variant reaches the method (and its sidecar params)."""
    from edgetok import recipe
    from edgetok.vit.export import ViTExportOptions

    path = tmp_path / "p.yaml"
    path.write_text("export:\n  model: edgetok_digits_vit\n  method: pitome\n  r: 2\n  pitome_variant: protected\n")
    values = recipe.section(recipe.load(str(path), lambda s: None), "export", ViTExportOptions.fields(), str(path))
    opts = ViTExportOptions(**values)
    method = make_method(opts.method, 6, r=opts.r, pitome_variant=opts.pitome_variant)
    assert method.params([2] * 6)["variant"] == "protected" and method.proportional_attention


@pytest.mark.slow
def test_deit_export_builds_with_tensorrt_rtx(capsys, tmp_path):
    assert_deit_export_builds(capsys, tmp_path, method="pitome", r=3)


@pytest.mark.parametrize("args,message", [
    (["--r", "40"], "r=40 is too large for block 0: it has 64 mergeable tokens, so r can be at most 32"),
    (["--keep-rate", "1.5"], "--keep-rate 1.5 is out of range"),
    ([], "--method pitome takes --r N (tokens merged per block) or --keep-rate F, one of them"),
    (["--r", "4", "--keep-rate", "0.9"], "--method pitome takes --r N (tokens merged per block) or --keep-rate F"),
    (["--r-schedule", "1,2,3,4,5,6,7"], "7 entries"),
    (["--r", "4", "--keep-layers", "2"], "--keep-layers is an EViT option"),
    (["--r", "4", "--ats-blocks", "2"], "--ats-blocks/--ats-budget are ATS options"),
    (["--r", "4", "--pitome-variant", "early"], "--pitome-variant"),
])
def test_bad_options_are_one_line_and_write_nothing(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "pitome", *args,
                           "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, message)
    assert not list(tmp_path.iterdir())


def test_the_variant_needs_pitome(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "tome", "--r", "2",
                           "--pitome-variant", "protected", "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, "--pitome-variant is a PiToMe option; it needs --method pitome")


def test_constant_r_is_clamped_in_late_blocks_as_tomes():
    """r=4 on 17 tokens: the last block has only 4 mergeable tokens, so r is clamped to 2 there."""
    assert _compare("vit17", r=4) == [4, 4, 4, 2]


def test_deit_small_recipes_sit_at_tomes_gmacs():
    """The two DeiT-S recipes: about 3.0 and 2.3 GMACs, each equal to ToMe at the same r."""
    from edgetok import recipe
    from edgetok.vit.export import ViTExportOptions
    from edgetok.vit.flops import vit_macs
    from edgetok.vit.loading import load_vit
    from edgetok.vit.reduction import plan

    vit = load_vit("deit_small_patch16_224")
    for name, want in (("deit_small_pitome_r11", 2.986), ("deit_small_pitome_r16", 2.291)):
        values = recipe.section(recipe.load(name, lambda s: None), "export", ViTExportOptions.fields(), name)
        assert values["method"] == "pitome"
        gmacs = [vit_macs(vit, plan(vit, make_method(m, vit.depth, r=values["r"])).tokens) / 1e9 for m in ("pitome", "tome")]
        assert round(gmacs[0], 3) == round(gmacs[1], 3) == want
