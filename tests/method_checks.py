"""Checks every token-reduction method must pass, written once: zero reduction is the model bit for bit, the
digits export equals the patched PyTorch model in ONNX Runtime on real images, a DeiT export builds with
TensorRT-RTX."""

import copy
import json

import numpy as np
import pytest
import torch
from cli_assertions import run_cli
from test_reference import build

from edgetok.vit.loading import from_timm
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit


def assert_zero_reduction_is_the_model(method: str, **options) -> None:
    model = build("registers")
    vit = from_timm(copy.deepcopy(model), "registers")
    reduce_vit(vit, make_method(method, vit.depth, **options))
    x = torch.randn(2, 3, vit.img_size, vit.img_size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(vit.module(x), model(x))


def assert_export_matches_pytorch(export: dict, folder, method: str, **options) -> None:
    from edgetok.onnx.validate import ort_session
    from edgetok.vit.digits import write_heldout_folder
    from edgetok.images import image_folder
    from edgetok.vit.loading import load_vit

    vit = load_vit("edgetok_digits_vit")
    reduce_vit(vit, make_method(method, vit.depth, **options))
    dataset = image_folder(write_heldout_folder(folder)["path"], vit.preprocessing)
    x = np.stack([dataset[i][0].numpy() for i in range(0, 539, 50)])
    with torch.no_grad():
        want = vit.module(torch.from_numpy(x)).numpy()
    assert np.abs(ort_session(export["path"]).run(None, {"pixel_values": x})[0] - want).max() <= 1e-4
    assert export["flops"]["reduced_gmacs"] < export["flops"]["dense_gmacs"]


def assert_deit_export_builds(capsys, tmp_path, **options) -> None:
    pytest.importorskip("tensorrt_rtx")
    from edgetok.vit.export import ViTExportOptions, export_vit

    torch.manual_seed(0)
    side = export_vit(ViTExportOptions(model="deit_tiny_patch16_224", img_size=64, output=str(tmp_path / "m.onnx"),
                                       **options))
    code, out, err = run_cli(capsys, "build-engine", side["path"], "--backend", "tensorrt-rtx", "--batch", "1:4:8",
                             "-o", str(tmp_path / "m.engine"))
    assert code == 0, err
    assert json.loads((tmp_path / "m.engine.build.json").read_text())["network_outputs"][0]["shape"] == [-1, 1000]
