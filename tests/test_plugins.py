"""The TokenMerge plugin spec: its reference is the standard-op ToMe step, and a --plugins export is the
standard-op export (ONNX Runtime running the plugin nodes through onnxruntime-extensions)."""

import io

import numpy as np
import onnx
import pytest
import torch

from edgetok.errors import EdgetokError
from edgetok.onnx.lint import lint
from edgetok.onnx.validate import ort_session
from edgetok.plugins import spec as plugin_spec
from edgetok.plugins.token_merge import max_r
from edgetok.vit.export import ViTExportOptions, export_vit
from edgetok.vit.token_transform import apply_transform
from edgetok.vit.methods.tome_torch import bipartite_transform

# (tokens, prefix, class_token): a DeiT (cls), distilled (cls + dist), registers, and no prefix (avg pool).
LAYOUTS = [(17, 1, 1), (18, 2, 1), (21, 5, 1), (16, 0, 0), (21, 5, 0), (197, 1, 1)]


def _inputs(batch, tokens, prefix, seed, channels=8, dim=6, ties=False):
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((batch, tokens, channels))
    metric = gen.standard_normal((batch, tokens, dim))
    if ties:  # every key a multiple of one of three axes: cosines exactly 0 or 1, ties everywhere
        metric = np.eye(dim)[gen.integers(0, 3, (batch, tokens))] * gen.integers(1, 4, (batch, tokens, 1))
    size = gen.integers(1, 5, (batch, tokens, 1)).astype(np.float64)
    return x, metric, size


def _standard_step(x, metric, size, r, prefix, class_token):
    x, metric, size = map(torch.from_numpy, (x, metric, size))
    if r == 0:
        return x.numpy(), size.numpy()
    out, out_size = apply_transform(bipartite_transform(metric, r, prefix, bool(class_token)), x, size, size)
    return out.numpy(), out_size.numpy()


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("tokens,prefix,class_token", LAYOUTS)
def test_reference_is_the_standard_op_step_bit_for_bit(tokens, prefix, class_token, ties):
    for r in sorted({0, 1, 3, max_r(tokens, prefix)}):
        inputs = _inputs(3, tokens, prefix, seed=tokens + r, ties=ties)
        got = plugin_spec.run_reference("TokenMerge", list(inputs), {"r": r, "prefix": prefix,
                                                                     "class_token": class_token}, any_float=True)
        want = _standard_step(*inputs, r, prefix, class_token)
        for g, w in zip(got, want):
            assert g.shape == w.shape == (3, tokens - r, w.shape[-1])
            assert np.array_equal(g, w), f"r={r}: max diff {np.abs(g - w).max()}"


def test_ties_rank_by_position_in_pytorch_as_in_onnx():
    """torch.topk orders equal values arbitrarily; ONNX TopK puts the lower index first. The eager step
    sorts stably, so PyTorch and its export merge the same tokens."""

    class Step(torch.nn.Module):
        def forward(self, x, metric):
            return apply_transform(bipartite_transform(metric, 5, 1, True), x, torch.ones_like(x[..., :1]),
                                   torch.ones_like(x[..., :1]))[0]

    x, metric, _ = (torch.from_numpy(a).float() for a in _inputs(2, 33, 1, seed=3, ties=True))
    buf = io.BytesIO()
    torch.onnx.export(Step(), (x, metric), buf, dynamo=False, opset_version=17, input_names=["x", "m"])
    path = io.BytesIO(buf.getvalue())
    import onnxruntime as ort

    got = ort.InferenceSession(path.getvalue()).run(None, {"x": x.numpy(), "m": metric.numpy()})[0]
    want = Step()(x, metric).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    ref = plugin_spec.run_reference("TokenMerge", [x.numpy(), metric.numpy(), np.ones((2, 33, 1), np.float32)],
                                    {"r": 5, "prefix": 1, "class_token": 1})[0]
    np.testing.assert_allclose(ref, want, atol=1e-6)


def test_spec_rejects_bad_calls_in_one_line():
    x, metric, size = (a.astype(np.float32) for a in _inputs(1, 17, 1, seed=0))
    cases = [
        ({"r": 9, "prefix": 1}, "r=9 is too large for 17 tokens with 1 protected; at most 8"),
        ({"r": 2, "prefix": 1, "colour": 3}, "unknown field(s) colour"),
        ({"r": -1}, "must be r >= 0"),
    ]
    for fields, message in cases:
        with pytest.raises(plugin_spec.PluginError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            plugin_spec.run_reference("TokenMerge", [x, metric, size], fields)
        assert "\n" not in str(err.value)
    with pytest.raises(plugin_spec.PluginError, match="takes float32; keep the reduction step in float32"):
        plugin_spec.run_reference("TokenMerge", [x.astype(np.float16), metric, size], {"r": 1})
    with pytest.raises(plugin_spec.PluginError, match=r"version '2' is not provided \(edgetok has version '1'\)"):
        plugin_spec.get("TokenMerge", "2")
    with pytest.raises(plugin_spec.PluginError, match="not an edgetok plugin; known: BlockSparseAttention, "
                                                     "SizeBiasedAttention, TokenMerge, TokenPrune"):
        plugin_spec.get("TokenSplit")


def _export(tmp_path, model, plugins, **kw):
    opts = ViTExportOptions(model=model, method="tome", plugins=plugins, output=str(tmp_path / f"{plugins}.onnx"), **kw)
    return export_vit(opts)


def _checkpoint(tmp_path, model, img_size):
    """Fixed weights, so that both exports hold the same model (timm names load randomly initialised)."""
    import timm

    torch.manual_seed(0)
    path = tmp_path / "weights.pth"
    torch.save(timm.create_model(model, img_size=img_size).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("model,kw", [
    ("deit_tiny_patch16_224", dict(img_size=64, r=4)),
    ("deit_small_patch16_224", dict(img_size=96, r_schedule="(6, -1)")),
    ("edgetok_digits_vit", dict(r=2)),
], ids=["deit_tiny", "deit_small_sched", "digits"])
@pytest.mark.slow
def test_plugins_export_equals_standard_op_export(tmp_path, model, kw):
    if model != "edgetok_digits_vit":
        kw["checkpoint"] = _checkpoint(tmp_path, model, kw["img_size"])
    standard, plugins = _export(tmp_path, model, False, **kw), _export(tmp_path, model, True, **kw)
    graph = onnx.load(plugins["path"])
    merges = [n for n in graph.graph.node if n.op_type == "TokenMerge"]
    per_block = plugins["reduction"]["tokens_per_layer"]
    reduced_blocks = sum(1 for a, b in per_block if a != b)
    after_first = len(per_block) - 1 - next(i for i, (a, b) in enumerate(per_block) if a != b)
    assert len(merges) == reduced_blocks > 0 and plugins["reduction"]["attention"] == "biased_after_reduction"
    assert plugins["plugins"] == [{"name": "TokenMerge", "namespace": "edgetok", "version": "1", "nodes": reduced_blocks},
                                  {"name": "SizeBiasedAttention", "namespace": "edgetok", "version": "1",
                                   "nodes": after_first}]
    assert standard["plugins"] == [] and lint(graph) == []
    assert len(graph.graph.node) < len(onnx.load(standard["path"]).graph.node)
    shape = [3, *plugins["input_shape"][1:]]
    pixels = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = ort_session(plugins["path"]).run(None, {"pixel_values": pixels})[0]
    want = ort_session(standard["path"]).run(None, {"pixel_values": pixels})[0]
    assert np.abs(got - want).max() <= 1e-5


def test_every_plugin_node_names_its_namespace_and_version(tmp_path):
    """TensorRT's ONNX parser before 10.10 (JetPack 6: 10.3) takes the plugin namespace only from the
    ``plugin_namespace`` attribute (default ""), not from the domain: every node the exporter writes for an
    edgetok op carries it, and the version."""
    import edgetok.vit.attention  # noqa: F401  (registers the ops' export rules)
    import edgetok.vit.dynamic  # noqa: F401
    import edgetok.vit.methods.tome_torch  # noqa: F401

    class Steps(torch.nn.Module):  # each edgetok op once, as the ViT exports write them
        def forward(self, x, q):
            ops = torch.ops.edgetok
            size = torch.ones_like(x[..., :1])
            merged, merged_size = ops.token_merge(x, x, size, 2, 1, True)
            pruned, _, _ = ops.token_prune(merged, merged_size, merged[..., 0] > 0, 1)
            out, _ = ops.size_biased_attention(q, q, q, size, 0.5)
            sparse, _ = ops.block_sparse_attention(out, q, q, size, 0.5, 16, 0.9, 0.0, 1)
            return pruned.sum() + sparse.sum()

    path = tmp_path / "steps.onnx"
    x, q = torch.randn(1, 17, 8), torch.randn(1, 2, 17, 8)
    torch.onnx.export(Steps(), (x, q), str(path), dynamo=False, opset_version=17)
    nodes = plugin_spec.plugin_nodes(onnx.load(str(path)))
    assert sorted(n.op_type for n in nodes) == ["BlockSparseAttention", "SizeBiasedAttention", "TokenMerge", "TokenPrune"]
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        for name, value in (("plugin_namespace", b"edgetok"), ("plugin_version", b"1")):
            assert attrs[name].type == onnx.AttributeProto.STRING and attrs[name].s == value, (node.op_type, name)


def test_a_node_of_another_plugin_namespace_is_refused():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 17, 8])
    node = onnx.helper.make_node("TokenMerge", ["x", "x", "s"], ["y", "ys"], name="m", domain="edgetok", r=2,
                                 plugin_version="1", plugin_namespace="acme")
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [x]))
    with pytest.raises(EdgetokError, match="plugin namespace 'acme' is not edgetok's"):
        plugin_spec.uses(model)


def test_lint_names_foreign_and_wrong_version_plugin_nodes():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 17, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    nodes = [
        onnx.helper.make_node("TokenMerge", ["x", "x", "s"], ["y", "ys"], name="merge_v2", domain="edgetok",
                              r=2, prefix=1, class_token=1, plugin_version="2"),
        onnx.helper.make_node("Mystery", ["x"], ["z"], name="foreign", domain="acme"),
    ]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y]))
    found = {f.node: f.reason for f in lint(model)}
    assert "version '2' is not provided" in found["merge_v2"]
    assert "custom domain 'acme'" in found["foreign"]
    with pytest.raises(EdgetokError, match="version '2' is not provided"):
        plugin_spec.uses(model)


# ----------------------------------------------------------------------------------- edgetok plugins ...
@pytest.mark.slow
def test_plugins_check_runs_every_kernel_under_the_interpreter():
    """The command selects the interpreter itself (no TRITON_INTERPRET in its environment)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "edgetok", "plugins", "check"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    cases = len(plugin_spec.get("TokenMerge").cases(np.random.default_rng(0)))
    assert f"TokenMerge: {cases}/{cases} cases match the reference" in done.stdout
    kernels = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert kernels == ["bsa_pool", "bsa_select", "bsa_kept", "bsa_sparse_d64", "bsa_sparse_d128",  # one per kernel
                       "sba_attend_d64", "sba_attend_d128", "sba_class_row",
                       "tome_norm", "tome_match", "tome_rank", "tome_slot", "tome_merge",
                       "prune_scan", "prune_count", "prune_gather"]
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    assert " 0 mismatched indices " in rows["tome_rank"] and " 0 mismatched indices " in rows["tome_slot"]


@pytest.mark.slow
def test_plugins_check_exits_non_zero_on_a_mismatch(capsys, monkeypatch):
    from cli_assertions import run_cli

    right = plugin_spec._REFERENCES["TokenMerge"]

    def off_by_a_little(x, metric, size, r, prefix, class_token):
        out, out_size = right(x, metric, size, r, prefix, class_token)
        return out + 1e-3, out_size

    def rank_reversed(inputs, fields):  # the reference's intermediates with the tie rule of rank flipped
        steps = spec.intermediates(inputs, fields)
        steps["rank"] = [len(r) - 1 - r for r in steps["rank"]]
        return steps

    monkeypatch.setitem(plugin_spec._REFERENCES, "TokenMerge", off_by_a_little)
    def one_case(rng):
        inputs = [rng.standard_normal((1, 9, 4)).astype(np.float32), rng.standard_normal((1, 9, 3)).astype(np.float32),
                  np.ones((1, 9, 1), np.float32)]
        return [("one", inputs, {"r": 2, "prefix": 1, "class_token": 1})]

    import dataclasses

    spec = plugin_spec.get("TokenMerge")
    monkeypatch.setitem(plugin_spec._SPECS, "TokenMerge", dataclasses.replace(spec, cases=one_case,
                                                                               intermediates=rank_reversed))
    code, out, _ = run_cli(capsys, "plugins", "check")
    assert code == 1
    assert "0/1 cases match" in out
    assert "MISMATCH tome_rank on one: 4 indices differ" in out and "MISMATCH tome_merge on one: error 0.00043" in out
    assert "MISMATCH tome_match" not in out  # the kernels before rank are right


def test_export_announces_only_the_cubins_it_compiles(monkeypatch, tmp_path):
    """The export's bundle: cubins the cache holds are not announced as being compiled (minutes each)."""
    from edgetok.plugins import cubins
    from edgetok.vit import export

    manifest = {"archs": {a: {} for a in cubins.ARCHS}, "triton": "3", "kernels": {}}
    written = []
    monkeypatch.setattr(cubins, "write_bundle", lambda path, archs, say: written.append(list(archs)) or manifest)
    said = []
    monkeypatch.setattr(cubins, "cached_archs", lambda: list(cubins.ARCHS))
    export._kernel_bundle(tmp_path / "m.onnx.cubins.zip", said.append)
    assert said == ["plugin cubins for sm86, sm87, sm89, sm90, sm110, sm120 from the cache"]
    said.clear()
    monkeypatch.setattr(cubins, "cached_archs", lambda: ["sm87", "sm90"])
    export._kernel_bundle(tmp_path / "m.onnx.cubins.zip", said.append)
    assert said == ["compiling the plugin kernels for sm86, sm89, sm110, sm120 (sm87, sm90 from the cache)"]
    assert written == [list(cubins.ARCHS)] * 2  # the bundle is written either way


def test_plugins_list_and_build_errors(capsys):
    from cli_assertions import assert_one_line_error, run_cli

    code, out, _ = run_cli(capsys, "plugins", "list")
    assert code == 0
    assert "edgetok::TokenMerge version 1" in out and "r:int=0, prefix:int=1, class_token:int=1" in out
    assert "onnxruntime op       yes" in out and "tensorrt-rtx plugin  yes" in out
    code, _, err = run_cli(capsys, "plugins", "build", "--arch", "sm99")
    assert_one_line_error(code, err, "sm99")
    code, _, err = run_cli(capsys, "plugins", "build", "--arch", "sm87", "-o", "kernels.zip")
    assert_one_line_error(code, err, "-o kernels.zip should end in .cubins.zip")


def test_plugin_runtime_needs_neither_triton_nor_torch():
    """What runs an engine on a Jetson (registration, the launch plan, the cubin launcher) imports no Triton
    and no torch: a Jetson has no Triton."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "import edgetok.plugins.launch, edgetok.plugins.tensorrt, edgetok.runtime.plugins\n"
            "from edgetok.plugins.kernels import module\n"
            "from edgetok.plugins.spec import get\n"
            "plan = module(get('TokenMerge')).plan([(2, 17, 8), (2, 17, 4), (2, 17, 1)], {'r': 4, 'prefix': 1, "
            "'class_token': 1})\n"
            "assert len(plan.launches) == 5\n"
            "print(sorted(m for m in ('triton', 'torch') if m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_engine_with_plugins_needs_its_bundle(tmp_path):
    import json

    import tensorrt_rtx as trt

    from edgetok.runtime.plugins import engine_plugins, prepare_engine

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    assert prepare_engine(trt, engine) == []  # no report: nothing to register
    used = [{"name": "TokenMerge", "namespace": "edgetok", "version": "1", "nodes": 5}]
    (tmp_path / "m.engine.build.json").write_text(json.dumps({"edgetok_plugins": {"plugins": used}}))
    assert engine_plugins(engine) == used
    with pytest.raises(EdgetokError, match=r"uses edgetok plugins \(TokenMerge\) whose kernels come in "
                                           r"m.engine.cubins.zip beside it, which is missing") as err:
        prepare_engine(trt, engine)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_runners_of_a_plugins_export(tmp_path):
    """ONNX Runtime labels its timings as the Python reference ops'; the PyTorch runner re-creates the model
    with plugin steps (the Triton kernels on a GPU; here, on a CPU, the standard ops: the same outputs)."""
    from edgetok.runtime.runners import OnnxRuntimeRunner, TorchRunner

    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", method="tome", r=4, plugins=True,
                                       output=str(tmp_path / "d.onnx")))
    ort_runner = OnnxRuntimeRunner(side["path"], "cpu", 1)
    assert ort_runner.plugins == side["plugins"]
    assert "not the fused kernels' speed" in ort_runner.info()["plugins"]
    torch_runner = TorchRunner(side["path"], "cpu", 2, False)
    states = {b._edgetok_state for b in torch_runner.module.modules() if hasattr(b, "_edgetok_state")}
    assert len(states) == 1 and states.pop().plugins
    pixels = np.random.default_rng(1).standard_normal((2, *side["input_shape"][1:])).astype(np.float32)
    with torch.no_grad():
        want = torch_runner.module(torch.from_numpy(pixels)).numpy()
    got = ort_runner.session.run(None, {"pixel_values": pixels})[0]
    assert np.abs(got - want).max() <= 1e-5
