"""libedgetok_plugins.so (plugins/) against the Python plugins, without TensorRT or a GPU.

The library is generated from the specs and a real cubin bundle (edgetok.plugins.codegen), configured and
built once per session with cmake, with its GoogleTest binary and the fake libcuda.so.1 that records every
driver call. This module writes what the Python side says for every check case of every spec (output shapes,
serialized fields, formats, refusals, and the driver calls the Python launcher makes against the same fake
library, forwarded through ctypes at cuda-python's call boundary) into a folder the GoogleTest binary compares
the C++ library with; each GoogleTest test runs as one pytest test. Also: the library exports exactly its two
entry points, needs no TensorRT or CUDA library, and its test binary is clean under valgrind. (Compiling
against every TensorRT header set, and the aarch64 build under qemu, are tests/test_plugin_library.py's.)

Needs g++, cmake and GoogleTest (Debian/Ubuntu: apt-get install g++ cmake libgtest-dev); skipped, saying so,
only when g++ or cmake is absent.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgetok.plugins import codegen, cubins, kernels, launch
from edgetok.plugins.spec import Dynamic, PluginError, specs

_GTEST = any(Path(p).exists() for p in ("/usr/include/gtest/gtest.h", "/usr/local/include/gtest/gtest.h",
                                          "/usr/src/googletest/CMakeLists.txt"))
pytestmark = pytest.mark.skipif(not (shutil.which("g++") and shutil.which("cmake") and _GTEST),
                                reason="the C++ plugin library's tests need g++, cmake and GoogleTest "
                                       "(apt-get install g++ cmake libgtest-dev, as .ci/run does)")

ROOT = Path(__file__).resolve().parents[1]
SHARED_HEADERS = ROOT.parent / "shared" / "third_party" / "tensorrt"  # NVIDIA's headers, where this machine has them
ARCHS = ["sm86", "sm87", "sm120"]  # desktop CUDA 12, Tegra, desktop CUDA 13 (its cubins need a newer driver than its PTX)
GTESTS = ["Library.LoadsLikeTensorRTAndOffersFourCreators", "Spec.OutputShapesEqualThePythonRule",
          "Spec.FieldsRoundTripThroughSerialization", "Spec.SupportedFormatsEqualTheSpec",
          "Spec.BadFieldsAndShapesRefusedWithThePythonReasons", "Text.FloatsReadAsPythonReprs",
          "Launch.SameDriverCallsAsThePythonLauncher", "Launch.DriverErrorsAreOneLineAndANonZeroReturn",
          "Launch.BuildChosenPerGpuAsThePythonLauncherChoosesIt", "Launch.AGpuWithoutABuildIsRefusedInOneLine",
          "Launch.EnqueueAllocatesNothing"]
# the addresses both launchers are given (plugins/tests/test_plugins.cpp)
INPUTS, OUTPUTS, STRIDE, WORKSPACE, STREAM = 0x10000000, 0x20000000, 0x1000000, 0x40000000, 0x5000
TRT_DTYPES = {"float32": "kFLOAT", "float16": "kHALF", "bfloat16": "kBF16", "int32": "kINT32", "int64": "kINT64",
              "int8": "kINT8", "uint8": "kUINT8", "bool": "kBOOL"}
TRT_FORMATS = {"linear": "kLINEAR"}


def _headers() -> Path:
    """The headers the main build uses: what `edgetok plugins build --lib` would find (setup-provided on a fresh
    machine), else NVIDIA's 10.14 set beside the checkout."""
    try:
        from edgetok.plugins.library import find_headers

        return Path(find_headers().path)
    except Exception:
        if (SHARED_HEADERS / "10.14" / "NvInferRuntime.h").is_file():
            return SHARED_HEADERS / "10.14"
        raise


def _cmake(source: Path, build: Path, headers: Path, generated: Path, tests: bool, target: str | None = None) -> None:
    configure = ["cmake", "-S", str(source), "-B", str(build), f"-DTENSORRT_INCLUDE_DIR={headers}",
                 f"-DEDGETOK_GENERATED_DIR={generated}", f"-DEDGETOK_BUILD_TESTS={'ON' if tests else 'OFF'}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2", *(["--target", target] if target else [])]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


# Paths no kernel of today takes, given to some by editing the bundle's manifest (the cubins stay real): more
# than 48 KiB of shared memory (the opt-in through cuFuncSetAttribute) and hidden global/profile scratch (the
# pointers into the workspace after the plan's scratch). Both launchers read the same edited manifest.
MANIFEST_EDITS = {("sba_attend_d64", "sm87"): {"shared": 64 * 1024},
                  ("tome_match", "sm86"): {"global_scratch_size": 512, "profile_scratch_size": 128},
                  ("prune_gather", "sm120"): {"global_scratch_size": 64}}


def _edit_manifest(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    manifest = json.loads(members[cubins.MANIFEST])
    for (kernel, arch), values in MANIFEST_EDITS.items():
        manifest["kernels"][kernel]["archs"][arch].update(values)
    members[cubins.MANIFEST] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """The generated sources of a real bundle (cubins and PTX of ARCHS, from the cubin cache when it has them),
    its manifest edited as MANIFEST_EDITS says."""
    folder = tmp_path_factory.mktemp("cpp")
    bundle = folder / "plugins.cubins.zip"
    cubins.write_bundle(bundle, ARCHS, say=lambda s: None)
    _edit_manifest(bundle)
    out = folder / "generated"
    facts = codegen.generate(out, bundle)
    return {"dir": out, "bundle": bundle, "facts": facts}


@pytest.fixture(scope="session")
def built(generated, tmp_path_factory):
    build = tmp_path_factory.mktemp("cpp-build")
    _cmake(ROOT / "plugins", build, _headers(), generated["dir"], tests=True)
    return {"dir": build, "library": build / "libedgetok_plugins.so", "test": build / "edgetok_plugins_test",
            "fake": build / "fake" / "libcuda.so.1"}


# ---- the Python side -------------------------------------------------------------------------------------------

class ForwardingDriver:
    """cuda.bindings.driver as edgetok.plugins.launch calls it, each call forwarded through ctypes to the fake
    libcuda.so.1 the C++ library is run against: the same recorder hears both launchers."""

    CUstream = int

    def __init__(self, path: Path):
        from cuda.bindings import driver as real

        self.CUresult, self.CUdevice_attribute = real.CUresult, real.CUdevice_attribute
        self.CUfunction_attribute = real.CUfunction_attribute
        self.lib = ctypes.CDLL(str(path))

    def _r(self, err):
        return self.CUresult(err)

    def cuInit(self, flags):
        return (self._r(self.lib.cuInit(ctypes.c_uint(flags))),)

    def _out(self, fn, kind, *args):
        value = kind()
        err = fn(ctypes.byref(value), *args)
        return self._r(err), value.value

    def cuDriverGetVersion(self):
        return self._out(self.lib.cuDriverGetVersion, ctypes.c_int)

    def cuCtxGetCurrent(self):
        err, value = self._out(self.lib.cuCtxGetCurrent, ctypes.c_void_p)
        return err, value or 0

    def cuCtxGetDevice(self):
        return self._out(self.lib.cuCtxGetDevice, ctypes.c_int)

    def cuDeviceGetAttribute(self, attr, device):
        return self._out(self.lib.cuDeviceGetAttribute, ctypes.c_int, ctypes.c_int(int(attr)), ctypes.c_int(int(device)))

    def cuModuleLoadData(self, image):
        return self._out(self.lib.cuModuleLoadData, ctypes.c_void_p, ctypes.c_char_p(bytes(image)))

    def cuModuleGetFunction(self, module, name):
        return self._out(self.lib.cuModuleGetFunction, ctypes.c_void_p, ctypes.c_void_p(module), ctypes.c_char_p(name))

    def cuFuncGetAttribute(self, attr, fn):
        return self._out(self.lib.cuFuncGetAttribute, ctypes.c_int, ctypes.c_int(int(attr)), ctypes.c_void_p(fn))

    def cuFuncSetAttribute(self, fn, attr, value):
        return (self._r(self.lib.cuFuncSetAttribute(ctypes.c_void_p(fn), ctypes.c_int(int(attr)), ctypes.c_int(int(value)))),)

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        u = ctypes.c_uint
        return (self._r(self.lib.cuLaunchKernel(ctypes.c_void_p(fn), u(gx), u(gy), u(gz), u(bx), u(by), u(bz), u(shared),
                                                ctypes.c_void_p(int(stream) or None), ctypes.c_void_p(params),
                                                ctypes.c_void_p(extra or None))),)

    def cuGetErrorName(self, err):
        name = ctypes.c_char_p()
        status = self.lib.cuGetErrorName(ctypes.c_int(int(err)), ctypes.byref(name))
        return self._r(status), name.value


def _f32(value) -> float:
    return float(np.float32(value))


def _f32_bits(value) -> str:
    return f"{struct.unpack('<I', struct.pack('<f', value))[0]:08x}"


def _trt_fields(spec, given: dict) -> tuple[str, dict]:
    """Fields as TensorRT hands them to a creator (ints as INT32, floats as FLOAT32): the case-file spelling and
    what the Python plugin's create_plugin sees (numpy .item() of each)."""
    types = {f.name: f.type for f in spec.fields}
    text, seen = [], {}
    for name, value in given.items():
        if types.get(name, type(value)) is float or isinstance(value, float):
            text.append(f"{name}:f32:{_f32_bits(value)}")
            seen[name] = _f32(value)
        else:
            text.append(f"{name}:i32:{int(value)}")
            seen[name] = int(value)
    return ",".join(text), seen


def _timing_cache_id(spec, fields: dict) -> str:
    """The Python plugin's timing_cache_id: from its class where TensorRT-RTX is installed (tools/setup.sh),
    else its formula (edgetok.plugins.tensorrt)."""
    try:
        import tensorrt_rtx

        from edgetok.plugins.tensorrt import _classes
    except ImportError:
        return f"edgetok::{spec.name}/{spec.version}/" + ",".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return _classes(tensorrt_rtx)[0](spec, fields, None).timing_cache_id


def _shapes_text(shapes) -> str:
    return ";".join("x".join(str(int(d)) for d in s) for s in shapes)


class _Expr:
    """What the C++ test double of IExprBuilder writes for an expression, built the Python plugin's way
    (tensorrt._Dim: + and - of dims and ints, an int lifted to a constant, the dim first in ``int + dim``)."""

    def __init__(self, text: str, value: int):
        self.text, self.value = text, value

    @staticmethod
    def lift(x):
        return x if isinstance(x, _Expr) else _Expr(str(int(x)), int(x))

    def __add__(self, other):
        other = _Expr.lift(other)
        return _Expr(f"({self.text}+{other.text})", self.value + other.value)

    __radd__ = __add__

    def __sub__(self, other):
        other = _Expr.lift(other)
        return _Expr(f"({self.text}-{other.text})", self.value - other.value)

    def __rsub__(self, other):
        return _Expr.lift(other) - self


def _shape_line(name, spec, case, fields_text, fields, shapes) -> list:
    dims = [[_Expr(f"in{i}.{j}", int(d)) for j, d in enumerate(s)] for i, s in enumerate(shapes)]
    declared: dict[int, _Expr] = {}

    def expr(d):
        if isinstance(d, Dynamic):
            if d.size_output not in declared:
                opt, upper = _Expr.lift(d.opt), _Expr.lift(d.upper)
                declared[d.size_output] = _Expr(f"size{d.size_output}[{opt.text}|{upper.text}]", upper.value)
            return declared[d.size_output]
        return _Expr.lift(d)

    outs = [[expr(d) for d in shape] for shape in spec.output_shapes(dims, fields)]
    values = spec.concrete_shapes(shapes, fields)
    assert [[e.value for e in o] for o in outs] == values
    return ["shape", name, case, fields_text, _shapes_text(shapes), ";".join(",".join(e.text for e in o) for o in outs),
            ";".join("x".join(map(str, v)) for v in values), ",".join(TRT_DTYPES[t.dtypes[0]] for t in spec.outputs)]


def _refusals(name, spec, shapes, fields: dict) -> list[list]:
    """Bad (and borderline) calls around one check case: every field at odd values, each input dim changed, a
    rank and an input missing, other dtypes, unknown fields; with what the Python plugin says for each."""
    ints = [-1, 0, 1, 2, 3, 7, 15, 16, 48, 64, 1000, 2**31 - 1]
    floats = [-1.0, 0.0, -0.0, 0.5, 0.95, 1.0, 1.5, float("nan"), float("inf"), float("-inf"), 1e-45, 3e38]
    variants = []
    for f in spec.fields:
        values = ints + [1.5, 2.0, float("nan")] if f.type is int else floats + [2, -3]
        variants += [({**fields, f.name: v}, shapes, None) for v in values]
    for i, s in enumerate(shapes):
        for j in range(len(s)):
            for delta in (1, -s[j]):
                changed = [list(x) for x in shapes]
                changed[i][j] += delta
                variants.append((fields, changed, None))
        variants.append((fields, [list(x) for x in shapes[:i]] + [list(s[:-1])] + [list(x) for x in shapes[i + 1:]], None))
    variants.append((fields, [list(x) for x in shapes[:-1]], None))
    for dtype in ("float16", "int32", "int64"):
        variants.append((fields, shapes, [dtype] + ["float32"] * (len(shapes) - 1)))
        variants.append((fields, shapes, ["float32"] * (len(shapes) - 1) + [dtype]))
    variants.append(({**fields, "bogus": 1}, shapes, None))
    variants.append(({"zeta": 1.0, "alpha": 2, **fields}, shapes, None))
    rows = []
    for given, call_shapes, dtypes in variants:
        dtypes = dtypes or ["float32"] * len(call_shapes)
        text, seen = _trt_fields(spec, given)
        try:
            resolved = spec.resolve(seen)
        except PluginError as exc:
            stage, message = "create", str(exc)
        except (OverflowError, ValueError):  # spec.resolve raises these for int(inf): no message to compare with
            continue
        else:
            try:
                spec.validate([tuple(s) for s in call_shapes], resolved, dtypes)
                stage, message = "ok", ""
            except PluginError as exc:
                stage, message = "configure", str(exc)
        assert "\n" not in message
        rows.append(["refuse", name, text, _shapes_text(call_shapes), ",".join(TRT_DTYPES[d] for d in dtypes), stage, message])
    return rows


SCENARIOS = [  # (compute capability, driver, refused cubin result): which image each case's launches use
    (86, 13000, 0),   # sm86 cubins
    (87, 12060, 0),   # Orin: the sm87 (Tegra) cubins under JetPack 6's driver
    (89, 12080, 0),   # an sm89 GPU runs the sm86 build
    (120, 12080, 0),  # RTX 50 on a CUDA 12.8 driver: the sm120 PTX, JIT-compiled
    (120, 13000, 0),  # ... on CUDA 13: the sm120 cubins
    (86, 12020, 200),  # a driver refusing a cubin as CUDA_ERROR_INVALID_IMAGE: the PTX instead
]
FAILURES = [  # (what the fake driver does wrong, scenario)
    ("EDGETOK_FAKE_CUDA_FAIL=cuLaunchKernel=700", 0),
    ("EDGETOK_FAKE_CUDA_FAIL=cuModuleLoadData=2", 0),
    ("EDGETOK_FAKE_CUDA_FAIL=cuModuleGetFunction=500", 0),
    ("EDGETOK_FAKE_CUDA_FAIL=cuCtxGetCurrent=201", 0),
    ("EDGETOK_FAKE_CUDA_FAIL=cuDeviceGetAttribute=1", 0),
    ("EDGETOK_FAKE_CUDA_CONTEXT=0", 0),
    ("EDGETOK_FAKE_CUDA_REFUSE=2", 5),  # refused for another reason than the image: no PTX fallback
]


def _set_env(env: str) -> None:
    for item in env.split(","):
        if item:
            key, value = item.split("=", 1)
            os.environ[key] = value


def _clear_env() -> None:
    for key in ("EDGETOK_FAKE_CUDA_FAIL", "EDGETOK_FAKE_CUDA_REFUSE", "EDGETOK_FAKE_CUDA_CONTEXT",
                "EDGETOK_FAKE_CUDA_CC", "EDGETOK_FAKE_CUDA_VERSION", "EDGETOK_FAKE_CUDA_LOG"):
        os.environ.pop(key, None)


def _launch_python(binding, launchers: dict, bundle, spec, shapes, fields, env: str, log: Path):
    """Run the Python launcher for one call against the fake driver, as the Python plugin's enqueue does."""
    _set_env(env)
    os.environ["EDGETOK_FAKE_CUDA_LOG"] = str(log)
    log.unlink(missing_ok=True)
    try:
        context = os.environ.get("EDGETOK_FAKE_CUDA_CONTEXT", "c0")
        launcher = launchers.setdefault(context, launch.Launcher(bundle))
        plan = kernels.module(spec).plan([tuple(s) for s in shapes], fields)
        launcher.run(plan, [INPUTS + i * STRIDE for i in range(len(shapes))],
                     [OUTPUTS + i * STRIDE for i in range(len(spec.outputs))], WORKSPACE, STREAM)
    finally:
        _clear_env()


@pytest.fixture(scope="session")
def cases(generated, built, tmp_path_factory):
    """The Python side of every comparison, in the folder the GoogleTest binary reads ($EDGETOK_TEST_CASES)."""
    folder = tmp_path_factory.mktemp("cpp-cases")
    bundle = cubins.Bundle.open(generated["bundle"])
    params = {}
    for name, kernel in bundle.manifest["kernels"].items():
        types = ["p" if p["type"].startswith("*") else {"i32": "i32", "fp32": "f32", "i64": "i64"}[p["type"]]
                 for p in kernel["params"]]
        for info in kernel["archs"].values():
            params[info.get("entry") or name] = types
    (folder / "params.txt").write_text("".join(f"{entry} {' '.join(t)}\n" for entry, t in params.items()))
    rows, rng = [], np.random.default_rng(0)
    binding = ForwardingDriver(built["fake"])
    launchers: dict = {}
    contexts = iter(range(0x1000, 0x100000))
    os.environ["EDGETOK_FAKE_CUDA_PARAMS"] = str(folder / "params.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "_driver", lambda: binding)
        n = 0
        for name, spec in specs().items():
            check_cases = spec.cases(rng)
            for index, (case, inputs, given) in enumerate(check_cases):
                shapes = [list(x.shape) for x in inputs]
                text, seen = _trt_fields(spec, spec.resolve(given))
                fields = spec.resolve(seen)
                spec.validate([tuple(s) for s in shapes], fields)
                rows.append(_shape_line(name, spec, case, text, fields, shapes))
                rows.append(["roundtrip", name, case, text, ",".join(
                    f"{f.name}:{'i32:' + str(int(fields[f.name])) if f.type is int else 'f32:' + _f32_bits(fields[f.name])}"
                    for f in spec.fields), _timing_cache_id(spec, fields)])
                cc, driver, refuse = SCENARIOS[index % len(SCENARIOS)]
                context = f"{next(contexts):x}"
                for again in (False, True):  # the second call in the same context: functions already loaded
                    env = (f"EDGETOK_FAKE_CUDA_CC={cc},EDGETOK_FAKE_CUDA_VERSION={driver},"
                           f"EDGETOK_FAKE_CUDA_CONTEXT={context}" + (f",EDGETOK_FAKE_CUDA_REFUSE={refuse}" if refuse else ""))
                    log = folder / f"python-{n}.log"
                    n += 1
                    _launch_python(binding, launchers, bundle, spec, shapes, fields, env, log)
                    workspace = launch.workspace_size(kernels.module(spec).plan([tuple(s) for s in shapes], fields), bundle)
                    rows.append(["launch", name, case + (" (again)" if again else ""), text, _shapes_text(shapes), env,
                                 log.name, str(workspace)])
            case, inputs, given = check_cases[0]
            shapes = [list(x.shape) for x in inputs]
            text, seen = _trt_fields(spec, spec.resolve(given))
            fields = spec.resolve(seen)
            for pos, tensor in enumerate(spec.inputs + spec.outputs):
                accepted = sorted(f"{TRT_DTYPES[d]}/{TRT_FORMATS[f]}" for d in tensor.dtypes for f in spec.formats)
                rows.append(["formats", name, text, _shapes_text(shapes), str(pos), " ".join(accepted)])
            for case, inputs, given in (check_cases[0], check_cases[-1]):
                rows += _refusals(name, spec, [list(x.shape) for x in inputs], dict(given))
            for failure, scenario in FAILURES:
                cc, driver, refuse = SCENARIOS[scenario]
                context = f"{next(contexts):x}"
                env = (f"EDGETOK_FAKE_CUDA_CC={cc},EDGETOK_FAKE_CUDA_VERSION={driver},EDGETOK_FAKE_CUDA_CONTEXT={context},"
                       + failure)
                with pytest.raises(PluginError) as failed:
                    _launch_python(binding, launchers, bundle, spec, shapes, fields, env, folder / "python-fail.log")
                rows.append(["fail", name, case, text, _shapes_text(shapes), env, str(failed.value)])
    targets = {a: v.get("target") for a, v in bundle.manifest["archs"].items()}
    for capability in range(30, 131):  # every compute capability: the build launch.select_arch picks, or none
        try:
            arch = launch.select_arch(capability, bundle.archs, "bundle", targets)
        except PluginError:
            arch = "-"
        rows.append(["select", str(capability), arch])
    reprs = [0.1, 100000.0, 1e16, 1e15, 1e-5, 1e-4, 0.0001234, 123456789.125, 1e22, 5e-324, 2.5e-7, -3.75, 0.0, -0.0,
             _f32(0.95), _f32(0.9), _f32(1e-45), _f32(3e38), 1.0, 2.0, 1234567890123456.0, 12345678901234567.0]
    reprs += list(np.exp(rng.uniform(-60, 60, 300)) * rng.choice([-1, 1], 300))
    rows += [["repr", f"{struct.unpack('<Q', struct.pack('<d', float(v)))[0]:016x}", repr(float(v))] for v in reprs]
    (folder / "cases.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    return {"dir": folder, "rows": rows}


def _run_gtest(built, cases, *args, wrapper=(), timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGETOK_TEST_CASES": str(cases["dir"]), "EDGETOK_LIBCUDA": str(built["fake"])}
    return subprocess.run([*wrapper, str(built["test"]), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("name", GTESTS)
def test_cpp_library_agrees_with_the_python_plugins(built, cases, name):
    """One GoogleTest test of plugins/tests/test_plugins.cpp: it ran (not skipped) and passed."""
    done = _run_gtest(built, cases, f"--gtest_filter={name}")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "[  PASSED  ] 1 test." in done.stdout and "SKIPPED" not in done.stdout, done.stdout[-3000:]


def test_every_gtest_is_run_here(built, cases):
    """GTESTS lists every test of the binary (one added in C++ but not here would never run in CI)."""
    listed = _run_gtest(built, cases, "--gtest_list_tests").stdout.splitlines()
    found, suite = [], ""
    for line in listed:
        if line and not line.startswith(" "):
            suite = line.split()[0]
        elif line.strip():
            found.append(suite + line.split()[0])
    assert sorted(found) == sorted(GTESTS)


def test_cases_cover_every_plugin_and_path(cases):
    """The comparison data is not vacuous: every plugin has shape, launch, refusal and failure lines; the
    launches include TokenPrune's size-tensor count, PTX and cubin loads, and refusals at both stages."""
    rows = cases["rows"]
    for name in specs():
        for kind in ("shape", "roundtrip", "formats", "launch", "fail"):
            assert any(r[0] == kind and r[1] == name for r in rows), (kind, name)
        stages = {r[5] for r in rows if r[0] == "refuse" and r[1] == name}
        assert stages == {"create", "configure", "ok"}, (name, stages)
    logs = "".join((cases["dir"] / r[6]).read_text() for r in rows if r[0] == "launch")
    for needle in ("launch prune_count", "launch prune_gather", "load ptx", "load cubin", "launch tome_merge",
                   "launch bsa_sparse_d128", "launch sba_attend_d64", "setattr sba_attend_d64 8 100352",
                   "getattr 1 sba_attend_d64"):
        assert needle in logs, needle
    hidden = [line for line in logs.splitlines() if line.startswith("launch tome_match") and not line.endswith("(nil) (nil)")]
    assert hidden and all(not line.endswith("(nil)") for line in hidden)  # both hidden scratch pointers set
    assert any("size2[" in r[5] for r in rows if r[0] == "shape" and r[1] == "TokenPrune")


def test_exports_exactly_the_two_entry_points(built):
    done = subprocess.run(["nm", "-D", "--defined-only", str(built["library"])], capture_output=True, text=True, check=True)
    assert sorted(line.split()[-1] for line in done.stdout.splitlines() if line.strip()) == ["getCreators", "setLoggerFinder"]


def test_links_no_tensorrt_or_cuda_library(built):
    done = subprocess.run(["readelf", "-d", str(built["library"])], capture_output=True, text=True, check=True)
    needed = sorted(line.split("[")[1].rstrip("]") for line in done.stdout.splitlines() if "(NEEDED)" in line)
    assert needed and all(n.startswith(("libstdc++", "libgcc_s", "libc.", "libm.", "libdl.", "ld-linux")) for n in needed), needed
    ldd = subprocess.run(["ldd", str(built["library"])], capture_output=True, text=True, check=True).stdout
    for lib in ("libnvinfer", "libcudart", "libcuda.", "libtensorrt"):
        assert lib not in ldd, ldd


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind is not installed (apt-get install valgrind)")
def test_test_binary_is_clean_under_valgrind(built, cases):
    """Every GoogleTest test (creators, plugins, clones, refusals, all launches and failures) leaks nothing and
    reads no uninitialised memory."""
    # the test binary replaces operator new (to count enqueue's allocations) with malloc: valgrind is told to
    # track that malloc rather than intercept the replacement (else new and delete would not match)
    done = _run_gtest(built, cases, wrapper=("valgrind", "--soname-synonyms=somalloc=nouserintercepts", "--leak-check=full",
                                             "--show-leak-kinds=definite,indirect,possible",
                                             "--errors-for-leak-kinds=definite,indirect,possible", "--error-exitcode=9"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in done.stderr, done.stderr[-2000:]


def test_generated_record_names_the_bundle(generated):
    facts = json.loads((generated["dir"] / "generated.json").read_text())
    assert facts["archs"] == ARCHS and facts["source"] == cubins.Bundle.open(generated["bundle"]).manifest["source"]
    assert facts["kernels"] == [k.name for s in specs().values() for k in kernels.module(s).KERNELS]


def test_codegen_refuses_a_shape_rule_it_cannot_express():
    """Only +, - of dims, fields and ints are generated: anything else is refused in one line, not miscompiled."""
    spec = specs()["TokenMerge"]
    odd = type(spec)(**{**spec.__dict__, "output_shapes": lambda dims, f: [[dims[0][0] * 2, dims[0][1], dims[0][2]],
                                                                            [dims[0][0], dims[0][1], 1]]})
    with pytest.raises(PluginError, match="other than \\+ and -"):
        codegen.shape_program(odd)
    program = codegen.shape_program(spec)
    r = [f.name for f in spec.fields].index("r")
    assert program[0][1] == [codegen.OP_SUB, codegen.OP_INPUT, 0, 1, codegen.OP_FIELD, r]
