"""Data-dependent reduction end to end on the reference model: dtome's export (calibrated thresholds, TokenPrune
nodes) equals PyTorch image by image, builds with TensorRT-RTX, and ATS at its defaults and dtome's digits recipe keep
accuracy within 2 points of dense while keeping fewer tokens."""

import json

import numpy as np
import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli

from edgetok.onnx.validate import ort_session
from edgetok.vit.digits import write_heldout_folder
from edgetok.images import image_folder
from edgetok.vit.export import ViTExportOptions, export_vit
from edgetok.vit.loading import load_vit
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return write_heldout_folder(root / "train", "train")["path"], write_heldout_folder(root / "heldout")["path"]


@pytest.fixture(scope="module")
def dtome_export(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("dtome") / "d.onnx"
    return export_vit(ViTExportOptions(model="edgetok_digits_vit", method="dtome", r=8, calibrate=folders[0],
                                       output=str(out)))


@pytest.mark.slow
def test_dtome_export_equals_pytorch_image_by_image(dtome_export, folders):
    red = dtome_export["reduction"]
    assert red["data_dependent"] and len(red["thresholds"]) == 6 and red["calibration"]["samples"] == 1258
    assert dtome_export["plugins"] == [{"name": "TokenPrune", "namespace": "edgetok", "version": "1", "nodes": 6}]
    vit = load_vit("edgetok_digits_vit")
    reduce_vit(vit, make_method("dtome", vit.depth, r_schedule=red["target_r_per_layer"], thresholds=red["thresholds"]))
    dataset = image_folder(folders[1], vit.preprocessing)
    x = np.stack([dataset[i][0].numpy() for i in range(0, 539, 45)])
    session = ort_session(dtome_export["path"])
    kept = []
    for image in x:
        with torch.no_grad():
            want = vit.module(torch.from_numpy(image[None])).numpy()
        kept.append(int(vit.blocks[0]._edgetok_state.size.shape[1]))
        assert np.abs(session.run(None, {"pixel_values": image[None]})[0] - want).max() <= 1e-4
    assert len(set(kept)) > 1, "the kept count should vary across these images"
    with torch.no_grad():  # and the whole lot as one padded batch
        want = vit.module(torch.from_numpy(x)).numpy()
    assert np.abs(session.run(None, {"pixel_values": x})[0] - want).max() <= 1e-4


@pytest.mark.slow
def test_dtome_export_builds_with_tensorrt_rtx(capsys, dtome_export, tmp_path):
    engine = tmp_path / "d.engine"
    code, out, err = run_cli(capsys, "build-engine", dtome_export["path"], "--backend", "tensorrt-rtx", "--batch",
                             "1:4:8", "--target", "sm86", "-o", str(engine))
    assert code == 0, err
    report = json.loads((tmp_path / "d.engine.build.json").read_text())
    assert report["edgetok_plugins"]["plugins"][0]["nodes"] == 6
    assert report["profiles"][0][0]["max"][0] == 8


@pytest.mark.slow
def test_dtome_needs_its_calibration_in_one_line(capsys, tmp_path, folders):
    out = str(tmp_path / "x.onnx")
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "dtome", "--r", "8", "-o", out)
    assert_one_line_error(code, err, "--method dtome needs --calibrate DIR")
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "dtome", "--r", "8",
                           "--calibrate", str(tmp_path / "nowhere"), "-o", out)
    assert_one_line_error(code, err, "nowhere is not a folder")
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "tome", "--r", "8",
                           "--calibrate", folders[0], "-o", out)
    assert_one_line_error(code, err, "--calibrate is a dtome option")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("command", [["export", "vit", "edgetok_digits_vit", "--method", "ats", "-o",
                                      "edgetok-out/ats.onnx"], ["export", "--recipe", "digits_dtome"]],
                         ids=["ats_defaults", "digits_dtome"])
def test_digits_defaults_keep_accuracy_with_fewer_tokens(capsys, tmp_path, folders, command, monkeypatch):
    """The acceptance bar: within 2 points of dense top-1 (97.59 %) on the held-out digits, fewer tokens kept;
    ATS at its defaults, dtome (which needs --r and --calibrate) by its recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edgetok-out").mkdir()
    (tmp_path / "edgetok-out" / "digits-train").symlink_to(folders[0])
    code, out, err = run_cli(capsys, *command)
    assert code == 0, err
    onnx_path = next((tmp_path / "edgetok-out").glob("*.onnx"))
    code, out, err = run_cli(capsys, "eval", str(onnx_path), "--data", folders[1], "--no-sidecar", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["top1"] >= 0.9759 - 0.02
    last = result["tokens_kept"][max(result["tokens_kept"], key=int)]
    assert last["mean"] < 65 and last["min"] < last["max"]


@pytest.mark.slow
@pytest.mark.parametrize("pool", [dict(global_pool="avg"), dict(global_pool="map"),
                                  dict(global_pool="avg", class_token=False)], ids=["avg", "attention", "avg_no_cls"])
def test_pooling_skips_padding(pool, tmp_path):
    """Average and attention pooling of a padded batch equal each image alone, in PyTorch and in ONNX Runtime."""
    import timm

    from edgetok.vit.loading import from_timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=64, depth=3, embed_dim=64, num_heads=4,
                              num_classes=10, **pool).eval()
    vit = from_timm(model, "small")
    reduce_vit(vit, make_method("dtome", vit.depth, r=2, thresholds=[0.5, 0.5, None]))
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batched = vit.module(x)
        counts = (vit.blocks[0]._edgetok_state.size[..., 0] > 0).sum(dim=1)
        alone = torch.cat([vit.module(x[i:i + 1]) for i in range(len(x))])
    assert len(set(counts.tolist())) > 1
    assert (batched - alone).abs().max() <= 1e-5
    from edgetok.onnx.export import export_module

    path = tmp_path / "p.onnx"
    export_module(vit.module, x[:2], path, "pixel_values", ["logits"])
    got = ort_session(str(path)).run(None, {"pixel_values": x.numpy()})[0]
    assert np.abs(got - batched.numpy()).max() <= 1e-4
