"""A recipe reuses an ONNX or engine at its output path only when the artifact's own record says it is
what the recipe asks for (model, weights, reduction; build options and source ONNX); otherwise it
is remade, and the user is told why."""

import json
import os
from pathlib import Path

import pytest
from cli_assertions import run_cli

from edgetok.vit.export import ViTExportOptions, export_vit

RECIPE = ("export:\n  model: deit_tiny_patch16_224\n  method: tome\n  img_size: 64\n  output: m/t.onnx\n"
          "profile:\n  sweep:\n    r: [0, 4]\n")
BUILD = ("export:\n  model: deit_tiny_patch16_224\n  method: tome\n  r: {r}\n  img_size: 64\n  output: m/t.onnx\n"
         "build:\n  backend: tensorrt-rtx\n  precision: {precision}\n  batch: '1:1:2'\n  targets: sm89\n")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _profile(capsys):
    code, out, err = run_cli(capsys, "profile", "--recipe", "s.yaml", "--warmup", "5", "--duration", "0.05",
                             "--iterations", "2")
    assert code == 0, err
    return err, json.loads(Path("edgetok-out/profile/profile.json").read_text())


@pytest.mark.slow
def test_profile_recipe_re_exports_a_dense_model_left_at_its_path(capsys):
    Path("s.yaml").write_text(RECIPE)
    export_vit(ViTExportOptions(model="deit_tiny_patch16_224", img_size=64, output="m/t_r4.onnx"))  # dense
    err, report = _profile(capsys)
    assert "re-exporting m/t_r4.onnx" in err and "method was 'none', now 'tome'" in err
    side = json.loads(Path("m/t_r4.edgetok.json").read_text())
    assert side["reduction"]["method"] == "tome" and side["request"]["r"] == 4
    assert report["comparison"][1]["name"] == "r=4" and report["comparison"][1]["flops_bound"] > 1.2

    # Now both match: reused, not rewritten.
    stamps = {p: os.stat(p).st_mtime_ns for p in ("m/t_r0.onnx", "m/t_r4.onnx")}
    err, _ = _profile(capsys)
    assert err.count("reusing m/t_r") == 2
    assert stamps == {p: os.stat(p).st_mtime_ns for p in stamps}

    # An ONNX swapped in under a matching sidecar is caught by its hash.
    Path("m/t_r4.onnx").write_bytes(Path("m/t_r0.onnx").read_bytes())
    err, _ = _profile(capsys)
    assert "re-exporting m/t_r4.onnx" in err and "the ONNX changed after its export" in err


@pytest.mark.slow
def test_other_weights_are_a_different_export(capsys):
    """Same name, other checkpoint contents: the recorded weights hash differs, so it is re-exported."""
    import timm
    import torch

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64)
    torch.save(model.state_dict(), "w.pth")
    Path("s.yaml").write_text(RECIPE.replace("  output:", "  checkpoint: w.pth\n  output:"))
    _profile(capsys)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    torch.save(model.state_dict(), "w.pth")
    err, _ = _profile(capsys)
    assert err.count("re-exporting") == 2 and "weights_sha256" in err


def _build(capsys, r=4, precision="fp16"):
    Path("r.yaml").write_text(BUILD.format(r=r, precision=precision))
    code, out, err = run_cli(capsys, "build-engine", "--recipe", "r.yaml")
    assert code == 0, err
    return out, err


@pytest.mark.slow
def test_build_recipe_rebuilds_only_a_differently_built_engine(capsys):
    engine = Path("m/t.tensorrt-rtx.fp16.engine")
    _build(capsys)
    stamp = os.stat(engine).st_mtime_ns
    out, err = _build(capsys)
    assert "reusing m/t.tensorrt-rtx.fp16.engine" in err and out.startswith("reused m/t.tensorrt-rtx.fp16.engine")
    assert os.stat(engine).st_mtime_ns == stamp

    # A build with other options left at the recipe's path is replaced, and the user is told why.
    code, _, err = run_cli(capsys, "build-engine", "m/t.onnx", "--backend", "tensorrt-rtx", "--precision", "fp16",
                           "--batch", "1:2:4", "--target", "sm89", "-o", str(engine))
    assert code == 0, err
    out, err = _build(capsys)
    assert "rebuilding m/t.tensorrt-rtx.fp16.engine: profiles was" in err and out.startswith("wrote")
    assert json.loads(Path(f"{engine}.build.json").read_text())["profiles"][0][0]["max"][0] == 2

    # Another reduction: the ONNX is re-exported, then the engine is rebuilt from it.
    out, err = _build(capsys, r=2)
    assert "re-exporting m/t.onnx" in err and "r was 4, now 2" in err
    assert "rebuilding m/t.tensorrt-rtx.fp16.engine: it was built from another t.onnx" in err
    report = json.loads(Path(f"{engine}.build.json").read_text())
    assert report["export"]["reduction"]["r_per_layer"][0] == 2
