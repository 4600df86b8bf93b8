"""Engines with edgetok plugin nodes: real TensorRT-RTX builds on this CPU-only machine (the Python
IPluginV3 build path, computed shapes, fields, the cubin bundle published beside the engine), every refusal
as one line, and the cubin launcher's argument packing against a real AOT manifest. Running the kernels
(enqueue) needs a GPU and is not tested here."""

import ctypes
import enum
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_assertions import assert_one_line_error, run_cli
from onnx import TensorProto, helper

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is installed by tools/setup.sh")
pytest.importorskip("triton", reason="the plugin kernels are compiled with Triton")

from edgetok.engine.backend import BACKENDS  # noqa: E402
from edgetok.engine.build import _request_record, stale_reason  # noqa: E402
from edgetok.engine.options import BuildOptions, InputProfile  # noqa: E402
from edgetok.plugins import cubins, launch  # noqa: E402
from edgetok.plugins.kernels import Buffer, Kernel, KernelPlan, Launch  # noqa: E402
from edgetok.plugins.kernels import token_merge_plan as tm_kernels  # noqa: E402
from edgetok.plugins.spec import PluginError  # noqa: E402

KERNELS = {"tome_norm", "tome_match", "tome_rank", "tome_slot", "tome_merge",  # a bundle holds every plugin's
           "prune_scan", "prune_count", "prune_gather", "sba_attend_d64", "sba_attend_d128", "sba_class_row",
           "bsa_pool", "bsa_select", "bsa_kept", "bsa_sparse_d64", "bsa_sparse_d128"}
TOKENS, CHANNELS, DIM = 17, 8, 4


def _token_merge_graph(path: Path, r=4, version="1", x_type=TensorProto.FLOAT) -> Path:
    """One TokenMerge node between graph inputs and outputs, dynamic batch."""
    x = helper.make_tensor_value_info("x", x_type, ["batch", TOKENS, CHANNELS])
    metric = helper.make_tensor_value_info("metric", TensorProto.FLOAT, ["batch", TOKENS, DIM])
    size = helper.make_tensor_value_info("size", TensorProto.FLOAT, ["batch", TOKENS, 1])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("merged", "merged_size")]
    node = helper.make_node("TokenMerge", ["x", "metric", "size"], ["merged", "merged_size"], name="merge0",
                            domain="edgetok", r=r, prefix=1, class_token=1, plugin_version=version,
                            plugin_namespace="edgetok")  # what exports write: TensorRT <= 10.9 reads only this
    graph = helper.make_graph([node], "g", [x, metric, size], outs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetok", 1)]),
              str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def own_cubin_cache(tmp_path_factory):
    """Compile into this run's own cache: the tests then pay for (and check) a real AOT compile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGETOK_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def sm86_bundle(tmp_path_factory):
    """A real AOT compile (cached per Triton version and kernel source) of every kernel for sm86."""
    path = tmp_path_factory.mktemp("cubins") / "sm86.cubins.zip"
    cubins.write_bundle(path, ["sm86"], say=lambda s: None)
    return path


@pytest.fixture(scope="module")
def sm120_bundle(tmp_path_factory):
    """sm120: assembled by Triton's CUDA 13 ptxas, so its cubins need a newer driver than its PTX."""
    path = tmp_path_factory.mktemp("cubins") / "sm120.cubins.zip"
    cubins.write_bundle(path, ["sm120"], say=lambda s: None)
    return path


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory):
    import torch

    from edgetok.vit.export import ViTExportOptions, export_vit

    torch.manual_seed(0)  # fixed random weights: the fp16 build's cosine check must not depend on the draw
    out = tmp_path_factory.mktemp("vit") / "tome.onnx"
    return Path(export_vit(ViTExportOptions(model="deit_tiny_patch16_224", img_size=64, method="tome", r=4,
                                            plugins=True, output=str(out)))["path"])


@pytest.mark.slow
def test_vit_with_token_merge_nodes_builds(capsys, tmp_path, vit_onnx):
    engine = tmp_path / "t.engine"
    code, out, err = run_cli(capsys, "build-engine", str(vit_onnx), "--backend", "tensorrt-rtx", "--batch", "1:4:8",
                             "--target", "sm86", "-o", str(engine))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.engine", "t.engine.build.json", "t.engine.cubins.zip"]
    report = json.loads(Path(f"{engine}.build.json").read_text())
    plugins = report["edgetok_plugins"]
    assert plugins["plugins"] == [  # the merges, and the attention of every block after the first merge
        {"name": "TokenMerge", "namespace": "edgetok", "version": "1", "nodes": 5},
        {"name": "SizeBiasedAttention", "namespace": "edgetok", "version": "1", "nodes": 11}]
    assert plugins["requires_edgetok_runtime"] is True and "register(trt, bundle_path)" in plugins["runtime"]
    manifest = plugins["cubins"]
    # the export's bundle (every architecture) is carried along as it is
    assert "using the plugin cubins in tome.onnx.cubins.zip" in err and "compiling the plugin" not in err
    assert Path(f"{engine}.cubins.zip").read_bytes() == cubins.bundle_path(vit_onnx).read_bytes()
    assert manifest["file"] == "t.engine.cubins.zip" and set(manifest["archs"]) == set(cubins.ARCHS)
    assert manifest["triton"] and manifest["ptx_version"] and manifest["targets"]["sm86"]["target"] == "sm_86"
    # per architecture, the ptxas that assembled its cubins and the driver each form needs (manifest format 3)
    sm86, sm120 = manifest["targets"]["sm86"], manifest["targets"]["sm120"]
    assert sm86["assembler"].startswith("12.") and (sm86["cubin_driver"], sm86["ptx_driver"]) == (12000, 12000)
    assert sm120["assembler"].startswith("13.") and (sm120["cubin_driver"], sm120["ptx_driver"]) == (13000, 12080)
    assert (f"  cubins     sm86, sm87, sm89, sm90: ptxas {sm86['assembler']}, load on CUDA 12.0+ drivers; their PTX "
            "JIT-compiles on 12.0+\n") in out
    assert (f"  cubins     sm110, sm120: ptxas {sm120['assembler']}, load on CUDA 13.0+ drivers; their PTX JIT-compiles "
            "on 13.0+ (sm110), 12.8+ (sm120)\n") in out
    assert set(manifest["kernels"]) == KERNELS
    for kernel in manifest["kernels"].values():
        assert kernel["hidden_params"] == 2
        assert kernel["params"][-2:] == ["global_scratch:*i8", "profile_scratch:*i8"]
    assert manifest["kernels"]["tome_merge"]["params"][:2] == ["x_ptr:*fp32", "size_ptr:*fp32"]
    assert report["request"]["edgetok_plugins"]["uses"] == plugins["plugins"]
    from edgetok.runtime.plugins import engine_plugins  # what profile/eval read before deserializing

    assert engine_plugins(engine) == plugins["plugins"]
    assert report["profiles"][0][0]["max"] == [8, 3, 64, 64]
    data = engine.read_bytes()  # the plugin travels by name and namespace, with its fields
    assert b"TokenMerge" in data and b"edgetok" in data
    assert "edgetok::TokenMerge v1 x5" in out and "kernels in t.engine.cubins.zip (" in out

    # reuse: the same request and intact cubins reuse; missing cubins rebuild
    record = report["request"]
    assert stale_reason(engine, vit_onnx, record) is None
    Path(f"{engine}.cubins.zip").rename(tmp_path / "elsewhere.zip")
    assert "t.engine.cubins.zip are missing or changed" in stale_reason(engine, vit_onnx, record)


def test_request_record_follows_the_plugins():
    opts, backend = BuildOptions(onnx="m.onnx", backend="tensorrt-rtx"), BACKENDS["tensorrt-rtx"]
    profiles = [InputProfile("x", [1, 3], [1, 3], [2, 3])]
    plain = _request_record(opts, backend, profiles)
    setup = {"uses": [{"name": "TokenMerge", "namespace": "edgetok", "version": "1", "nodes": 5}],
             "kernels": "abc", "triton": "3.8.0", "archs": ["sm86"], "bundle_sha256": None}
    assert "edgetok_plugins" not in plain  # engines without plugins keep their old records
    records = [_request_record(opts, backend, profiles, setup)]
    for change in ({"uses": [{**setup["uses"][0], "nodes": 4}]}, {"kernels": "abd"}, {"triton": "3.9.0"},
                   {"archs": ["sm86", "sm120"]}, {"bundle_sha256": "f00"}):
        records.append(_request_record(opts, backend, profiles, {**setup, **change}))
    assert len({json.dumps(r, sort_keys=True) for r in [plain, *records]}) == 7


def test_small_graph_computed_shapes_and_compiled_bundle(capsys, tmp_path):
    model = _token_merge_graph(tmp_path / "m.onnx")
    engine = tmp_path / "m.engine"
    code, out, err = run_cli(capsys, "build-engine", str(model), "--backend", "tensorrt-rtx", "--batch", "1:4:8",
                             "--target", "sm86,sm120", "-o", str(engine))
    assert code == 0, err
    # no bundle beside the ONNX: only the targets (compiled, or from the module's cache when an earlier test built them)
    assert "compiling the plugin kernels for sm86, sm120" in err or "plugin cubins for sm86, sm120 from the cache" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.build.json", "m.engine.cubins.zip",
                                                          "m.onnx"]
    report = json.loads(Path(f"{engine}.build.json").read_text())
    assert report["network_outputs"] == [  # N - r tokens, from the spec's shape rule as TensorRT expressions
        {"name": "merged", "shape": [-1, TOKENS - 4, CHANNELS], "dtype": "FLOAT"},
        {"name": "merged_size", "shape": [-1, TOKENS - 4, 1], "dtype": "FLOAT"},
    ]
    assert sorted(report["edgetok_plugins"]["cubins"]["archs"]) == ["sm120", "sm86"]
    assert report["edgetok_plugins"]["plugins"][0]["nodes"] == 1
    assert sorted(cubins.Bundle.open(f"{engine}.cubins.zip").archs) == ["sm120", "sm86"]


def test_fields_survive_serialization(sm86_bundle):
    import tensorrt_rtx as trt

    from edgetok.plugins import tensorrt as plugins

    registered = plugins.register(trt, sm86_bundle)
    assert plugins.register(trt, sm86_bundle) == registered  # idempotent
    assert registered == [{"name": "BlockSparseAttention", "namespace": "edgetok", "version": "1",
                           "fields": ["scale", "block", "mass", "keep", "prefix"]},
                          {"name": "SizeBiasedAttention", "namespace": "edgetok", "version": "1", "fields": ["scale"]},
                          {"name": "TokenMerge", "namespace": "edgetok", "version": "1",
                           "fields": ["r", "prefix", "class_token"]},
                          {"name": "TokenPrune", "namespace": "edgetok", "version": "1", "fields": ["prefix"]}]
    assert trt.get_plugin_registry().get_creator("TokenMerge", "1", "edgetok") is not None
    creator = plugins.creator(trt, "TokenMerge")
    assert [f.name for f in creator.field_names] == ["r", "prefix", "class_token"]
    r, class_token = np.array([5], np.int32), np.array([0], np.int32)  # a PluginField does not own its data
    given = trt.PluginFieldCollection([trt.PluginField("r", r, trt.PluginFieldType.INT32),
                                       trt.PluginField("class_token", class_token, trt.PluginFieldType.INT32)])
    plugin = creator.create_plugin("merge0", given, trt.TensorRTPhase.BUILD)
    assert plugin.fields == {"r": 5, "prefix": 1, "class_token": 0}  # prefix from the spec's default
    serialized = plugin.get_fields_to_serialize()
    assert [(f.name, f.type) for f in serialized] == [(n, trt.PluginFieldType.INT32) for n in ("r", "prefix", "class_token")]
    again = creator.create_plugin("merge0", serialized, trt.TensorRTPhase.RUNTIME)
    assert again.fields == plugin.fields and again.runtime.bundle_path == sm86_bundle
    assert again.clone().fields == plugin.fields and again.attach_to_context(None).fields == plugin.fields
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version, plugin.num_outputs) == \
        ("TokenMerge", "edgetok", "1", 2)


def _bad_build(capsys, tmp_path, model, *extra):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(capsys, "build-engine", str(model), "--backend", "tensorrt-rtx", "--batch", "1:2:4",
                             "-o", str(tmp_path / "bad.engine"), *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing published, no staging left
    return code, err


def test_wrong_plugin_version_is_one_line(capsys, tmp_path):
    code, err = _bad_build(capsys, tmp_path, _token_merge_graph(tmp_path / "v2.onnx", version="2"))
    assert_one_line_error(code, err, "v2.onnx", "edgetok::TokenMerge version '2'", "version '1'", "re-export")


def test_fp16_input_to_the_plugin_is_one_line(capsys, tmp_path, sm86_bundle):
    model = _token_merge_graph(tmp_path / "h.onnx", x_type=TensorProto.FLOAT16)
    cubins.bundle_path(model).write_bytes(sm86_bundle.read_bytes())
    code, err = _bad_build(capsys, tmp_path, model, "--target", "sm86")
    assert_one_line_error(code, err, "build failed", "TokenMerge: input x is float16", "takes float32")
    assert "log:" not in err


def test_r_too_large_is_one_line(capsys, tmp_path, sm86_bundle):
    model = _token_merge_graph(tmp_path / "r.onnx", r=10)
    cubins.bundle_path(model).write_bytes(sm86_bundle.read_bytes())
    code, err = _bad_build(capsys, tmp_path, model, "--target", "sm86")
    assert_one_line_error(code, err, "build failed", "r=10 is too large for 17 tokens", "at most 8", "export with a lower --r")


def test_target_without_cubins_is_refused_before_the_build(capsys, tmp_path):
    code, err = _bad_build(capsys, tmp_path, _token_merge_graph(tmp_path / "m.onnx"), "--target", "sm80")
    assert_one_line_error(code, err, "--target sm80", "plugin", "sm86")


@pytest.mark.slow
def test_fp16_build_keeps_the_plugin_in_float32(capsys, tmp_path, vit_onnx):
    """The strongly typed fp16 conversion casts around plugin nodes: the reduction step stays float32."""
    from edgetok.onnx.fp16 import convert_to_fp16

    convert_to_fp16(vit_onnx, tmp_path / "half.onnx")
    half = onnx.load(str(tmp_path / "half.onnx"))
    merges = [n for n in half.graph.node if n.domain == "edgetok"]
    assert merges and all(i.endswith(f"_input_cast_{k}") for n in merges for k, i in enumerate(n.input))
    code, out, err = run_cli(capsys, "build-engine", str(vit_onnx), "--backend", "tensorrt-rtx", "--precision", "fp16",
                             "--batch", "1:2:4", "--target", "sm86", "-o", str(tmp_path / "half.engine"))
    assert code == 0, err
    report = json.loads((tmp_path / "half.engine.build.json").read_text())
    assert report["fp16_conversion"]["passed"] and report["edgetok_plugins"]["plugins"][0]["name"] == "TokenMerge"


# the launcher, without a GPU


def test_pack_args_follows_the_real_manifest(sm86_bundle):
    bundle = cubins.Bundle.open(sm86_bundle)
    plan = tm_kernels.plan([(2, TOKENS, CHANNELS), (2, TOKENS, DIM), (2, TOKENS, 1)], {"r": 4, "prefix": 1, "class_token": 1})
    assert [x.kernel.name for x in plan.launches] == ["tome_norm", "tome_match", "tome_rank", "tome_slot", "tome_merge"]
    inputs, outputs, workspace = [0x1000, 0x2000, 0x3000], [0x4000, 0x5000], 0x100000
    sizes = launch.hidden_sizes_any_arch(bundle)
    where = launch.layout(plan, sizes)
    assert launch.workspace_size(plan, bundle) == where.total >= plan.scratch_bytes
    for step in plan.launches:
        meta = bundle.kernel(step.kernel.name)
        facts = meta["archs"]["sm86"]
        assert (facts["global_scratch_size"], facts["profile_scratch_size"]) == (0, 0)  # so both hidden are NULL
        values = launch.launch_values(step, inputs, outputs, workspace, where, facts)
        packed = launch.pack_args(meta["params"], values)
        assert len(packed) == len(step.kernel.params) + 2 == len(meta["params"])
        for param, arg, c in zip(meta["params"], list(step.args) + [None, None], packed):
            if param["type"].startswith("*"):
                assert isinstance(c, ctypes.c_void_p)
                if isinstance(arg, Buffer):
                    base = {"input": inputs, "output": outputs}.get(arg.kind)
                    assert c.value == (base[arg.index] if base else workspace + arg.index)
                else:
                    assert c.value is None  # hidden scratch: NULL
            else:
                assert param["type"] == "i32" and isinstance(c, ctypes.c_int32) and c.value == arg
        array = launch.pointer_array(packed)
        assert [array[i] for i in range(len(packed))] == [ctypes.addressof(c) for c in packed]
    merge = plan.launches[-1]
    assert merge.args[-4:] == (TOKENS, CHANNELS, 4, 1) and merge.grid == (TOKENS - 4, 2, 1)
    with pytest.raises(PluginError, match="takes 14 parameters"):
        launch.pack_args(bundle.kernel("tome_merge")["params"], [0] * 12)


def test_scalars_hidden_scratch_and_arch_choice():
    packed = launch.pack_args([{"type": "*fp32"}, {"type": "fp32"}, {"type": "i64"}, {"type": "*i8"}], [0x10, 0.5, 7, 0])
    assert [type(c) for c in packed] == [ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_void_p]
    assert [packed[0].value, packed[1].value, packed[2].value, packed[3].value] == [0x10, 0.5, 7, None]
    with pytest.raises(PluginError, match="'fp16'"):
        launch.pack_args([{"type": "fp16"}], [1.0])

    kernel = Kernel("k", None, (("x", "*fp32"),))
    plan = KernelPlan((Launch(kernel, (4, 2, 1), (Buffer("input", 0),)), Launch(kernel, (3, 1, 1), (Buffer("input", 0),))),
                      1000)
    where = launch.layout(plan, lambda name: (100, 8))  # per block, for the largest launch
    assert (where.global_offset, where.profile_offset, where.total) == (1024, 1024 + 1024, 1024 + 1024 + 256)
    values = launch.launch_values(plan.launches[0], [0x7000], [], 0x100000, where,
                                  {"global_scratch_size": 100, "profile_scratch_size": 0})
    assert values == [0x7000, 0x100000 + 1024, None]



# GPU (compute capability) -> the build of a bundle holding all of edgetok's, or of one holding only `some`,
# that CUDA's binary compatibility rules let run on it: the same major version and a lower-or-equal minor,
# never across Tegra (sm87 Orin, sm110 Thor, sm72 Xavier, sm53 Nano) and desktop GPUs, and the
# architecture-specific sm_90a/sm_110a/sm_120a that Triton writes from sm90 on only on exactly their GPU.
SELECTION = [  # (capability, chosen from all six builds, from sm86+sm90, from sm87+sm110); None: refused
    (86, "sm86", "sm86", None),   # RTX 30, A10
    (87, "sm87", None, "sm87"),   # Orin: its own build only, never sm86
    (89, "sm89", "sm86", None),   # RTX 40, L4: sm89, else sm86 — never Orin's sm87
    (90, "sm90", "sm90", None),   # H100/H200: sm_90a, exactly
    (80, None, None, None),       # A100: no edgetok build is older than sm86
    (72, None, None, None),       # Xavier (Tegra)
    (53, None, None, None),       # Nano (Tegra)
    (75, None, None, None),       # Turing
    (100, None, None, None),      # B200: sm_100, none built
    (101, None, None, None),      # Thor under a CUDA 12 driver (renamed sm_110 in CUDA 13)
    (110, "sm110", None, "sm110"),  # Thor
    (120, "sm120", None, None),   # RTX 50
    (121, None, None, None),      # DGX Spark: sm_120a cubins run on sm120 only
]


@pytest.mark.parametrize("capability,every,some,tegra", SELECTION)
def test_arch_selection_follows_cuda_binary_compatibility(capability, every, some, tegra):
    for available, want in ((list(cubins.ARCHS), every), (["sm86", "sm90"], some), (["sm87", "sm110"], tegra)):
        if want:
            assert launch.select_arch(capability, available) == want, available
            continue
        with pytest.raises(PluginError) as refused:
            launch.select_arch(capability, available, "m.cubins.zip")
        message = str(refused.value)
        assert "\n" not in message and f"sm{capability}" in message, message
        if capability in (87, 89, 110, 120, 86, 90):  # edgetok builds for it: the command that makes one
            assert f"`edgetok plugins build --arch sm{capability} -o m.cubins.zip`" in message, message
        elif capability == 101:
            assert "JetPack 7" in message
        else:
            assert "export without --plugins" in message, message
    assert launch.select_arch(89, ["sm86", "sm87"]) == "sm86"  # an Ada GPU never takes Orin's cubins
    with pytest.raises(PluginError, match="Tegra and desktop GPUs do not run each other's cubins"):
        launch.select_arch(87, ["sm86"])  # nor an Orin the desktop ones
    with pytest.raises(PluginError, match=r"sm90 cubins \(sm_90a\) run only on sm90"):  # a 9.x after Hopper
        launch.select_arch(91, ["sm90"])
    assert launch.select_arch(91, ["sm90"], targets={"sm90": "sm_90"}) == "sm90"  # a plain sm_90 build would run


def test_launch_without_a_gpu_is_one_line(sm86_bundle):
    plan = tm_kernels.plan([(1, TOKENS, CHANNELS), (1, TOKENS, DIM), (1, TOKENS, 1)], {"r": 4, "prefix": 1, "class_token": 1})
    with pytest.raises(PluginError) as caught:  # no driver here; with one, no current context in this process
        launch.Launcher(cubins.Bundle.open(sm86_bundle)).run(plan, [1, 2, 3], [4, 5], 6, 0)
    assert "\n" not in str(caught.value) and ("cuInit failed" in str(caught.value) or "context" in str(caught.value))


def test_preflight_names_the_fix_before_an_engine_is_deserialized(sm86_bundle, tmp_path):
    """What enqueue would fail on inside TensorRT (which only logs it) is checked, in one line, up front."""
    bundle = cubins.Bundle.open(sm86_bundle)
    assert launch.preflight(bundle, 86, 12020) == launch.Image("sm86", "cubin")
    assert launch.preflight(bundle, 89, 12020) == launch.Image("sm86", "cubin")  # same major, desktop
    with pytest.raises(PluginError, match=r"no kernels that run on this GPU \(sm87; it has sm86; sm86 is a desktop "
                                          r"build and Tegra .*: run `edgetok plugins build --arch sm87 -o .*sm86.cubins.zip`"):
        launch.preflight(bundle, 87, 12060)
    with pytest.raises(PluginError, match=r"\(sm110; it has sm86\): run `edgetok plugins build --arch sm110 -o "):
        launch.preflight(bundle, 110, 13000)
    with pytest.raises(PluginError, match="compiles its plugin kernels for sm86, .*only; export without --plugins"):
        launch.preflight(bundle, 80, 12020)
    # a bundle compiled from other kernel sources (an older edgetok) would run today's plan on other kernels
    import zipfile

    stale = tmp_path / "stale.cubins.zip"
    with zipfile.ZipFile(sm86_bundle) as old, zipfile.ZipFile(stale, "w") as new:
        for name in old.namelist():
            data = old.read(name)
            if name == cubins.MANIFEST:
                data = json.dumps({**json.loads(data), "source": "0123456789abcdef"}).encode()
            new.writestr(name, data)
    with pytest.raises(PluginError, match="other plugin sources than this edgetok's .*rebuild it"):
        launch.preflight(cubins.Bundle.open(stale), 86, 12020)


def test_manifest_records_assembler_and_drivers_per_build(sm86_bundle, sm120_bundle):
    """sm86 comes from Triton's CUDA 12 ptxas (its cubins load on any CUDA 12 driver), sm120 from its CUDA 13
    one (R580+); both carry PTX in the oldest ISA with their target, for older drivers to JIT-compile."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    for path, cc, isa, ptx_driver in ((sm86_bundle, 86, "8.0", 12000), (sm120_bundle, 120, "8.7", 12080)):
        bundle = cubins.Bundle.open(path)
        (arch, info), = bundle.manifest["archs"].items()
        assert f"V{info['assembler']}" in get_ptxas_version(cc)  # the ptxas Triton really ran for it
        assert info["cubin_driver"] == 1000 * int(info["assembler"].split(".")[0])
        assert (info["ptx_version"], info["ptx_driver"]) == (isa, ptx_driver)
        ptx = bundle.ptx("tome_merge", arch)
        assert ptx.endswith(b"\0") and f".version {isa}".encode() in ptx and info["target"].encode() in ptx
    assert cubins.Bundle.open(sm120_bundle).manifest["archs"]["sm120"]["cubin_driver"] == 13000
    assert [cubins.driver_for_ptx(v) for v in ("7.8", "8.0", "8.5", "8.7", "8.8", "9.0", "9.3")] == \
        [11080, 12000, 12050, 12080, 12090, 13000, 13030]


class StandInDriver:
    """cuda.bindings.driver as far as edgetok's launcher and preflight use it: one GPU of compute capability
    ``capability`` under a driver of CUDA version ``version`` (cuDriverGetVersion's 12080 for 12.8). It
    records every image cuModuleLoadData is given and every launch; ``refuse`` is what it answers for a
    cubin (an ELF image), as a driver answers one it cannot use."""

    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_OUT_OF_MEMORY = 2
        CUDA_ERROR_INVALID_IMAGE = 200
        CUDA_ERROR_NO_BINARY_FOR_GPU = 209

    class CUdevice_attribute(enum.IntEnum):
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
        CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97

    class CUfunction_attribute(enum.IntEnum):
        CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    CUstream = int

    def __init__(self, capability: int, version: int, refuse: int = 0):
        self.capability, self.version, self.refuse = capability, version, refuse
        self.loaded, self.launched = [], []

    def cuInit(self, flags):
        return (self.CUresult.CUDA_SUCCESS,)

    def cuDriverGetVersion(self):
        return self.CUresult.CUDA_SUCCESS, self.version

    def cuDeviceGet(self, ordinal):
        return self.CUresult.CUDA_SUCCESS, ordinal

    def cuCtxGetCurrent(self):
        return self.CUresult.CUDA_SUCCESS, 0xC0

    def cuCtxGetDevice(self):
        return self.CUresult.CUDA_SUCCESS, 0

    def cuDeviceGetAttribute(self, attr, device):
        value = {75: self.capability // 10, 76: self.capability % 10, 97: 99 * 1024}[int(attr)]
        return self.CUresult.CUDA_SUCCESS, value

    def cuModuleLoadData(self, image):
        image = bytes(image)
        self.loaded.append(image)
        if image[:4] == b"\x7fELF" and self.refuse:
            return self.CUresult(self.refuse), None
        return self.CUresult.CUDA_SUCCESS, len(self.loaded)

    def cuModuleGetFunction(self, module, name):
        return self.CUresult.CUDA_SUCCESS, (module, name.decode())

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        self.launched.append((fn[1], (gx, gy, gz)))
        return (self.CUresult.CUDA_SUCCESS,)

    def cuGetErrorName(self, err):
        return self.CUresult.CUDA_SUCCESS, self.CUresult(err).name.encode()


def _engine_beside(tmp_path, bundle: Path) -> Path:
    """An engine file with a build report naming TokenMerge and the bundle beside it: what prepare_engine reads."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    used = [{"name": "TokenMerge", "namespace": "edgetok", "version": "1", "nodes": 1}]
    (tmp_path / "m.engine.build.json").write_text(json.dumps({"edgetok_plugins": {"plugins": used}}))
    cubins.bundle_path(engine).write_bytes(bundle.read_bytes())
    return engine


@pytest.mark.parametrize("version,kind", [(13000, "cubin"), (12090, "ptx"), (12080, "ptx"), (12060, None)],
                         ids=["cuda13.0", "cuda12.9", "cuda12.8", "cuda12.6"])
def test_preflight_checks_the_driver_against_each_build(tmp_path, monkeypatch, sm120_bundle, version, kind):
    """An RTX 50 (sm120) whose driver is too old for CUDA 13's cubins JIT-compiles their PTX 8.7 (CUDA
    12.8+); older than that, the engine is refused before deserializing, naming the driver to install."""
    import tensorrt_rtx as trt

    from edgetok.runtime.plugins import prepare_engine

    stand_in = StandInDriver(120, version)
    monkeypatch.setattr(launch, "_driver", lambda: stand_in)  # the binding preflight and launcher share
    engine = _engine_beside(tmp_path, sm120_bundle)
    if kind is None:
        with pytest.raises(PluginError) as refused:
            prepare_engine(trt, engine)
        message = str(refused.value)
        assert "\n" not in message
        for needle in ("this GPU's driver is CUDA 12.6", "sm120 cubins", "ptxas 13.", "CUDA 13.0 driver", "PTX 8.7",
                       "update the NVIDIA driver to one for CUDA 12.8 or newer (R570+"):
            assert needle in message, message
        return
    assert prepare_engine(trt, engine)[0]["name"] == "TokenMerge"
    image = launch.preflight(cubins.Bundle.open(cubins.bundle_path(engine)), 120, version)
    assert (image.arch, image.kind) == ("sm120", kind)
    assert kind == "cubin" or "need a CUDA 13.0 driver, this one is CUDA 12." in image.why


def _run_merge(bundle_path: Path, stand_in) -> launch.Launcher:
    plan = tm_kernels.plan([(1, TOKENS, CHANNELS), (1, TOKENS, DIM), (1, TOKENS, 1)], {"r": 4, "prefix": 1, "class_token": 1})
    launcher = launch.Launcher(cubins.Bundle.open(bundle_path))
    launcher.run(plan, [0x1000, 0x2000, 0x3000], [0x4000, 0x5000], 0x100000, 0)
    assert [name for name, _ in stand_in.launched] == ["tome_norm", "tome_match", "tome_rank", "tome_slot", "tome_merge"]
    return launcher


def test_launcher_loads_ptx_when_the_driver_is_older_than_the_cubins(monkeypatch, sm120_bundle):
    bundle = cubins.Bundle.open(sm120_bundle)
    stand_in = StandInDriver(120, 12080)
    monkeypatch.setattr(launch, "_driver", lambda: stand_in)
    _run_merge(sm120_bundle, stand_in)
    names = ["tome_norm", "tome_match", "tome_rank", "tome_slot", "tome_merge"]
    assert stand_in.loaded == [bundle.ptx(n, "sm120") for n in names]  # PTX text, NUL-terminated; no cubin tried

    stand_in = StandInDriver(120, 13000)  # new enough: the cubins
    monkeypatch.setattr(launch, "_driver", lambda: stand_in)
    _run_merge(sm120_bundle, stand_in)
    assert stand_in.loaded == [bundle.cubin(n, "sm120") for n in names]


def test_launcher_falls_back_to_ptx_when_the_driver_refuses_a_cubin(monkeypatch, sm86_bundle):
    """A CUDA 12 driver should load CUDA 12.9's cubins (minor version compatibility; unverified on JetPack 6):
    if it refuses one as an image it cannot use, the launcher JIT-compiles the PTX instead."""
    bundle = cubins.Bundle.open(sm86_bundle)
    stand_in = StandInDriver(86, 12020, refuse=StandInDriver.CUresult.CUDA_ERROR_INVALID_IMAGE)
    monkeypatch.setattr(launch, "_driver", lambda: stand_in)
    launcher = _run_merge(sm86_bundle, stand_in)
    assert stand_in.loaded == [bundle.cubin("tome_norm", "sm86")] + [  # one refused cubin, then PTX only
        bundle.ptx(n, "sm86") for n in ("tome_norm", "tome_match", "tome_rank", "tome_slot", "tome_merge")]
    (state,) = launcher._contexts.values()
    assert state["image"].kind == "ptx" and "CUDA_ERROR_INVALID_IMAGE" in state["image"].why
    stand_in = StandInDriver(86, 12020, refuse=StandInDriver.CUresult.CUDA_ERROR_OUT_OF_MEMORY)  # not the image's fault
    monkeypatch.setattr(launch, "_driver", lambda: stand_in)
    with pytest.raises(PluginError, match=r"^loading the tome_norm cubin \(sm86\) failed: CUDA_ERROR_OUT_OF_MEMORY$"):
        _run_merge(sm86_bundle, stand_in)


def test_rtx_build_without_targets_names_the_kernels_architectures(capsys, tmp_path, sm86_bundle):
    """TensorRT-RTX's default targets include SM 8.0, which has no plugin kernels: the build names its targets."""
    model = _token_merge_graph(tmp_path / "m.onnx")
    code, out, err = run_cli(capsys, "build-engine", str(model), "--backend", "tensorrt-rtx", "--batch", "1:2:4",
                             "-o", str(tmp_path / "m.engine"))
    assert code == 0, err
    assert "targets sm86, sm89, sm120: the architectures edgetok's plugin kernels are compiled for" in err
    report = json.loads((tmp_path / "m.engine.build.json").read_text())
    assert report["request"]["targets"] == ["sm86", "sm89", "sm120"]
    assert sorted(report["edgetok_plugins"]["cubins"]["archs"]) == ["sm120", "sm86", "sm89"]
