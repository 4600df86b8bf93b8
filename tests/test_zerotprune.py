"""Zero-TPrune: the patched model equals a loop-by-loop reading of the paper (tests/reference_impl.py) for every
prefix layout, stage split and head filter; ties go by position; --keep-rate plans r per block; zero reduction is
the model; ONNX Runtime parity on real digits; a TensorRT-RTX build; bad options in one line."""

import copy
import math

import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from method_checks import assert_deit_export_builds, assert_export_matches_pytorch, assert_zero_reduction_is_the_model
from reference_impl import reference_forward
from test_reference import ATOL, CONFIGS, MIN_GAP, build

from edgetok.vit.loading import from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit
from edgetok.vit.methods.zerotprune_torch import ZeroTPrune, iterations


def _compare(config, **kw):
    model = build(config)
    ref_model = copy.deepcopy(model)
    vit = from_timm(model, config)
    plan = reduce_vit(vit, make_method("zerotprune", vit.depth, **kw))
    images = torch.randn(3, 3, vit.img_size, vit.img_size, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    with torch.no_grad():
        out = vit.module(images)
    p = plan.params
    assert p["page_rank_iterations"] == [iterations(layer, vit.depth) for layer in range(vit.depth)]
    ref, counts, stats = reference_forward(ref_model, images, "zerotprune", r_per_layer=p["r_per_layer"], zerotprune={
        "steps": p["page_rank_iterations"], "bounds": p["head_variance"], "share": p["similarity_share"]})
    assert stats.get("min_gap", math.inf) > MIN_GAP, f"near-tie in the reference's choices: {stats}"
    assert counts == [after for _, after in plan.tokens]
    assert (out - ref).abs().max().item() < ATOL
    return p


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_the_loop_reference(config):
    """r=3: one token by similarity, two by importance, in every block; the paper's head filter."""
    p = _compare(config, r=3)
    assert set(p["similarity_pruned_per_layer"]) == {1} and p["head_variance"] == [0.01, 0.7]


@pytest.mark.parametrize("share,bounds", [(0.0, "0,inf"), (1.0, "0.5,4"), (0.5, "0,inf")])
def test_stage_split_and_head_filter_match_the_loop_reference(share, bounds):
    p = _compare("vit37", r=4, similarity_share=share, head_variance=bounds)
    assert p["similarity_pruned_per_layer"] == [int(4 * share)] * 4


def test_the_head_filter_changes_the_choice():
    """The filter is live: on this model keeping every head prunes other tokens than the paper's bounds."""
    model = build("vit37")
    outs = []
    for bounds in ("0.01,0.7", "0,inf"):
        vit = from_timm(copy.deepcopy(model), "vit37")
        reduce_vit(vit, make_method("zerotprune", vit.depth, r=4, head_variance=bounds))
        with torch.no_grad():
            outs.append(vit.module(torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1),
                                               dtype=torch.float64)))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_ties_go_by_position(monkeypatch):
    """Every importance equal and every similarity 1 (scores replaced by constants, keys one direction): A is the
    last half by position, the S stage discards A's first tokens, the I stage drops the last survivors; the
    prefix token stays."""
    import edgetok.vit.methods.zerotprune_torch as zerotprune

    monkeypatch.setattr(zerotprune, "page_rank", lambda attn, steps, class_token, alive=None: torch.ones(attn.shape[:3]))
    heads, n, prefix, r = 2, 11, 1, 4
    q = torch.randn(1, heads, n, 8, generator=torch.Generator().manual_seed(0))
    k = torch.zeros(1, heads, n, 8)
    k[..., 0] = 1.0
    step, _ = ZeroTPrune([r] * 4, None, 4).transform(r, q, k, 0.3, prefix, True, layer=0)
    # 10 patches (1..10): A = 6..10 (the last 5), S discards 6 and 7; I drops the last two survivors, 9 and 10.
    assert step.keep[0].tolist() == [0, 1, 2, 3, 4, 5, 8]


def test_keep_rate_plans_r_from_the_tokens_left():
    """floor(T - T*0.75) of the T patch tokens in each block: 16 -> 4, 12 -> 3, 9 -> 2, 7 -> 1."""
    assert _compare("vit17", keep_rate=0.75)["r_per_layer"] == [4, 3, 2, 1]


def test_constant_r_is_clamped_in_late_blocks():
    """A constant r=6 on 16 patches: 16 -> 10 -> 4; block 2 may prune 3 (one patch stays), block 3 none."""
    model = build("vit17")
    vit = from_timm(model, "vit17")
    assert reduce_vit(vit, make_method("zerotprune", vit.depth, r=6)).amounts == [6, 6, 3, 0]


def test_zero_reduction_is_the_model_exactly():
    assert_zero_reduction_is_the_model("zerotprune", r=0)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    return export_vit(ViTExportOptions(model="edgetok_digits_vit", method="zerotprune", r=6,
                                       output=str(tmp_path_factory.mktemp("z") / "z.onnx")))


@pytest.mark.slow
def test_export_equals_pytorch_on_real_digits(digits_export, tmp_path):
    assert_export_matches_pytorch(digits_export, tmp_path / "h", "zerotprune", r=6)
    red = digits_export["reduction"]
    assert (red["method"], red["r_per_layer"], red["similarity_pruned_per_layer"]) == ("zerotprune", [6] * 6, [3] * 6)
    assert red["page_rank_iterations"] == [30, 30, 30, 1, 1, 1]


@pytest.mark.slow
def test_deit_export_builds_with_tensorrt_rtx(capsys, tmp_path):
    assert_deit_export_builds(capsys, tmp_path, method="zerotprune", r=3)


@pytest.mark.parametrize("args,message", [
    (["--r", "64"], "r=64 is too large for block 0: it has 64 patch tokens, so r can be at most 63"),
    (["--keep-rate", "0"], "--keep-rate 0.0 is out of range"),
    ([], "--method zerotprune takes --r N (tokens pruned per block) or --keep-rate F, one of them"),
    (["--r-schedule", "1,2,3,4,5,6,7"], "7 entries"),
    (["--r", "4", "--similarity-share", "1.5"], "--similarity-share 1.5 is out of range"),
    (["--r", "40", "--similarity-share", "1"], "the S stage can discard at most 32 of its 64 patch tokens"),
    (["--r", "4", "--head-variance", "0.7,0.01"], "--head-variance 0.7,0.01: need 0 <= LOW <= HIGH"),
    (["--r", "4", "--head-variance", "x"], "--head-variance 'x' is not two numbers LOW,HIGH"),
    (["--r", "4", "--keep-layers", "2"], "--keep-layers is an EViT option"),
    (["--r", "4", "--propagate", "2"], "--propagate/--alpha/--graph are GTP options"),
])
def test_bad_options_are_one_line_and_write_nothing(capsys, tmp_path, args, message):
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "zerotprune", *args,
                           "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, message)
    assert not list(tmp_path.iterdir())


def test_its_options_need_zerotprune(capsys, tmp_path):
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "tome", "--r", "2",
                           "--head-variance", "0,1", "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, "--head-variance/--similarity-share are Zero-TPrune options")


def test_deit_small_recipes_sit_at_tomes_gmacs():
    from edgetok import recipe
    from edgetok.vit.export import ViTExportOptions
    from edgetok.vit.flops import vit_macs
    from edgetok.vit.loading import load_vit
    from edgetok.vit.reduction import plan

    vit = load_vit("deit_small_patch16_224")
    for name, want in (("deit_small_zerotprune_r11", 2.986), ("deit_small_zerotprune_r16", 2.284)):
        values = recipe.section(recipe.load(name, lambda s: None), "export", ViTExportOptions.fields(), name)
        assert values["method"] == "zerotprune"
        gmacs = [vit_macs(vit, plan(vit, make_method(m, vit.depth, r=values["r"])).tokens) / 1e9
                 for m in ("zerotprune", "tome")]
        assert round(gmacs[0], 3) == want and abs(gmacs[0] - gmacs[1]) / gmacs[1] < 0.005  # ToMe clamps its last r


@pytest.mark.slow
def test_the_pytorch_runner_rebuilds_it_from_the_sidecar(tmp_path):
    """profile --backend torch re-creates the method from the export's sidecar, its own options included."""
    import numpy as np

    from edgetok.onnx.validate import ort_session
    from edgetok.runtime.runners import TorchRunner
    from edgetok.vit.export import ViTExportOptions, export_vit

    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", method="zerotprune", r=5, head_variance="0,inf",
                                       similarity_share=1.0, output=str(tmp_path / "z.onnx")))
    runner = TorchRunner(side["path"], "cpu", 2, False)
    method = runner.module.blocks[0]._edgetok_state.method
    assert (method.head_variance, method.share) == ((0.0, float("inf")), 1.0)
    pixels = np.random.default_rng(1).standard_normal((2, *side["input_shape"][1:])).astype(np.float32)
    with torch.no_grad():
        want = runner.module(torch.from_numpy(pixels)).numpy()
    assert np.abs(ort_session(side["path"]).run(None, {"pixel_values": pixels})[0] - want).max() <= 1e-4


def test_the_blocks_own_probabilities_equal_a_second_computation(monkeypatch):
    """Where the block exposes its softmax (timm, unfused in the pruning blocks only) the method uses it; where it
    cannot (Hugging Face layers, plugin attention) the method computes it again: both give the same model."""
    import edgetok.vit.methods.zerotprune_torch as zerotprune

    model = build("distilled")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = []
    for exposed in (True, False):
        monkeypatch.setattr(zerotprune.ZeroTPrune, "attention_probs", exposed)
        vit = from_timm(copy.deepcopy(model), "distilled")
        reduce_vit(vit, make_method("zerotprune", vit.depth, r_schedule="3,0,2,2"))
        assert [b.attn.fused_attn for b in vit.blocks] == ([False, True, False, False] if exposed else [True] * 4)
        with torch.no_grad():
            outs.append(vit.module(images))
    assert (outs[0] - outs[1]).abs().max() < 1e-9


def test_hugging_face_vit_layers_prune_too():
    from transformers import ViTConfig, ViTModel

    from edgetok.vit.loading import from_hf

    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=128)
    torch.manual_seed(0)
    vit = from_hf(ViTModel(config, add_pooling_layer=False).eval(), "hf-vit")
    plan = reduce_vit(vit, make_method("zerotprune", vit.depth, r=10))
    with torch.no_grad():
        hidden = vit.module(torch.randn(2, 3, 32, 32))
    assert [t[1] for t in plan.tokens] == [55, 45, 35] and hidden.shape == (2, 35, 64)
