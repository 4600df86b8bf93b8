"""libedgetok_plugins.so as edgetok uses it: where its TensorRT headers come from (and in which order), what
its record says, that it compiles against every TensorRT header set at hand, that build-engine, profile and
eval load it instead of registering the Python plugin classes (real TensorRT-RTX builds on this CPU, with
a spy proving the Python registration never ran), and the aarch64 build run under qemu. The C++ itself
(shapes, fields, launches against a fake driver) is tested by tests/test_cpp_plugins.py."""

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from cli_assertions import assert_one_line_error, run_cli

from edgetok import sidecar
from edgetok.errors import EdgetokError
from edgetok.plugins import library

REPO = Path(__file__).resolve().parents[1]
SHARED_HEADERS = REPO.parent / "shared" / "third_party" / "tensorrt"  # NVIDIA's public headers, when present
SHARED_VERSIONS = {"10.3": "10.3.0.26", "10.14": "10.14.1.48", "11.1": "11.1.0.106"}

needs_toolchain = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("g++") is None,
                                     reason="the C++ library needs cmake and g++ (apt-get install cmake g++)")


def _headers(folder: Path, version=(10, 14, 1, 48)) -> Path:
    """A minimal TensorRT include folder: the headers find_headers requires, with a version."""
    folder.mkdir(parents=True)
    for name in library.REQUIRED_HEADERS:
        (folder / name).write_text("// stand-in\n")
    (folder / "NvInfer.h").write_text("// stand-in\n")
    major, minor, patch, build = version
    (folder / "NvInferVersion.h").write_text(
        f"#define TRT_MAJOR_ENTERPRISE {major}\n#define TRT_MINOR_ENTERPRISE {minor}\n"
        f"#define TRT_PATCH_ENTERPRISE {patch}\n#define TRT_BUILD_ENTERPRISE {build}\n"
        "#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE\n#define NV_TENSORRT_MINOR TRT_MINOR_ENTERPRISE\n"
        "#define NV_TENSORRT_PATCH TRT_PATCH_ENTERPRISE\n#define NV_TENSORRT_BUILD TRT_BUILD_ENTERPRISE\n")
    return folder


# --- headers ---------------------------------------------------------------------------------------------------

def test_headers_come_from_the_option_then_the_environment_then_an_installed_tensorrt_then_setup(tmp_path,
                                                                                                 monkeypatch):
    given, env = _headers(tmp_path / "given", (10, 3, 0, 26)), _headers(tmp_path / "env", (11, 1, 0, 106))
    installed, setup = _headers(tmp_path / "usr", (10, 14, 1, 48)), _headers(tmp_path / "setup", (10, 14, 1, 48))
    monkeypatch.setattr(library, "installed_headers_dirs", lambda: [installed])
    monkeypatch.setattr(library, "setup_headers_dir", lambda: setup)
    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(env))

    found = library.find_headers(given)
    assert (found.path, found.source, found.version) == (given, "--tensorrt-include", "10.3.0.26")
    found = library.find_headers()
    assert (found.path, found.source, found.version) == (env, "$TENSORRT_INCLUDE_DIR", "11.1.0.106")
    monkeypatch.delenv("TENSORRT_INCLUDE_DIR")
    assert (library.find_headers().path, library.find_headers().source) == (installed, "installed TensorRT")
    (installed / "NvInfer.h").unlink()  # an include folder without TensorRT in it is passed over
    assert (library.find_headers().path, library.find_headers().source) == (setup, "kernel-lens==2.0.1 (tools/setup.sh)")
    shutil.rmtree(setup)
    with pytest.raises(EdgetokError, match=r"no TensorRT headers found: give --tensorrt-include DIR .* run "
                                           r"tools/setup.sh, which unpacks NVIDIA's 10.14 headers"):
        library.find_headers()


def test_a_named_header_folder_without_tensorrt_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(library, "setup_headers_dir", lambda: _headers(tmp_path / "setup"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgetokError, match=r"^--tensorrt-include .*empty has no NvInferRuntimePlugin.h; give TensorRT's"):
        library.find_headers(tmp_path / "empty")
    monkeypatch.setenv("TENSORRT_INCLUDE_DIR", str(tmp_path / "empty"))
    with pytest.raises(EdgetokError, match=r"^\$TENSORRT_INCLUDE_DIR .*empty has no NvInferRuntimePlugin.h"):
        library.find_headers()


def test_setup_unpacked_nvidias_10_14_headers_from_the_pinned_wheel():
    folder = library.setup_headers_dir()
    if not folder.is_dir():
        pytest.skip("tools/setup.sh unpacks the headers into the environment; this one was not set up by it")
    assert library.header_version(folder) == "10.14.1.48"
    assert library.HEADERS_WHEEL_SHA256 in (folder / "SOURCE").read_text()
    if (SHARED_HEADERS / "10.14").is_dir():  # the plugin-facing files are NVIDIA's own
        for name in ("NvInferRuntimePlugin.h", "NvInferPluginBase.h", "NvInferRuntimeBase.h", "NvInferVersion.h"):
            assert (folder / name).read_bytes() == (SHARED_HEADERS / "10.14" / name).read_bytes(), name


def test_a_wheel_that_is_not_the_pinned_one_is_not_unpacked(tmp_path):
    wheel = tmp_path / library.HEADERS_WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(library.HEADERS_IN_WHEEL + "NvInferRuntimePlugin.h", "// not NVIDIA's\n")
    with pytest.raises(EdgetokError, match=r"^kernel_lens-2.0.1-py3-none-any.whl has SHA-256 [0-9a-f]{64}, not the "
                                           "pinned 07cc714e"):
        library.install_headers(tmp_path / "include", wheel)
    assert not (tmp_path / "include").exists()


@pytest.mark.parametrize("name", sorted(SHARED_VERSIONS))
def test_header_version_reads_every_nvinfer_version_layout(name):
    if not (SHARED_HEADERS / name).is_dir():
        pytest.skip(f"{SHARED_HEADERS / name} is not on this machine")
    assert library.header_version(SHARED_HEADERS / name) == SHARED_VERSIONS[name]


# --- building, and the record --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sm86_bundle(tmp_path_factory):
    from edgetok.plugins import cubins

    path = tmp_path_factory.mktemp("cubins") / "sm86.cubins.zip"
    cubins.write_bundle(path, ["sm86"], say=lambda s: None)
    return path


@pytest.fixture(scope="module")
def cpp_lib(tmp_path_factory, sm86_bundle):
    """The library for this machine, built as `edgetok plugins build --lib` builds it, against the headers
    tools/setup.sh provides (or whatever find_headers finds first here)."""
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        pytest.skip("the C++ library needs cmake and g++ (apt-get install cmake g++)")
    from edgetok.cli import main

    out = tmp_path_factory.mktemp("lib")
    assert main(["plugins", "build", "--lib", "--arch", "sm86", "-o", str(out)]) == 0
    return {**json.loads(library.record_path(out / library.LIBRARY).read_text()), "path": str(out / library.LIBRARY)}


def _header_sets():
    sets = [pytest.param(None, id="setup")]
    sets += [pytest.param(SHARED_HEADERS / name, id=name) for name in sorted(SHARED_VERSIONS)]
    return sets


@pytest.mark.slow
@needs_toolchain
@pytest.mark.parametrize("include", _header_sets())
def test_the_library_compiles_against_every_header_set(tmp_path, sm86_bundle, include, monkeypatch):
    if include is None:
        if not library.setup_headers_dir().is_dir():
            pytest.skip("tools/setup.sh unpacks the headers into the environment; this one was not set up by it")
        monkeypatch.delenv("TENSORRT_INCLUDE_DIR", raising=False)
        monkeypatch.setattr(library, "installed_headers_dirs", lambda: [])
    elif not include.is_dir():
        pytest.skip(f"{include} is not on this machine (a fresh clone has no ../shared)")
    record = library.build(tmp_path, bundle=sm86_bundle, include=include)
    expected = library.header_version(include or library.setup_headers_dir())
    assert record["tensorrt_headers"]["version"] == expected
    assert library.elf_platform(tmp_path / library.LIBRARY) == library.host_platform()


@pytest.mark.slow
def test_the_record_says_what_the_library_is(cpp_lib, sm86_bundle):
    from edgetok.plugins import cubins

    path = Path(cpp_lib["path"])
    record = json.loads(library.record_path(path).read_text())
    assert sorted(p.name for p in path.parent.iterdir()) == [library.LIBRARY, library.LIBRARY + ".json"]
    assert record["sha256"] == sidecar.file_sha256(path) and record["bytes"] == path.stat().st_size
    assert record["platform"] == library.host_platform() and record["archs"] == ["sm86"]
    assert record["kernels"] == cubins.Bundle.open(sm86_bundle).manifest["source"]
    assert record["bundle_sha256"] == sidecar.file_sha256(sm86_bundle)
    headers = library.find_headers()
    assert record["tensorrt_headers"] == {"path": str(headers.path), "version": headers.version,
                                          "source": headers.source}
    assert [p["name"] for p in record["plugins"]] == \
        ["BlockSparseAttention", "SizeBiasedAttention", "TokenMerge", "TokenPrune"]
    assert library.check(path, archs=["sm86"], kernels=record["kernels"]) == record
    # TensorRT finds it the way trtexec --dynamicPlugins does: by the two exported symbols
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True).stdout
    assert sorted(line.split()[-1] for line in out.splitlines() if " T " in line) == ["getCreators", "setLoggerFinder"]


@pytest.mark.slow
def test_a_library_that_cannot_serve_is_refused_in_one_line(cpp_lib, tmp_path):
    from edgetok.plugins import cubins

    path = Path(cpp_lib["path"])
    with pytest.raises(EdgetokError, match=r"has no sm120 kernels \(it carries sm86\); rebuild it with edgetok "
                                           r"plugins build --lib --arch sm120,sm86"):
        library.check(path, archs=["sm86", "sm120"], kernels=cpp_lib["kernels"])
    with pytest.raises(EdgetokError, match=r"was built from other plugin kernel sources \(.*\); rebuild it"):
        library.check(path, kernels="0" * 16)
    assert cubins.source_key() != "0" * 16
    other = tmp_path / library.LIBRARY
    data = bytearray(path.read_bytes())
    shutil.copyfile(library.record_path(path), library.record_path(other))
    other.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    with pytest.raises(EdgetokError, match=r"changed after it was built \(its SHA-256 is not the one in "
                                           r"libedgetok_plugins.so.json\)"):
        library.check(other)
    library.record_path(other).unlink()
    with pytest.raises(EdgetokError, match=r"has no record libedgetok_plugins.so.json beside it; build the library"):
        library.check(other)
    data[18:20] = (183).to_bytes(2, "little")  # the ELF header's machine: aarch64
    other.write_bytes(bytes(data))
    if library.host_platform() == "x86_64":
        with pytest.raises(EdgetokError, match=r"^--plugin-lib .* is built for aarch64, but this build runs on x86_64; "
                                               r"use the x86_64 library"):
            library.check(other)
    other.write_text("not a library")
    with pytest.raises(EdgetokError, match=r"is not a Linux x86_64 or aarch64 shared library"):
        library.check(other)


def test_a_missing_cross_compiler_is_named_with_its_package(capsys, tmp_path, monkeypatch):
    real = shutil.which
    monkeypatch.setattr(library.shutil, "which", lambda name: None if "aarch64" in name else real(name))
    monkeypatch.setattr(library, "host_platform", lambda: "x86_64")
    code, _, err = run_cli(capsys, "plugins", "build", "--lib", "--platform", "aarch64", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "--platform aarch64 needs aarch64-linux-gnu-g++, which is not installed: "
                                     "apt-get install g++-aarch64-linux-gnu")
    assert not (tmp_path / "out").exists()


def test_bad_library_build_options_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "plugins", "build", "--platform", "aarch64", "-o", str(tmp_path / "x.cubins.zip"))
    assert_one_line_error(code, err, "--platform and --tensorrt-include choose how the C++ library is built; add --lib")
    code, _, err = run_cli(capsys, "plugins", "build", "--lib", "--tensorrt-include", str(tmp_path),
                           "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, f"--tensorrt-include {tmp_path} has no NvInferRuntimePlugin.h")
    assert not (tmp_path / "out").exists()


# --- engine builds with the library ------------------------------------------------------------------------------

SPY = '''import os
if os.environ.get("EDGETOK_TEST_REGISTER_SPY"):
    import edgetok.plugins.tensorrt as plugins

    real = plugins.register

    def register(*args, **kwargs):
        with open(os.environ["EDGETOK_TEST_REGISTER_SPY"], "a") as f:
            f.write("register\\n")
        return real(*args, **kwargs)

    plugins.register = register
'''


@pytest.fixture
def register_spy(tmp_path, monkeypatch):
    """A file that gets one line per call of edgetok.plugins.tensorrt.register in any Python process of the
    test (the build worker is a child process: a sitecustomize on its PYTHONPATH wraps the function there)."""
    folder = tmp_path / "spy"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SPY)
    calls = tmp_path / "register.calls"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("EDGETOK_TEST_REGISTER_SPY", str(calls))
    import edgetok.plugins.tensorrt as plugins

    def refuse(*args, **kwargs):
        raise AssertionError("the Python plugin classes were registered in the test process")

    monkeypatch.setattr(plugins, "register", refuse)
    return calls


def _build(capsys, onnx_path, engine, *extra):
    return run_cli(capsys, "build-engine", str(onnx_path), "--backend", "tensorrt-rtx", "--target", "sm86",
                   "-o", str(engine), *extra)


@pytest.fixture(scope="module")
def deit_s_tome(tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    out = tmp_path_factory.mktemp("deit") / "deit_s_tome.onnx"
    return Path(export_vit(ViTExportOptions(model="deit_small_patch16_224", method="tome", r=13, plugins=True,
                                            output=str(out)))["path"])


def _exported(tmp_path_factory, name, **options):
    from edgetok.vit.export import ViTExportOptions, export_vit

    out = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    return Path(export_vit(ViTExportOptions(model="edgetok_digits_vit", output=str(out), **options))["path"])


def _assert_built_with_library(engine: Path, cpp_lib: dict, uses: set[str], calls: Path, out: str):
    report = json.loads(Path(f"{engine}.build.json").read_text())
    plugins = report["edgetok_plugins"]
    assert {p["name"] for p in plugins["plugins"]} == uses
    assert plugins["library"]["path"] == cpp_lib["path"] and plugins["library"]["sha256"] == cpp_lib["sha256"]
    assert plugins["library"]["serialized"] is False and plugins["requires_edgetok_runtime"] is False
    assert report["request"]["edgetok_plugins"]["library"] == {"sha256": cpp_lib["sha256"],
                                                               "platform": library.host_platform()}
    assert "cubins" not in plugins and not Path(f"{engine}.cubins.zip").exists()  # the kernels are in the library
    assert sorted(p.name for p in engine.parent.iterdir() if p.name.startswith(engine.name)) == \
        [engine.name, f"{engine.name}.build.json"]
    assert not calls.exists(), "the build worker registered the Python plugin classes"
    assert f"C++ library {cpp_lib['path']}" in out
    return report


@pytest.mark.slow
def test_deit_s_tome_builds_with_the_library_and_no_python_plugin(capsys, tmp_path, cpp_lib, deit_s_tome,
                                                                   register_spy):
    engine = tmp_path / "deit.engine"
    code, out, err = _build(capsys, deit_s_tome, engine, "--plugin-lib", cpp_lib["path"])
    assert code == 0, err
    report = _assert_built_with_library(engine, cpp_lib, {"TokenMerge", "SizeBiasedAttention"}, register_spy, out)
    assert [p["nodes"] for p in report["edgetok_plugins"]["plugins"]] == [12, 11]
    assert b"TokenMerge" in engine.read_bytes() and b"SizeBiasedAttention" in engine.read_bytes()
    # the spy sees the Python path when it is asked for: the assertion above can fail
    code, out, err = _build(capsys, deit_s_tome, tmp_path / "py.engine", "--python-plugins")
    assert code == 0, err
    assert register_spy.read_text() == "register\n" and Path(f"{tmp_path / 'py.engine'}.cubins.zip").is_file()


@pytest.mark.slow
def test_ats_builds_with_the_library_and_no_python_plugin(capsys, tmp_path, tmp_path_factory, cpp_lib, register_spy):
    onnx_path = _exported(tmp_path_factory, "ats", method="ats")
    engine = tmp_path / "ats.engine"
    code, out, err = _build(capsys, onnx_path, engine, "--plugin-lib", cpp_lib["path"], "--batch", "1:4:8")
    assert code == 0, err
    report = _assert_built_with_library(engine, cpp_lib, {"TokenPrune"}, register_spy, out)
    assert report["token_count_outputs"] == {"4": "edgetok.tokens_kept.block4", "5": "edgetok.tokens_kept.block5"}


@pytest.mark.slow
def test_sparse_attention_builds_with_the_default_library(capsys, tmp_path, tmp_path_factory, cpp_lib, register_spy,
                                                          monkeypatch):
    """No --plugin-lib: the library in the default place for this platform is used."""
    onnx_path = _exported(tmp_path_factory, "sparse", attention="sparse", attention_block=16)
    monkeypatch.setattr(library, "default_dir", lambda platform=None: Path(cpp_lib["path"]).parent)
    engine = tmp_path / "s.engine"
    code, out, err = _build(capsys, onnx_path, engine, "--batch", "1:4:8")
    assert code == 0, err
    report = _assert_built_with_library(engine, cpp_lib, {"BlockSparseAttention"}, register_spy, out)
    assert report["attention_kept_outputs"] == {str(b): f"edgetok.attention_kept.block{b}" for b in range(6)}


@pytest.mark.slow
def test_a_default_library_that_cannot_serve_leaves_the_build_to_the_python_plugins(capsys, tmp_path,
                                                                                   tmp_path_factory, cpp_lib,
                                                                                   monkeypatch):
    onnx_path = _exported(tmp_path_factory, "sparse_py", attention="sparse", attention_block=16)
    monkeypatch.setattr(library, "default_dir", lambda platform=None: Path(cpp_lib["path"]).parent)
    code, out, err = _build(capsys, onnx_path, tmp_path / "s.engine", "--batch", "1:4:8", "--target", "sm120")
    assert code == 0, err
    assert "not using the plugin library" in err and "has no sm120 kernels" in err and \
        "building with the Python plugins" in err
    report = json.loads((tmp_path / "s.engine.build.json").read_text())
    assert "library" not in report["edgetok_plugins"] and (tmp_path / "s.engine.cubins.zip").is_file()


@pytest.mark.slow
def test_serialize_plugins_puts_the_library_into_the_engine(capsys, tmp_path, tmp_path_factory, cpp_lib):
    onnx_path = _exported(tmp_path_factory, "ats_ser", method="ats")
    plain, carried = tmp_path / "plain.engine", tmp_path / "carried.engine"
    assert _build(capsys, onnx_path, plain, "--plugin-lib", cpp_lib["path"])[0] == 0
    code, out, err = _build(capsys, onnx_path, carried, "--plugin-lib", cpp_lib["path"], "--serialize-plugins")
    assert code == 0, err
    report = json.loads(Path(f"{carried}.build.json").read_text())["edgetok_plugins"]
    assert report["library"]["serialized"] is True and "setEngineHostCodeAllowed" in report["runtime"]
    assert ", serialized into the engine" in out
    lib = Path(cpp_lib["path"]).read_bytes()
    assert lib in carried.read_bytes() and lib not in plain.read_bytes()  # the library travels inside, whole
    from edgetok.runtime.plugins import engine_host_code

    assert engine_host_code(carried) and not engine_host_code(plain)


@pytest.mark.parametrize("args,message", [
    (["--plugin-lib", "LIB", "--python-plugins"], "--plugin-lib and --python-plugins choose different plugin "
                                                   "implementations; give one"),
    (["--python-plugins", "--serialize-plugins"], "--serialize-plugins puts edgetok's C++ plugin library into the "
                                                  "engine, and this build uses the Python plugins"),
    (["--plugin-lib", "MISSING"], "--plugin-lib MISSING does not exist; build it with edgetok plugins build --lib"),
])
def test_bad_plugin_library_options_are_one_line(capsys, tmp_path, args, message):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is installed by tools/setup.sh")
    from test_plugin_engines import _token_merge_graph

    onnx_path = _token_merge_graph(tmp_path / "m.onnx")
    lib = tmp_path / library.LIBRARY
    lib.write_bytes(b"\x7fELF")
    args = [str(lib) if a == "LIB" else str(tmp_path / "missing.so") if a == "MISSING" else a for a in args]
    message = message.replace("MISSING", str(tmp_path / "missing.so"))
    code, _, err = _build(capsys, onnx_path, tmp_path / "m.engine", *args)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "m.engine").exists()


def test_serialize_plugins_needs_plugin_nodes(capsys, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is installed by tools/setup.sh")
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, str(tmp_path / "relu.onnx"))
    code, _, err = _build(capsys, tmp_path / "relu.onnx", tmp_path / "r.engine", "--serialize-plugins")
    assert_one_line_error(code, err, "--serialize-plugins: relu.onnx has no edgetok plugin nodes")


# --- runners: the library instead of the Python classes -----------------------------------------------------------

class _Registry:
    def __init__(self):
        self.loaded = []

    def load_library(self, path):
        self.loaded.append(path)
        return object()


class _FakeTRT:
    """What prepare_engine touches of a TensorRT module: its plugin registry."""
    __name__ = "tensorrt_rtx"

    def __init__(self):
        self.registry = _Registry()

    def get_plugin_registry(self):
        return self.registry


def _engine_with_library(folder: Path, cpp_lib: dict, serialized=False) -> Path:
    engine = folder / "m.engine"
    engine.write_bytes(b"engine")
    uses = [{"name": "TokenPrune", "namespace": "edgetok", "version": "1", "nodes": 2}]
    report = {"edgetok_plugins": {"plugins": uses, "kernels_digest": cpp_lib["kernels"],
                                  "library": {"path": cpp_lib["path"], "sha256": cpp_lib["sha256"],
                                              "serialized": serialized}}}
    Path(f"{engine}.build.json").write_text(json.dumps(report))
    return engine


@pytest.mark.slow
def test_runners_load_the_library_and_register_no_python_class(tmp_path, cpp_lib, monkeypatch):
    import edgetok.plugins.tensorrt as plugins
    from edgetok.runtime.plugins import engine_host_code, prepare_engine

    monkeypatch.setattr(plugins, "register", lambda *a, **k: pytest.fail("Python plugin classes registered"))
    monkeypatch.setattr(library, "default_dir", lambda platform=None: tmp_path / "nowhere")
    trt = _FakeTRT()
    engine = _engine_with_library(tmp_path, cpp_lib)
    assert prepare_engine(trt, engine)[0]["name"] == "TokenPrune"
    assert trt.registry.loaded == [cpp_lib["path"]] and not engine_host_code(engine)

    # moved to another machine: the recorded path is gone; a library beside the engine serves
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    engine = _engine_with_library(moved, {**cpp_lib, "path": str(tmp_path / "gone" / library.LIBRARY)})
    shutil.copyfile(cpp_lib["path"], moved / library.LIBRARY)
    shutil.copyfile(library.record_path(cpp_lib["path"]), library.record_path(moved / library.LIBRARY))
    trt = _FakeTRT()
    prepare_engine(trt, engine)
    assert trt.registry.loaded == [str(moved / library.LIBRARY)]

    # none anywhere: one line naming the fix; $EDGETOK_PLUGIN_LIB is honoured
    (moved / library.LIBRARY).unlink()
    with pytest.raises(EdgetokError, match=r"m.engine was built with edgetok's C\+\+ plugin library, and no usable "
                                           r"libedgetok_plugins.so is here .* edgetok plugins build --lib or set "
                                           r"\$EDGETOK_PLUGIN_LIB"):
        prepare_engine(_FakeTRT(), engine)
    monkeypatch.setenv(library.LIBRARY_ENV, cpp_lib["path"])
    trt = _FakeTRT()
    prepare_engine(trt, engine)
    assert trt.registry.loaded == [cpp_lib["path"]]

    # serialized into the engine: nothing to load, and the runtime must allow the engine's host code
    (tmp_path / "serialized").mkdir()
    engine, trt = _engine_with_library(tmp_path / "serialized", cpp_lib, serialized=True), _FakeTRT()
    assert prepare_engine(trt, engine) and trt.registry.loaded == [] and engine_host_code(engine)


# --- aarch64 (Jetson) ---------------------------------------------------------------------------------------------

AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
GOOGLETEST_SOURCES = Path("/usr/src/googletest")
needs_aarch64 = pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64") and shutil.which("cmake")
         and (GOOGLETEST_SOURCES / "CMakeLists.txt").is_file()),
    reason="the aarch64 build and its tests under qemu need apt-get install g++-aarch64-linux-gnu qemu-user "
           "libgtest-dev cmake (.ci/run installs them)")


@pytest.mark.slow
@needs_aarch64
def test_the_aarch64_library_is_cross_compiled_for_jetson(capsys, tmp_path, sm86_bundle):
    record = library.build(tmp_path, platform="aarch64", bundle=sm86_bundle)
    path = Path(record["path"])
    assert record["platform"] == "aarch64" and library.elf_platform(path) == "aarch64"
    assert record["compiler"].startswith("aarch64-linux-gnu-g++")
    assert library.check(path, platform="aarch64", kernels=record["kernels"]) == \
        json.loads(library.record_path(path).read_text())
    if library.host_platform() == "x86_64":  # a build here cannot load it
        with pytest.raises(EdgetokError, match="is built for aarch64, but this build runs on x86_64"):
            library.check(path, kernels=record["kernels"])


@pytest.fixture(scope="module")
def aarch64_gtest(tmp_path_factory):
    """GoogleTest compiled for aarch64 from the sources libgtest-dev ships (its packaged libraries are the host's)."""
    folder = tmp_path_factory.mktemp("gtest-aarch64")
    cross = ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
             f"-DCMAKE_CXX_COMPILER={shutil.which('aarch64-linux-gnu-g++')}",
             f"-DCMAKE_C_COMPILER={shutil.which('aarch64-linux-gnu-gcc')}"]
    for cmd in (["cmake", "-S", str(GOOGLETEST_SOURCES), "-B", str(folder / "build"), "-DBUILD_GMOCK=OFF",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_INSTALL_PREFIX={folder / 'prefix'}", *cross],
                ["cmake", "--build", str(folder / "build"), "--parallel", "2"],
                ["cmake", "--install", str(folder / "build")]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return next((folder / "prefix").rglob("GTestConfig.cmake")).parent


# the comparison data (what the Python plugins say for every case) of tests/test_cpp_plugins.py
from test_cpp_plugins import GTESTS, _run_gtest, built, cases, generated  # noqa: E402,F401


@pytest.mark.slow
@needs_aarch64
def test_the_aarch64_library_passes_its_tests_under_qemu(tmp_path, generated, cases, aarch64_gtest):  # noqa: F811
    """The cross-compiled library and its GoogleTest binary (with an aarch64 fake libcuda) against the same
    Python-side cases as the host build: every test runs under qemu-aarch64 and passes."""
    cxx = shutil.which("aarch64-linux-gnu-g++")
    configure = library.cmake_args(tmp_path, generated["dir"], library.find_headers(), "aarch64", cxx)
    configure = [a.replace("-DEDGETOK_BUILD_TESTS=OFF", "-DEDGETOK_BUILD_TESTS=ON") for a in configure]
    for cmd in ([*configure, f"-DGTest_DIR={aarch64_gtest}"], ["cmake", "--build", str(tmp_path), "--parallel", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    test, fake = tmp_path / "edgetok_plugins_test", tmp_path / "fake" / "libcuda.so.1"
    assert library.elf_platform(tmp_path / library.LIBRARY) == "aarch64" and library.elf_platform(fake) == "aarch64"
    done = _run_gtest({"test": test, "fake": fake}, cases, wrapper=("qemu-aarch64", "-L", AARCH64_SYSROOT))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "SKIPPED" not in done.stdout and "FAILED" not in done.stdout, done.stdout[-3000:]
    for name in GTESTS:
        assert f"[       OK ] {name} (" in done.stdout, name


# --- the C++ example program ----------------------------------------------------------------------------------------

CUDA_INCLUDE = next((Path(p) for p in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda")
                     if p and (Path(p) / "include" / "cuda_runtime_api.h").is_file()), None)


@pytest.mark.parametrize("include", _header_sets())
def test_the_example_program_compiles_against_every_header_set(tmp_path, include):
    """plugins/examples/ (the C++ program of the README's deployment section, and the register-on-load wrapper
    for Triton and DeepStream) compiles against each TensorRT header set (compile only: no libnvinfer to link
    against here, and no GPU to run it on)."""
    if CUDA_INCLUDE is None or shutil.which("g++") is None:
        pytest.skip("compiling the example needs g++ and the CUDA toolkit's headers (CUDA_HOME or /usr/local/cuda)")
    include = include or library.setup_headers_dir()
    if not (include / "NvInferRuntime.h").is_file():
        pytest.skip(f"no TensorRT headers at {include}")
    for source in ("run_engine.cpp", "register_on_load.cpp"):
        done = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-Wno-deprecated-declarations",
                               "-fsyntax-only", f"-I{include}", f"-I{CUDA_INCLUDE / 'include'}",
                               str(REPO / "plugins" / "examples" / source)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
