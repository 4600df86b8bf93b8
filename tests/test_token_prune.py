"""TokenPrune: a plugin with a data-dependent output (K kept tokens) and its size tensor, through every
implementation: the numpy reference, the Triton kernels (interpreter), ONNX Runtime, and a real TensorRT-RTX
build whose size tensor is declared with the upper bound N. Running the engine needs a GPU: not tested here."""

import ctypes
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from onnx import TensorProto, helper

from edgetok.plugins import spec as plugin_spec
from edgetok.plugins.kernels import Buffer, interpreting, run_torch
from edgetok.plugins.kernels import token_prune_plan as plan_module
from edgetok.plugins.spec import PluginError
from edgetok.plugins.token_prune import kept_mask

SPEC = plugin_spec.get("TokenPrune")
TOKENS, CHANNELS = 17, 8
DEVICE = "cpu" if interpreting() else "cuda" if torch.cuda.is_available() else None
needs_device = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 before triton is imported, or CUDA")
needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="TensorRT-RTX is installed by tools/setup.sh")
CASES = {label: (inputs, fields) for label, inputs, fields in SPEC.cases(np.random.default_rng(0))}


def _run(inputs, fields):
    """Kernels == reference, bit for bit (a prune only copies), the count as a 0-d int64."""
    want = plugin_spec.run_reference("TokenPrune", inputs, fields)
    got = [t.cpu().numpy() for t in run_torch(SPEC, [torch.from_numpy(a).to(DEVICE) for a in inputs], fields)]
    assert [g.dtype for g in got] == [np.float32, np.float32, np.int64] and got[2].shape == ()
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)
    return got


# ---- the reference --------------------------------------------------------------------------------------


def test_reference_semantics_by_hand():
    x = np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 6, 2) + 1
    size = np.array([[1, 1, 2, 0, 1, 3], [1, 0, 1, 1, 1, 1]], np.float32)[..., None]
    keep = np.array([[0, 1, -0.0, 5, 1e-45, 0], [-0.0, 1, 0, 0, 0, 0]], np.float32)
    out, out_size, count = plugin_spec.run_reference("TokenPrune", [x, size, keep], {"prefix": 1})
    # image 0: 0 (prefix), 1, 4 (a denormal keeps); 3 is padding (size 0); image 1: 0 only (1 has size 0)
    assert count.dtype == np.int64 and count.shape == () and int(count) == 3
    assert np.array_equal(out[0], x[0, [0, 1, 4]]) and np.array_equal(out_size[0, :, 0], [1, 1, 1])
    assert np.array_equal(out[1], np.stack([x[1, 0], np.zeros(2), np.zeros(2)])) and np.array_equal(out_size[1, :, 0], [1, 0, 0])
    # the prefix is kept whatever its size: image 1's token 1 (size 0) comes back with prefix 4
    assert int(plugin_spec.run_reference("TokenPrune", [x, size, keep], {"prefix": 4})[2]) == 5


@pytest.mark.parametrize("fields,shapes,message", [
    ({"prefix": 18}, None, "prefix=18 must be between 0 and the 17 tokens"),
    ({"prefix": -1}, None, "prefix=-1 must be between 0 and the 17 tokens"),
    ({}, [(2, 17, 8), (2, 17, 1), (2, 16)], "keep [2, 16] must be [2, 17, 1] and [2, 17]"),
    ({}, [(2, 17, 8), (1, 17, 1), (2, 17)], "size [1, 17, 1] and keep [2, 17] must be"),
    ({"ratio": 0.5}, None, "unknown field(s) ratio; it takes prefix"),
])
def test_spec_rejects_bad_calls_in_one_line(fields, shapes, message):
    shapes = shapes or [(2, TOKENS, CHANNELS), (2, TOKENS, 1), (2, TOKENS)]
    inputs = [np.ones(s, np.float32) for s in shapes]
    with pytest.raises(PluginError) as err:
        plugin_spec.run_reference("TokenPrune", inputs, fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_wrong_dtype_and_version_are_one_line():
    x, size, keep = np.ones((1, 5, 4), np.float32), np.ones((1, 5, 1), np.float32), np.ones((1, 5), np.float32)
    with pytest.raises(PluginError, match="input keep is bool, but the plugin takes float32"):
        plugin_spec.run_reference("TokenPrune", [x, size, keep.astype(bool)], {})
    with pytest.raises(PluginError, match=r"TokenPrune version '2' is not provided \(edgetok has version '1'\)"):
        plugin_spec.get("TokenPrune", "2")


def test_shape_rule_declares_the_size_tensor():
    shapes = SPEC.output_shapes([[2, TOKENS, CHANNELS], [2, TOKENS, 1], [2, TOKENS]], SPEC.resolve({}))
    dynamic = shapes[0][1]
    assert isinstance(dynamic, plugin_spec.Dynamic) and (dynamic.size_output, dynamic.opt, dynamic.upper) == (2, 17, 17)
    assert shapes[1][1] == dynamic and shapes[2] == [] and SPEC.size_outputs() == [2]
    assert SPEC.outputs[2].dtypes == ("int64",) and SPEC.outputs[2].size_tensor
    shapes = [(2, TOKENS, CHANNELS), (2, TOKENS, 1), (2, TOKENS)]
    assert SPEC.concrete_shapes(shapes, SPEC.resolve({})) == [[2, 17, 8], [2, 17, 1], []]  # the upper bound
    assert SPEC.concrete_shapes(shapes, SPEC.resolve({}), {2: 5}) == [[2, 5, 8], [2, 5, 1], []]


def test_plugins_list_shows_the_size_tensor():
    from edgetok.plugins.inventory import describe

    text = describe()
    assert "edgetok::TokenPrune version 1" in text and "fields   prefix:int=1" in text
    assert "pruned float32 rank 3 (dim 1 = count, data-dependent)" in text and "count int64 rank 0 (size tensor)" in text


# ---- the kernels (Triton interpreter) -------------------------------------------------------------------


@needs_device
@pytest.mark.parametrize("label", list(CASES))
def test_kernels_equal_the_reference(label):
    inputs, fields = CASES[label]
    got = _run(inputs, fields)
    counts = kept_mask(inputs[1], inputs[2], fields["prefix"]).sum(1)
    if label == "all kept":
        assert int(got[2]) == TOKENS
    if label.startswith("only prefix"):
        assert int(got[2]) == 2
    if label == "batch with different counts":
        assert len(set(counts.tolist())) == 4
    for b, n in enumerate(counts):  # padding rows past each image's own count
        assert not got[0][b, n:].any() and not got[1][b, n:].any()


@needs_device
def test_padding_rows_never_come_back():
    inputs, fields = CASES["padding rows in the input"]
    got = _run(inputs, fields)
    size = inputs[1][..., 0]
    assert (got[1][..., 0][got[1][..., 0] != 0] > 0).all() and int(got[2]) < TOKENS
    assert int((size[0] > 0).sum()) == 12 and (got[1][0, 12:] == 0).all()


@needs_device
def test_a_second_prune_of_a_pruned_batch():
    """Chained steps: the padding rows of the first (size 0) stay out of the second, whatever keep says."""
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal((3, 30, 6)).astype(np.float32), rng.integers(1, 4, (3, 30, 1)).astype(np.float32),
              (rng.random((3, 30)) < [[0.2], [0.5], [0.9]]).astype(np.float32)]
    x, size, count = _run(inputs, {"prefix": 1})
    _run([x, size, np.ones(size.shape[:2], np.float32)], {"prefix": 1})


def test_plan_is_plain_data():
    shapes = [(3, 197, 384), (3, 197, 1), (3, 197)]
    kernel_plan = plan_module.plan(shapes, {"prefix": 1})
    assert [x.kernel.name for x in kernel_plan.launches] == ["prune_scan", "prune_count", "prune_gather"]
    assert [x.grid for x in kernel_plan.launches] == [(3, 1, 1), (1, 1, 1), (197, 3, 1)]  # gather: N rows, the bound
    for step in kernel_plan.launches:
        assert len(step.args) == len(step.kernel.params)
        for (name, ty), value in zip(step.kernel.params, step.args):
            assert isinstance(value, Buffer) == ty.startswith("*"), name
            if isinstance(value, Buffer) and value.kind == "output" and value.index == 2:
                assert ty == "*i64"  # the size tensor
    assert [x.kernel.name for x in plan_module.plan([(0, 197, 384), (0, 197, 1), (0, 197)], {"prefix": 1}).launches] == \
        ["prune_count"]


@needs_device
def test_empty_batch_counts_zero():
    got = run_torch(SPEC, [torch.zeros(0, 5, 4), torch.zeros(0, 5, 1), torch.zeros(0, 5)], {"prefix": 1})
    assert [list(t.shape) for t in got] == [[0, 0, 4], [0, 0, 1], []] and int(got[2]) == 0


@pytest.mark.slow
@needs_device
def test_plugins_check_compares_the_count_exactly(monkeypatch):
    from edgetok.plugins import check

    right = plugin_spec._REFERENCES["TokenPrune"]

    def one_more(x, size, keep, prefix):
        out, out_size, count = right(x, size, keep, prefix)
        return np.pad(out, ((0, 0), (0, 1), (0, 0))), np.pad(out_size, ((0, 0), (0, 1), (0, 0))), count + 1

    monkeypatch.setattr(plugin_spec, "_SPECS", {"TokenPrune": SPEC})  # only this plugin: TokenMerge's are slow
    results = check.run_checks("cpu")
    assert all(r.passed for r in results) and {r.kernel for r in results} == {"prune_scan", "prune_count", "prune_gather"}
    assert "TokenPrune: 14/14 cases match" in check.summary(results)
    monkeypatch.setitem(plugin_spec._REFERENCES, "TokenPrune", one_more)
    summary = check.summary(check.run_checks("cpu"))
    assert "0/14 cases match" in summary and "MISMATCH prune_count on B=1: 1 index differs" in summary
    assert "MISMATCH prune_gather on B=1: error inf" in summary and "MISMATCH prune_scan" not in summary


# ---- ONNX Runtime ---------------------------------------------------------------------------------------


def _graph(path: Path, prefix=1, version="1", x_type=TensorProto.FLOAT) -> Path:
    """One TokenPrune node between graph inputs and outputs (all three), dynamic batch."""
    x = helper.make_tensor_value_info("x", x_type, ["batch", TOKENS, CHANNELS])
    size = helper.make_tensor_value_info("size", TensorProto.FLOAT, ["batch", TOKENS, 1])
    keep = helper.make_tensor_value_info("keep", TensorProto.FLOAT, ["batch", TOKENS])
    outs = [helper.make_tensor_value_info("pruned", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("pruned_size", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("count", TensorProto.INT64, None)]
    node = helper.make_node("TokenPrune", ["x", "size", "keep"], ["pruned", "pruned_size", "count"], name="prune0",
                            domain="edgetok", prefix=prefix, plugin_version=version, plugin_namespace="edgetok")
    graph = helper.make_graph([node], "g", [x, size, keep], outs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetok", 1)]),
              str(path))
    return path


def test_onnxruntime_runs_the_node(tmp_path):
    from edgetok.onnx.lint import lint
    from edgetok.onnx.validate import ort_session

    model = _graph(tmp_path / "p.onnx", prefix=2)
    assert lint(onnx.load(str(model))) == []
    assert plugin_spec.uses(onnx.load(str(model))) == [{"name": "TokenPrune", "namespace": "edgetok", "version": "1",
                                                        "nodes": 1}]
    session = ort_session(str(model))
    rng = np.random.default_rng(2)
    for batch, p in ((1, 0.5), (3, [[0.1], [0.5], [0.9]])):
        inputs = [rng.standard_normal((batch, TOKENS, CHANNELS)).astype(np.float32),
                  rng.integers(0, 3, (batch, TOKENS, 1)).astype(np.float32),
                  (rng.random((batch, TOKENS)) < np.asarray(p)).astype(np.float32)]
        got = session.run(None, dict(zip(["x", "size", "keep"], inputs)))
        want = plugin_spec.run_reference("TokenPrune", inputs, {"prefix": 2})
        assert got[2].dtype == np.int64 and got[2].shape == ()
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.array_equal(g, w)


# ---- TensorRT-RTX: a real build on this CPU -------------------------------------------------------------


@pytest.fixture(scope="module")
def rtx_env(tmp_path_factory):
    """This module's own cubin cache (a real AOT compile for sm86) and a bundle to put beside test graphs."""
    from edgetok.plugins import cubins

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETOK_CACHE", str(tmp_path_factory.mktemp("cache")))
        bundle = tmp_path_factory.mktemp("cubins") / "sm86.cubins.zip"
        cubins.write_bundle(bundle, ["sm86"], say=lambda s: None)
        yield bundle


def _build(capsys, model, engine, bundle):
    from edgetok.plugins import cubins

    cubins.bundle_path(model).write_bytes(bundle.read_bytes())
    return run_cli(capsys, "build-engine", str(model), "--backend", "tensorrt-rtx", "--batch", "1:2:4",
                   "--target", "sm86", "-o", str(engine))


@needs_rtx
def test_engine_build_declares_the_size_tensor(capsys, tmp_path, monkeypatch, rtx_env):
    from edgetok.plugins.tensorrt import SIZE_TENSOR_LOG

    log = tmp_path / "size_tensors.jsonl"
    monkeypatch.setenv(SIZE_TENSOR_LOG, str(log))  # the build runs in a worker process: it appends here
    engine = tmp_path / "p.engine"
    code, out, err = _build(capsys, _graph(tmp_path / "p.onnx"), engine, rtx_env)
    assert code == 0, err
    report = json.loads(Path(f"{engine}.build.json").read_text())
    assert report["network_outputs"] == [  # K is data-dependent: -1 in the network, like the dynamic batch
        {"name": "pruned", "shape": [-1, -1, CHANNELS], "dtype": "FLOAT"},
        {"name": "pruned_size", "shape": [-1, -1, 1], "dtype": "FLOAT"},
        {"name": "count", "shape": [], "dtype": "INT64"},
        {"name": "edgetok.tokens_kept.block0", "shape": [-1], "dtype": "FLOAT"},  # what each image kept
    ]
    assert report["edgetok_plugins"]["plugins"] == [{"name": "TokenPrune", "namespace": "edgetok", "version": "1",
                                                     "nodes": 1}]
    declared = [json.loads(line) for line in log.read_text().splitlines()]
    assert declared and all(d == {"node": "prune0", "plugin": "TokenPrune", "output": 2, "name": "count",
                                  "opt": TOKENS, "upper": TOKENS} for d in declared)  # the sound bound: N
    assert "edgetok::TokenPrune v1 x1" in out


@needs_rtx
def test_creator_fields_and_outputs(rtx_env):
    import tensorrt_rtx as trt

    from edgetok.plugins import tensorrt as plugins

    plugins.register(trt, rtx_env)
    creator = plugins.creator(trt, "TokenPrune")
    assert [f.name for f in creator.field_names] == ["prefix"]
    prefix = np.array([3], np.int32)
    plugin = creator.create_plugin("prune0", trt.PluginFieldCollection([
        trt.PluginField("prefix", prefix, trt.PluginFieldType.INT32)]), trt.TensorRTPhase.BUILD)
    assert plugin.fields == {"prefix": 3} and plugin.num_outputs == 3
    assert plugin.get_output_data_types([trt.DataType.FLOAT] * 3) == [trt.DataType.FLOAT, trt.DataType.FLOAT,
                                                                      trt.DataType.INT64]
    again = creator.create_plugin("prune0", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.fields == plugin.fields


def _bad_build(capsys, tmp_path, model, bundle):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _build(capsys, model, tmp_path / "bad.engine", bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + [f"{model.name}.cubins.zip"])  # nothing published
    return code, err


@needs_rtx
def test_prefix_beyond_the_tokens_is_one_line(capsys, tmp_path, rtx_env):
    code, err = _bad_build(capsys, tmp_path, _graph(tmp_path / "p.onnx", prefix=TOKENS + 1), rtx_env)
    assert_one_line_error(code, err, "build failed", "prefix=18 must be between 0 and the 17 tokens")


@needs_rtx
def test_fp16_input_is_one_line(capsys, tmp_path, rtx_env):
    code, err = _bad_build(capsys, tmp_path, _graph(tmp_path / "h.onnx", x_type=TensorProto.FLOAT16), rtx_env)
    assert_one_line_error(code, err, "build failed", "TokenPrune: input x is float16", "takes float32")


@needs_rtx
def test_wrong_version_is_one_line(capsys, tmp_path, rtx_env):
    code, err = _bad_build(capsys, tmp_path, _graph(tmp_path / "v2.onnx", version="2"), rtx_env)
    assert_one_line_error(code, err, "v2.onnx", "edgetok::TokenPrune version '2'", "version '1'", "re-export")


# ---- the launcher, without a GPU ------------------------------------------------------------------------


@needs_rtx
def test_pack_args_follows_the_real_manifest(rtx_env):
    from edgetok.plugins import cubins, launch

    bundle = cubins.Bundle.open(rtx_env)
    kernel_plan = plan_module.plan([(2, TOKENS, CHANNELS), (2, TOKENS, 1), (2, TOKENS)], {"prefix": 1})
    inputs, outputs, workspace = [0x1000, 0x2000, 0x3000], [0x4000, 0x5000, 0x6000], 0x100000
    where = launch.layout(kernel_plan, launch.hidden_sizes_any_arch(bundle))
    assert launch.workspace_size(kernel_plan, bundle) == where.total >= kernel_plan.scratch_bytes
    for step in kernel_plan.launches:
        meta = bundle.kernel(step.kernel.name)
        assert meta["plugin"] == "TokenPrune"
        facts = meta["archs"]["sm86"]
        assert facts["ptx_param_types"] == [{"*": "u64", "i32": "u32"}["*" if t.startswith("*") else t]
                                            for _, t in step.kernel.params] + ["u64"] * 2
        packed = launch.pack_args(meta["params"], launch.launch_values(step, inputs, outputs, workspace, where, facts))
        for param, arg, c in zip(meta["params"], step.args, packed):
            if isinstance(arg, Buffer) and arg.kind == "output":
                assert isinstance(c, ctypes.c_void_p) and c.value == outputs[arg.index]
            elif not isinstance(arg, Buffer):
                assert isinstance(c, ctypes.c_int32) and c.value == arg
