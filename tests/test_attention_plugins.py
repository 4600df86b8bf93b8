"""SizeBiasedAttention: its reference equals PyTorch SDPA with the equivalent additive mask, its Triton kernels
(interpreter) equal the reference, and `--attention biased` exports equal the dense-attention export in ONNX
Runtime (ToMe's sizes, ATS's padding) and build with TensorRT-RTX."""

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgetok.errors import EdgetokError
from edgetok.onnx.validate import ort_session
from edgetok.plugins import kernels
from edgetok.plugins import spec as plugin_spec
from edgetok.vit.export import ViTExportOptions, export_vit

SPEC = plugin_spec.get("SizeBiasedAttention")
CASES = {label: (inputs, fields) for label, inputs, fields in SPEC.cases(np.random.default_rng(0))}


def _sdpa(q, k, v, size, scale):
    """PyTorch's own attention with log(size) as a float mask, and its explicit weights' class row."""
    with np.errstate(divide="ignore"):
        mask = torch.from_numpy(np.log(size[..., 0]))[:, None, None, :]
    q, k, v = map(torch.from_numpy, (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    weights = ((q @ k.transpose(-1, -2)) * scale + mask).softmax(dim=-1)
    return out.numpy(), weights[:, :, 0].mean(dim=1).numpy()


@pytest.mark.parametrize("label", list(CASES))
def test_reference_equals_sdpa_with_the_additive_mask(label):
    inputs, fields = CASES[label]
    scale = fields["scale"] or inputs[0].shape[3] ** -0.5
    out, row = plugin_spec.run_reference("SizeBiasedAttention", inputs, fields)
    want_out, want_row = _sdpa(*inputs, scale)
    assert out.dtype == np.float32 and np.abs(out - want_out).max() <= 1e-5
    assert np.abs(row - want_row).max() <= 1e-5
    if (inputs[3] == 0).any():  # padding keys get no attention at all
        assert (row[inputs[3][..., 0] == 0] == 0).all()


@pytest.mark.parametrize("label", list(CASES))
def test_kernels_equal_the_reference(label):
    """N not a multiple of the tile, N below it, N = 1, B > 1, head dims 32-128, padding keys."""
    inputs, fields = CASES[label]
    want = plugin_spec.run_reference("SizeBiasedAttention", [x.astype(np.float64) for x in inputs], fields,
                                     any_float=True)
    got, regions = kernels.run_torch(SPEC, [torch.from_numpy(x) for x in inputs], fields, scratch_regions=True)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.abs(g.numpy() - w).max() / max(np.abs(w).max(), 1.0) <= 1e-5
    lse = np.concatenate(SPEC.intermediates(inputs, fields)["lse"])
    assert np.abs(regions["lse"].numpy()[:lse.size] - lse).max() <= 1e-5


def _huge(rng, batch, heads, tokens, dim, magnitude=1e17):
    """Logits near 1e35 (float32 holds them; a running max started at -1e30 made every output NaN): equal
    ones (q = 1e17, k = -1e17: uniform weights) in image 0, random ones (one key per row wins) in the others."""
    q, k = (rng.standard_normal((batch, heads, tokens, dim)) * magnitude for _ in range(2))
    q[0], k[0] = magnitude, -magnitude
    v = rng.standard_normal((batch, heads, tokens, dim))
    size = rng.integers(1, 5, (batch, tokens, 1)).astype(np.float64)
    return [x.astype(np.float32) for x in (q, k, v, size)]


@pytest.mark.parametrize("dim", [32, 80], ids=["d64_kernel", "d128_kernel"])
def test_kernels_are_finite_and_right_at_huge_logits(dim):
    """The −inf-safe online softmax: finite and equal to the reference where logits are ~1e35, also when a
    whole leading key tile is padding (the running max stays −inf through it)."""
    inputs = _huge(np.random.default_rng(dim), 3, 2, 70, dim)
    inputs[3][1, :40] = 0.0  # image 1: its first key tiles are all padding
    fields = {"scale": 0.0}
    want = plugin_spec.run_reference("SizeBiasedAttention", [x.astype(np.float64) for x in inputs], fields,
                                     any_float=True)
    got, regions = kernels.run_torch(SPEC, [torch.from_numpy(x) for x in inputs], fields, scratch_regions=True)
    assert all(np.isfinite(w).all() for w in want)
    for g, w in zip(got, want):
        assert np.isfinite(g.numpy()).all() and np.abs(g.numpy() - w).max() / max(np.abs(w).max(), 1.0) <= 1e-5
    lse = np.concatenate(SPEC.intermediates(inputs, fields)["lse"])
    assert np.isfinite(lse).all() and (np.abs(regions["lse"].numpy()[:lse.size] - lse) <= 1e-6 * np.abs(lse)).all()
    assert np.abs(got[1].numpy()[0] - 1 / 70).max() <= 1e-8  # equal logits (log size is below their rounding)


def test_kernels_give_zeros_for_a_row_with_no_key():
    """An image of padding only (every size 0; a class token rules it out in a model): its rows and class row
    come out 0, where the reference's softmax divides 0 by 0; the other images are unaffected."""
    inputs = [x.copy() for x in CASES["N=70 D=32 B=2 (N not a tile multiple)"][0]]
    inputs[3][1] = 0.0
    out, row = kernels.run_torch(SPEC, [torch.from_numpy(x) for x in inputs], {"scale": 0.0})
    assert (out[1] == 0).all() and (row[1] == 0).all()
    want_out, want_row = plugin_spec.run_reference("SizeBiasedAttention", [x[:1] for x in inputs], {"scale": 0.0})
    assert np.abs(out[:1].numpy() - want_out).max() <= 1e-5 and np.abs(row[:1].numpy() - want_row).max() <= 1e-6


def test_torch_op_is_the_reference():
    from edgetok.vit.attention import size_biased_attention

    inputs, fields = CASES["padding keys, explicit scale"]
    got = size_biased_attention(*map(torch.from_numpy, inputs), fields["scale"])
    want = plugin_spec.run_reference("SizeBiasedAttention", inputs, fields)
    assert all(np.abs(g.numpy() - w).max() <= 1e-5 for g, w in zip(got, want))


def test_spec_and_patching_refuse_bad_input_in_one_line():
    from edgetok.vit.attention import check

    q = np.zeros((1, 2, 5, 200), np.float32)
    with pytest.raises(plugin_spec.PluginError, match=r"head dim 200 is not in 1\.\.128"):
        plugin_spec.run_reference("SizeBiasedAttention", [q, q, q, np.ones((1, 5, 1), np.float32)], {})
    q = np.zeros((1, 2, 5, 8), np.float32)
    with pytest.raises(plugin_spec.PluginError, match=r"size \[1, 4, 1\] must be \[1, 5, 1\]"):
        plugin_spec.run_reference("SizeBiasedAttention", [q, q, q, np.ones((1, 4, 1), np.float32)], {})
    with pytest.raises(plugin_spec.PluginError, match=r"scale=-1\.0 must be a finite number >= 0"):
        plugin_spec.run_reference("SizeBiasedAttention", [q, q, q, np.ones((1, 5, 1), np.float32)], {"scale": -1.0})
    with pytest.raises(EdgetokError, match=r"--attention 'flash' is unknown; choose dense, biased, sparse"):
        check("flash", [])
    with pytest.raises(EdgetokError, match=r"Identity blocks with NoneType attention cannot be patched; use "
                                           r"--attention dense"):
        check("biased", [torch.nn.Identity()])


@pytest.fixture(scope="module")
def digits():
    import tempfile

    from edgetok.vit.digits import write_heldout_folder
    from edgetok.images import image_folder
    from edgetok.vit.loading import load_vit

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_heldout_folder(f"{tmp}/heldout")["path"]
        dataset = image_folder(folder, load_vit("edgetok_digits_vit").preprocessing)
        return np.stack([dataset[i][0].numpy() for i in range(0, 12 * 41, 41)])


@pytest.mark.slow
@pytest.mark.parametrize("method", [dict(method="tome", r=8), dict(method="ats", ats_blocks=[1, 2, 3, 4, 5]),
                                    dict(method="none")], ids=["tome", "ats_padding", "none"])
def test_biased_export_equals_the_dense_attention_export(tmp_path, digits, method):
    dense = export_vit(ViTExportOptions(model="edgetok_digits_vit", output=str(tmp_path / "d.onnx"), **method))
    biased = export_vit(ViTExportOptions(model="edgetok_digits_vit", output=str(tmp_path / "b.onnx"),
                                         attention="biased", **method))
    assert biased["reduction"]["attention"] == "biased" and dense["reduction"]["attention"] == "dense"
    assert {"name": "SizeBiasedAttention", "namespace": "edgetok", "version": "1", "nodes": 6} in biased["plugins"]
    want = ort_session(dense["path"]).run(None, {"pixel_values": digits})[0]
    got = ort_session(biased["path"]).run(None, {"pixel_values": digits})[0]
    assert np.abs(got - want).max() <= 1e-4
    one = np.concatenate([ort_session(biased["path"]).run(None, {"pixel_values": x[None]})[0] for x in digits[:4]])
    assert np.abs(one - want[:4]).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="TensorRT-RTX is installed by tools/setup.sh")
def test_biased_export_builds_with_tensorrt_rtx(capsys, tmp_path):
    from cli_assertions import run_cli

    onnx_path = str(tmp_path / "b.onnx")
    export_vit(ViTExportOptions(model="edgetok_digits_vit", method="tome", r=8, attention="biased", output=onnx_path))
    code, out, err = run_cli(capsys, "build-engine", onnx_path, "--backend", "tensorrt-rtx", "--batch", "1:4:8",
                             "--target", "sm86", "-o", str(tmp_path / "b.engine"))
    assert code == 0, err
    report = json.loads((tmp_path / "b.engine.build.json").read_text())
    assert {"name": "SizeBiasedAttention", "namespace": "edgetok", "version": "1", "nodes": 6} in \
        report["edgetok_plugins"]["plugins"]
    assert report["network_outputs"][0]["shape"] == [-1, 10]
