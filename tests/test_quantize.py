"""`edgetok quantize`: INT8 Q/DQ of the model's own layers only — every reduction node stays float and never
reads a dequantized tensor — within 1 point of fp32 on the held-out digits, built by TensorRT-RTX on the CPU;
the lint knows TensorRT's Q/DQ rules; bad input is one line."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_assertions import assert_one_line_error, run_cli
from onnx import TensorProto, helper

from edgetok.workflows.quantize import ALLOW, QuantizeOptions, allowed, dequantized_readers, quantize

VARIANTS = {"dense": dict(method="none"), "tome": dict(method="tome", r=6), "evit": dict(method="evit", keep_rate=0.7),
            "zerotprune": dict(method="zerotprune", r=6), "tome_plugins": dict(method="tome", r=6, plugins=True)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from edgetok.vit.digits import write_heldout_folder

    root = tmp_path_factory.mktemp("digits")
    return write_heldout_folder(root / "train", split="train")["path"], write_heldout_folder(root / "heldout")["path"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def quantized(request, data, tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    folder = tmp_path_factory.mktemp(request.param)
    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", output=str(folder / "fp32.onnx"),
                                       **VARIANTS[request.param]))
    record = quantize(QuantizeOptions(model=side["path"], calibrate=data[0], samples=128))
    return request.param, side, record


@pytest.mark.slow
def test_only_the_models_own_layers_are_quantized(quantized):
    name, _, record = quantized
    model = onnx.load(record["path"])
    q = record["quantization"]
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    quantized_nodes = {n.name for n in model.graph.node
                       if n.op_type in ("Conv", "MatMul", "Gemm") and any(produced.get(i) == "DequantizeLinear"
                                                                          for i in n.input)}
    assert quantized_nodes and all(any(p.search(n) for p in ALLOW) for n in quantized_nodes)
    assert dequantized_readers(model, set(allowed(onnx.load(q["source_onnx"]["file"])))) == []
    if name not in ("dense", "tome_plugins"):  # the similarity / merge / PageRank MatMuls stay float (with
        # --plugins the merge is one TokenMerge node: no MatMul of its own)
        assert q["float_nodes"] and all("/attn/" not in n and "/mlp/" not in n for n in q["float_nodes"])
    if name == "zerotprune":  # it reads the softmax the attention's second MatMul quantizes: given back in float
        assert q["float_readers_rewired"] > 0
    if name == "tome_plugins":  # the plugin nodes (TokenMerge, SizeBiasedAttention) read float tensors only
        plugin_nodes = [n for n in model.graph.node if n.domain == "edgetok"]
        produced = {o: n.op_type for n in model.graph.node for o in n.output}
        assert plugin_nodes and all(produced.get(i) != "DequantizeLinear" for n in plugin_nodes for i in n.input)
        assert Path(record["path"] + ".cubins.zip").is_file() and record["plugins"]
    zero_points = [i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input[2:3]]
    inits = {t.name: t for t in model.graph.initializer}
    assert all(not onnx.numpy_helper.to_array(inits[z]).any() for z in zero_points)  # symmetric
    assert q["calibration"]["images"] == 128 and q["mode"] == "int8"


@pytest.mark.slow
def test_top1_within_one_point_of_fp32(quantized, data):
    from edgetok.workflows.evaluate import EvalOptions, evaluate

    _, side, record = quantized
    fp32 = evaluate(EvalOptions(model=side["path"], data=data[1], write_sidecar=False))["top1"]
    int8 = evaluate(EvalOptions(model=record["path"], data=data[1], reference=side["path"], write_sidecar=False))
    assert int8["top1"] >= fp32 - 0.01, (fp32, int8["top1"])
    assert int8["reference"]["top1_agreement"] >= 0.97


@pytest.mark.slow
def test_tensorrt_rtx_builds_the_int8_model(quantized, capsys, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    _, _, record = quantized
    code, _, err = run_cli(capsys, "build-engine", record["path"], "--backend", "tensorrt-rtx", "--batch", "1:8:16",
                           "-o", str(tmp_path / "q.engine"))
    assert code == 0, err
    report = json.loads((tmp_path / "q.engine.build.json").read_text())
    assert report["export"]["quantization"]["mode"] == "int8"
    assert report["network_outputs"][0]["shape"] == [-1, 10]


@pytest.mark.slow
def test_fp16_builds_the_float_rest_of_an_int8_model(quantized, capsys, tmp_path):
    """Q/DQ at opset 19 (DequantizeLinear may output float16), so --precision fp16 converts what is not int8."""
    pytest.importorskip("tensorrt_rtx")
    name, _, record = quantized
    assert onnx.load(record["path"]).opset_import[0].version == 19
    if name != "tome":
        pytest.skip("one reduced model is enough for the fp16 build")
    code, _, err = run_cli(capsys, "build-engine", record["path"], "--backend", "tensorrt-rtx", "--precision", "fp16",
                           "-o", str(tmp_path / "q16.engine"))
    assert code == 0, err
    report = json.loads((tmp_path / "q16.engine.build.json").read_text())
    assert report["precision"] == "fp16" and report["fp16_conversion"]["min_cosine"] == 0.99


def _qdq_model(tmp_path, zero_point: int = 0, bias_int32: bool = False):
    """A hand-made Q/DQ graph: x -> Q -> DQ -> MatMul(W) (+ a bias DQ when asked)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zp = helper.make_tensor("z", TensorProto.INT8, [], [zero_point])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x"),
             helper.make_node("MatMul", ["xd", "w"], ["y0"], name="mm")]
    inits = [w, scale, zp]
    if bias_int32:
        inits += [helper.make_tensor("b", TensorProto.INT32, [4], [1, 2, 3, 4]),
                  helper.make_tensor("bs", TensorProto.FLOAT, [], [0.01])]
        nodes += [helper.make_node("DequantizeLinear", ["b", "bs"], ["bd"], name="bias_DequantizeLinear"),
                  helper.make_node("Add", ["y0", "bd"], ["y"], name="add")]
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"], name="id"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_the_lint_knows_tensorrts_qdq_rules(tmp_path):
    from edgetok.onnx.lint import lint

    assert lint(_qdq_model(tmp_path)) == []
    found = lint(_qdq_model(tmp_path, zero_point=3))
    assert [f.node for f in found] == ["q_x", "dq_x"] and "non-zero zero point" in found[0].reason
    found = lint(_qdq_model(tmp_path, bias_int32=True))
    assert [f.node for f in found] == ["bias_DequantizeLinear"] and "int32 DequantizeLinear" in found[0].reason


@pytest.mark.parametrize("bad", ["bias", "zero_point"])
def test_build_engine_refuses_what_the_parser_would(capsys, tmp_path, bad):
    path = tmp_path / f"{bad}.onnx"
    onnx.save(_qdq_model(tmp_path, bias_int32=bad == "bias", zero_point=3 if bad == "zero_point" else 0), str(path))
    code, _, err = run_cli(capsys, "build-engine", str(path), "--backend", "tensorrt-rtx", "-o",
                           str(tmp_path / "x.engine"))
    assert_one_line_error(code, err, "Q/DQ node(s) TensorRT rejects", "bias_DequantizeLinear" if bad == "bias" else "q_x")
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_images", "no_sidecar", "int4", "already"])
def test_bad_input_is_one_line_and_writes_nothing(case, capsys, tmp_path, data, quantized):
    _, side, record = quantized
    model, calibrate, extra = side["path"], data[0], []
    if case == "no_images":
        (tmp_path / "empty" / "cat").mkdir(parents=True)
        calibrate, needle = str(tmp_path / "empty"), "--calibrate"
    elif case == "no_sidecar":
        bare = tmp_path / "bare.onnx"
        bare.write_bytes(open(side["path"], "rb").read())
        model, needle = str(bare), "has no sidecar"
    elif case == "int4":
        extra, needle = ["--mode", "int4"], "--mode 'int4' is not supported; choose int8, fp8"
    else:
        model, needle = record["path"], "is already quantized"
    out = tmp_path / "out" / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", model, "--calibrate", calibrate, *extra, "-o", str(out))
    assert_one_line_error(code, err, needle)
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.fixture(scope="module")
def fp8(data, tmp_path_factory):
    pytest.importorskip("modelopt", reason="FP8 needs NVIDIA Model Optimizer: pip install -e '.[fp8]' (CI installs it)")
    from edgetok.vit.export import ViTExportOptions, export_vit

    folder = tmp_path_factory.mktemp("fp8")
    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", method="tome", r=6, output=str(folder / "t.onnx")))
    return side, quantize(QuantizeOptions(model=side["path"], calibrate=data[0], samples=128, mode="fp8",
                                          targets=["sm89"]))


@pytest.mark.slow
def test_fp8_keeps_the_reduction_in_float_and_its_accuracy(fp8, data):
    from edgetok.onnx.qdq import is_fp8
    from edgetok.workflows.evaluate import EvalOptions, evaluate

    side, record = fp8
    model = onnx.load(record["path"])
    assert is_fp8(model) and record["quantization"]["library"].startswith("nvidia-modelopt")
    assert dequantized_readers(model, set(allowed(onnx.load(side["path"])))) == []
    fp32 = evaluate(EvalOptions(model=side["path"], data=data[1], write_sidecar=False))["top1"]
    got = evaluate(EvalOptions(model=record["path"], data=data[1], reference=side["path"], write_sidecar=False))
    assert got["top1"] >= fp32 - 0.01


@pytest.mark.slow
def test_fp8_builds_for_sm89_and_is_refused_below(fp8, capsys, tmp_path, data):
    pytest.importorskip("tensorrt_rtx")
    side, record = fp8
    build = ["build-engine", record["path"], "--backend", "tensorrt-rtx", "-o", str(tmp_path / "f.engine")]
    code, _, err = run_cli(capsys, *build, "--target", "sm86")
    assert_one_line_error(code, err, "FP8 needs SM 8.9 or newer and sm86 has no FP8")
    code, _, err = run_cli(capsys, *build)  # default targets include Ampere
    assert_one_line_error(code, err, "default targets include SM 8.0 and 8.6", "--target sm89")
    assert not (tmp_path / "f.engine").exists()
    code, _, err = run_cli(capsys, *build, "--target", "sm89")
    assert code == 0, err
    code, _, err = run_cli(capsys, "quantize", side["path"], "--mode", "fp8", "--target", "sm87", "--calibrate",
                           data[0], "-o", str(tmp_path / "o.onnx"))
    assert_one_line_error(code, err, "sm87 (Jetson Orin) has no FP8")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_recipes_quantize_then_build_and_reuse(capsys, tmp_path, monkeypatch):
    """build-engine --recipe digits_tome_int8: export, quantize (calibration folder from the recipe), build from
    the INT8 model; a second run reuses the quantized file; a missing calibration folder is one line."""
    pytest.importorskip("tensorrt_rtx")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "build-engine", "--recipe", "digits_tome_int8", "--backend", "tensorrt-rtx")
    assert_one_line_error(code, err, "--calibrate edgetok-out/digits-train is not a folder")
    assert run_cli(capsys, "data", "digits", "--split", "train")[0] == 0
    code, out, err = run_cli(capsys, "build-engine", "--recipe", "digits_tome_int8", "--backend", "tensorrt-rtx")
    assert code == 0, err
    report = json.loads(next((tmp_path / "edgetok-out").glob("*.engine.build.json")).read_text())
    assert report["source_onnx"]["path"].endswith("digits_vit_tome_r8_int8.onnx")
    assert report["export"]["quantization"]["calibration"]["images"] == 256
    code, out, err = run_cli(capsys, "build-engine", "--recipe", "digits_tome_int8", "--backend", "tensorrt-rtx")
    assert code == 0 and "reusing edgetok-out/digits_vit_tome_r8_int8.onnx" in err


def test_every_int8_recipe_names_its_calibration():
    from edgetok import recipe

    for name in ("digits_int8", "digits_tome_int8", "deit_small_int8", "deit_small_tome_r13_int8"):
        data = recipe.load(name)
        assert data["quantize"]["mode"] == "int8" and data["quantize"]["calibrate"]


@pytest.mark.slow
def test_profile_labels_the_quantized_model(quantized, capsys, tmp_path):
    name, side, record = quantized
    if name != "dense":
        pytest.skip("one model is enough for the label")
    code, _, err = run_cli(capsys, "profile", side["path"], record["path"], "--duration", "0.05", "--iterations", "2",
                           "-o", str(tmp_path / "p"))
    assert code == 0, err
    rows = json.loads((tmp_path / "p" / "profile.json").read_text())["comparison"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
