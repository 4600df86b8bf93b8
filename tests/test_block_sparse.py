"""BlockSparseAttention: with mass = 1 it is dense (size-biased) attention; below 1 its reference equals a
loop-by-loop reading of the selection rule; its Triton kernels (interpreter) equal the reference, selections
exactly; a padded batch equals its images alone; bad fields are one line."""

import numpy as np
import pytest
import torch
from reference_block_sparse import block_sparse

from edgetok.plugins import kernels
from edgetok.plugins import spec as plugin_spec

SPEC = plugin_spec.get("BlockSparseAttention")
CASES = {label: (inputs, fields) for label, inputs, fields in SPEC.cases(np.random.default_rng(0))}
FIELDS = {"scale": 0.0, "block": 16, "mass": 0.9, "keep": 0.0, "prefix": 1}


def _inputs(rng, batch=2, heads=2, tokens=70, dim=16, sharp=2.0):
    q, k, v = (rng.standard_normal((batch, heads, tokens, dim)) for _ in range(3))
    return [q * sharp, k, v, rng.integers(1, 4, (batch, tokens, 1)).astype(np.float64)]


def _run(inputs, fields):
    return plugin_spec.run_reference("BlockSparseAttention", inputs, fields, any_float=True)


@pytest.mark.parametrize("tokens,block", [(70, 16), (197, 64), (10, 16)])
def test_mass_one_is_dense_attention(tokens, block):
    inputs = _inputs(np.random.default_rng(tokens), tokens=tokens)
    inputs[3][0, -5:] = 0.0  # padding keys too
    out, kept = _run(inputs, {**FIELDS, "block": block, "mass": 1.0})
    dense, _ = plugin_spec.run_reference("SizeBiasedAttention", inputs, {"scale": 0.0}, any_float=True)
    assert np.abs(out - dense).max() <= 1e-12 and (kept == 1.0).all()


@pytest.mark.parametrize("fields", [dict(mass=0.9), dict(mass=0.5, prefix=0), dict(keep=0.4), dict(mass=0.7, block=32)],
                         ids=["mass0.9", "mass0.5_noprefix", "keep0.4", "block32"])
def test_reference_equals_the_loop_reading(fields):
    rng = np.random.default_rng(7)
    inputs = _inputs(rng, tokens=75)
    inputs[3][1, 50:] = 0.0  # image 1 ends in padding: a whole padding block and a partial one
    fields = {**FIELDS, **fields}
    out, kept = _run(inputs, fields)
    scale = inputs[0].shape[3] ** -0.5
    want_out, want_kept = block_sparse(*(x.tolist() for x in inputs[:3]), inputs[3][..., 0].tolist(), scale,
                                       fields["block"], fields["mass"], fields["keep"], fields["prefix"])
    real = inputs[3][..., 0] > 0
    assert np.abs((out - np.array(want_out)) * real[:, None, :, None]).max() <= 1e-9  # padding rows: any value
    assert np.abs(kept - np.array(want_kept)).max() <= 1e-12
    assert 0 < kept.min() < 1, "the selection should drop some blocks here"


@pytest.mark.parametrize("label", list(CASES))
def test_kernels_equal_the_reference(label):
    """N not a multiple of the block, N below one block, B > 1, padding blocks, tied key blocks, mass = 1."""
    inputs, fields = CASES[label]
    want = _run([x.astype(np.float64) for x in inputs], fields)
    got, regions = kernels.run_torch(SPEC, [torch.from_numpy(x) for x in inputs], fields, scratch_regions=True)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.abs(g.numpy() - w).max() / max(np.abs(w).max(), 1.0) <= 1e-5
    selected = np.concatenate(SPEC.intermediates(inputs, fields)["selected"])
    assert (regions["selected"].numpy()[:selected.size] == selected).all()


@pytest.mark.parametrize("dim,block", [(32, 16), (80, 32)], ids=["d64_kernel", "d128_kernel"])
def test_kernels_are_finite_and_right_at_huge_logits(dim, block):
    """Logits near 1e35, which a running max started at -1e30 turned into NaN: equal ones (q = 1e17,
    k = -1e17) in image 0, random ones in image 1 (its first blocks padding), and an image of padding only
    (no key to attend: its rows and its kept fraction come out 0, where the reference divides 0 by 0)."""
    rng = np.random.default_rng(dim)
    q, k = (rng.standard_normal((3, 2, 96, dim)) * 1e17 for _ in range(2))
    q[0], k[0] = 1e17, -1e17  # whole blocks only: their means are exact, so the block scores are exactly equal
    size = rng.integers(1, 4, (3, 96, 1)).astype(np.float64)
    size[1, :40], size[2] = 0.0, 0.0
    inputs = [x.astype(np.float32) for x in (q, k, rng.standard_normal(q.shape), size)]
    fields = {**FIELDS, "block": block, "mass": 0.6}  # not 0.5: equal scores would put a block on the boundary
    want = _run([x[:2].astype(np.float64) for x in inputs], fields)
    got = [g.numpy() for g in kernels.run_torch(SPEC, [torch.from_numpy(x) for x in inputs], fields)]
    assert all(np.isfinite(w).all() for w in want) and all(np.isfinite(g).all() for g in got)
    for g, w in zip(got, want):
        assert np.abs(g[:2] - w).max() / max(np.abs(w).max(), 1.0) <= 1e-5
    assert (got[0][2] == 0).all() and got[1][2] == 0


def test_a_padded_batch_equals_its_images_alone():
    rng = np.random.default_rng(3)
    lengths = [70, 41, 18]
    alone = [_inputs(rng, batch=1, tokens=n) for n in lengths]
    padded = [np.zeros((3, 2, 70, 16)) for _ in range(3)] + [np.zeros((3, 70, 1))]
    for b, (image, n) in enumerate(zip(alone, lengths)):
        for x, into in zip(image, padded):
            into[b, ..., :n, :] = x[0] if x.ndim == 4 else x[0]
    fields = {**FIELDS, "mass": 0.8}
    out, kept = _run(padded, fields)
    got, got_kept = kernels.run_torch(SPEC, [torch.from_numpy(x.astype(np.float32)) for x in padded], fields)
    for b, (image, n) in enumerate(zip(alone, lengths)):
        one, one_kept = _run(image, fields)
        assert np.abs(out[b, :, :n] - one[0]).max() <= 1e-12 and kept[b] == one_kept[0]
        assert np.abs(got[b, :, :n].numpy() - one[0]).max() <= 1e-5 and abs(float(got_kept[b]) - one_kept[0]) <= 1e-6


@pytest.mark.parametrize("fields,message", [
    (dict(block=24), "block=24 must be a power of two >= 16"),
    (dict(block=8), "block=8 must be a power of two >= 16"),
    (dict(mass=0.0), "mass=0.0 must be in (0, 1]"),
    (dict(mass=1.5), "mass=1.5 must be in (0, 1]"),
    (dict(keep=2.0), "keep=2.0 must be in (0, 1]"),
    (dict(block=16, _tokens=4097), "4097 tokens make 257 blocks of 16, more than 128; use a larger block (at least 64)"),
])
def test_bad_fields_are_one_line(fields, message):
    tokens = fields.pop("_tokens", 20)
    q = np.zeros((1, 1, tokens, 8), np.float32)
    with pytest.raises(plugin_spec.PluginError) as err:
        plugin_spec.run_reference("BlockSparseAttention", [q, q, q, np.ones((1, tokens, 1), np.float32)],
                                  {**FIELDS, **fields})
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ --attention sparse
def test_torch_op_is_the_reference():
    from edgetok.vit.attention import block_sparse_attention

    for label in ("padding blocks", "keep 0.3, prefix 0", "tied key blocks"):
        inputs, f = CASES[label]
        out, kept = block_sparse_attention(*map(torch.from_numpy, inputs), f["scale"] or inputs[0].shape[3] ** -0.5,
                                           f["block"], f["mass"], f["keep"], f["prefix"])
        want_out, want_kept = plugin_spec.run_reference("BlockSparseAttention", inputs, f)
        real = inputs[3][..., 0] > 0
        assert np.abs((out.numpy() - want_out) * real[:, None, :, None]).max() <= 1e-5
        assert np.abs(kept.numpy() - want_kept).max() <= 1e-6


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    from edgetok.vit.digits import write_heldout_folder

    return write_heldout_folder(tmp_path_factory.mktemp("digits") / "heldout")["path"]


@pytest.mark.slow
def test_sparse_export_matches_pytorch_and_mass_one_is_the_dense_export(tmp_path, heldout):
    from edgetok.onnx.validate import ort_session
    from edgetok.images import image_folder
    from edgetok.vit.export import ViTExportOptions, export_vit
    from edgetok.vit.loading import load_vit
    from edgetok.vit.reduction import reduce_vit

    vit = load_vit("edgetok_digits_vit")
    x = np.stack([image_folder(heldout, vit.preprocessing)[i][0].numpy() for i in range(0, 539, 60)])
    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", method="tome", r=4, attention="sparse",
                                       attention_block=16, attention_mass=0.8, output=str(tmp_path / "s.onnx")))
    assert side["reduction"]["attention_sparsity"] == {"block": 16, "mass": 0.8, "keep": 0.0}
    assert {"name": "BlockSparseAttention", "namespace": "edgetok", "version": "1", "nodes": 6} in side["plugins"]
    from edgetok.vit.attention import Sparsity
    from edgetok.vit.methods import make_method

    reduce_vit(vit, make_method("tome", 6, r=4), attention="sparse", sparsity=Sparsity(16, 0.8))
    with torch.no_grad():
        want = vit.module(torch.from_numpy(x)).numpy()
    assert np.abs(ort_session(side["path"]).run(None, {"pixel_values": x})[0] - want).max() <= 1e-4
    dense = export_vit(ViTExportOptions(model="edgetok_digits_vit", output=str(tmp_path / "d.onnx")))
    full = export_vit(ViTExportOptions(model="edgetok_digits_vit", attention="sparse", attention_block=16,
                                       attention_mass=1.0, output=str(tmp_path / "f.onnx")))
    got = ort_session(full["path"]).run(None, {"pixel_values": x})[0]
    assert np.abs(got - ort_session(dense["path"]).run(None, {"pixel_values": x})[0]).max() <= 1e-4


@pytest.mark.slow
def test_digits_recipe_keeps_accuracy_with_fewer_block_pairs(capsys, tmp_path, heldout, monkeypatch):
    """Within 1 point of dense top-1 (97.59 %) at the default mass; eval reports the kept pairs and GMACs."""
    import json

    from cli_assertions import run_cli

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "export", "--recipe", "digits_sparse_attention")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "edgetok-out/digits_vit_sparse_attention.onnx", "--data", heldout,
                             "--no-sidecar", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["top1"] >= 0.9759 - 0.01
    kept = [t["mean"] for t in result["attention_kept"].values()]
    assert len(kept) == 6 and max(kept) < 1 and all(t["min"] < t["max"] for t in result["attention_kept"].values())
    assert result["gmacs"]["mean"] < 0.0483  # dense: 0.0483
    code, out, err = run_cli(capsys, "eval", "edgetok-out/digits_vit_sparse_attention.onnx", "--data", heldout,
                             "--no-sidecar")
    assert code == 0, err  # the printed line gives each block's mean and range, as the README says
    for block, t in result["attention_kept"].items():
        assert f"{block}: {t['mean']:.1%} [{t['min']:.1%}-{t['max']:.1%}]" in out


@pytest.mark.slow
def test_sparse_export_builds_with_tensorrt_rtx(capsys, tmp_path):
    import importlib.util
    import json

    from cli_assertions import run_cli

    from edgetok.vit.export import ViTExportOptions, export_vit

    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is installed by tools/setup.sh")
    onnx_path = str(tmp_path / "s.onnx")
    export_vit(ViTExportOptions(model="edgetok_digits_vit", attention="sparse", attention_block=16, output=onnx_path))
    code, out, err = run_cli(capsys, "build-engine", onnx_path, "--backend", "tensorrt-rtx", "--batch", "1:4:8",
                             "--target", "sm86", "-o", str(tmp_path / "s.engine"))
    assert code == 0, err
    report = json.loads((tmp_path / "s.engine.build.json").read_text())
    assert {"name": "BlockSparseAttention", "namespace": "edgetok", "version": "1", "nodes": 6} in \
        report["edgetok_plugins"]["plugins"]
    kept = {str(b): f"edgetok.attention_kept.block{b}" for b in range(6)}
    assert report["attention_kept_outputs"] == kept
    assert [(o["name"], o["shape"]) for o in report["network_outputs"]] == \
        [("logits", [-1, 10])] + [(n, [-1]) for n in kept.values()]


@pytest.mark.parametrize("args,message", [
    (["--attention", "sparse", "--attention-block", "24"], "--attention-block 24 must be a power of two >= 16"),
    (["--attention", "sparse", "--attention-mass", "1.5"], "--attention-mass 1.5 must be in (0, 1]"),
    (["--attention", "sparse", "--attention-keep", "2"], "--attention-keep 2.0 must be in (0, 1]"),
    (["--attention-mass", "0.5"], "--attention-mass is a block-sparse attention option; it needs --attention sparse"),
])
def test_bad_sparse_options_are_one_line_and_write_nothing(capsys, tmp_path, args, message):
    from cli_assertions import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", *args, "-o", str(tmp_path / "x.onnx"))
    assert_one_line_error(code, err, message)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_profile_records_the_attention_pairs_kept(capsys, tmp_path, heldout):
    import json

    from cli_assertions import run_cli

    from edgetok.vit.export import ViTExportOptions, export_vit

    onnx_path = str(tmp_path / "s.onnx")
    export_vit(ViTExportOptions(model="edgetok_digits_vit", attention="sparse", attention_block=16, output=onnx_path))
    code, out, err = run_cli(capsys, "profile", onnx_path, "--inputs", heldout, "--batch", "4", "--duration", "0.05",
                             "--iterations", "2", "--warmup", "0", "-o", str(tmp_path / "prof"))
    assert code == 0, err
    report = json.loads((tmp_path / "prof" / "profile.json").read_text())["models"][0]
    kept = report["attention_kept"]
    assert [k["block"] for k in kept] == list(range(6)) and all(len(k["per_image"]) == 4 for k in kept)
    assert all(0 < f <= 1 for k in kept for f in k["per_image"]) and "tokens_kept" not in report
    assert "attention block pairs kept in block 0:" in out
    flops = report["flops"]  # what these four images cost, from what they kept
    assert flops["reduced_gmacs"] < flops["dense_gmacs"] and flops["reduced_gmacs_from"].startswith("the 4 profiled")
