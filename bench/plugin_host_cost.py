"""Host time per plugin enqueue, C++ (libedgetok_plugins.so) vs Python (edgetok.plugins.tensorrt), DeiT-S
shapes at batch 1, against the fake libcuda.so.1 of plugins/tests: no GPU, so what is timed is exactly the
host work of one call (launch plan, argument packing, the driver calls), which on a GPU comes before any
kernel runs.

C++: bench/plugin_host_cost.cpp loads the library as TensorRT does (dlopen, getCreators), makes the plugin
with createPlugin and times IPluginV3OneRuntime::enqueue. Python: the body of the Python plugin's enqueue
(the plugin's launch plan, then edgetok.plugins.launch.Launcher.run) with the real cuda-python bindings,
which load the same fake driver (given cuGetProcAddress_v2 here, as cuda-python needs it). The Python
number leaves out pybind11's trampoline from TensorRT into Python, so it is a lower bound.
Target (issue 24): C++ <= 10 us per call and >= 30x below Python.

    .venv/bin/python bench/plugin_host_cost.py [--lib DIR/libedgetok_plugins.so] [--rounds 20] [--calls 500]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# DeiT-S (384 channels, 6 heads of 64), batch 1: each plugin where the model first meets it
CASES = {
    "TokenMerge": ({"r": ("i", 13), "prefix": ("i", 1), "class_token": ("i", 1)},
                   [(1, 197, 384), (1, 197, 64), (1, 197, 1)]),
    "SizeBiasedAttention": ({"scale": ("f", 0.0)}, [(1, 6, 184, 64)] * 3 + [(1, 184, 1)]),
    "TokenPrune": ({"prefix": ("i", 1)}, [(1, 197, 384), (1, 197, 1), (1, 197)]),
    "BlockSparseAttention": ({"scale": ("f", 0.0), "block": ("i", 64), "mass": ("f", 0.95), "keep": ("f", 0.0),
                              "prefix": ("i", 1)}, [(1, 6, 197, 64)] * 3 + [(1, 197, 1)]),
}
# The test fake as a timing driver: cuda-python resolves every driver function through cuGetProcAddress_v2,
# which the fake does not have; and the fake's cuLaunchKernel reads its parameter-type file and formats a log
# line on every launch (tens of microseconds, the fake's cost, not the plugin's), so unless a log is asked for
# the launch returns at once, as an asynchronous launch into a stream returns
SHIM = r'''#define cuLaunchKernel recording_cuLaunchKernel
#include "%s"
#undef cuLaunchKernel
#include <string.h>
CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
    unsigned shared, void* stream, void** params, void** extra)
{
    if (getenv("EDGETOK_FAKE_CUDA_LOG"))
        return recording_cuLaunchKernel(fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra);
    return 0;
}
static const struct { const char* name; void* fn; } kTable[] = {
    {"cuInit", (void*) cuInit}, {"cuDriverGetVersion", (void*) cuDriverGetVersion},
    {"cuCtxGetCurrent", (void*) cuCtxGetCurrent}, {"cuCtxGetDevice", (void*) cuCtxGetDevice},
    {"cuDeviceGetAttribute", (void*) cuDeviceGetAttribute}, {"cuModuleLoadData", (void*) cuModuleLoadData},
    {"cuModuleGetFunction", (void*) cuModuleGetFunction}, {"cuFuncGetAttribute", (void*) cuFuncGetAttribute},
    {"cuFuncSetAttribute", (void*) cuFuncSetAttribute}, {"cuLaunchKernel", (void*) cuLaunchKernel},
    {"cuGetErrorName", (void*) cuGetErrorName}};
CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version, unsigned long long flags, int* status)
{
    for (unsigned i = 0; i < sizeof(kTable) / sizeof(kTable[0]); ++i)
        if (strcmp(symbol, kTable[i].name) == 0) { *pfn = kTable[i].fn; if (status) *status = 0; return 0; }
    *pfn = NULL;
    if (status) *status = 1;
    return 500; /* CUDA_ERROR_NOT_FOUND */
}
'''


def _params_file(bundle, path: Path) -> None:
    """How the fake driver reads each kernel's parameters (it refuses launches of kernels not listed)."""
    kinds = {"i32": "i32", "fp32": "f32", "i64": "i64"}
    lines = []
    for name, kernel in bundle.manifest["kernels"].items():
        types = ["p" if p["type"].startswith("*") else kinds[p["type"]] for p in kernel["params"]]
        for info in kernel["archs"].values():
            lines.append(f"{info.get('entry') or name} {' '.join(types)}\n")
    path.write_text("".join(lines))


def python_cost(bundle_path: str, rounds: int, calls: int) -> dict:
    """Run in a child process whose libcuda.so.1 is the fake (LD_LIBRARY_PATH): ns per call per plugin."""
    from edgetok.plugins import kernels
    from edgetok.plugins.cubins import Bundle
    from edgetok.plugins.launch import Launcher
    from edgetok.plugins.spec import specs

    launcher = Launcher(Bundle.open(bundle_path))
    found = {}
    for name, (fields, shapes) in CASES.items():
        if os.environ.get("EDGETOK_HOST_COST_ONLY", name) != name:
            continue
        spec = specs()[name]
        given = spec.resolve({k: v for k, (_, v) in fields.items()})
        plan_of = kernels.module(spec).plan
        inputs = [0x10000000 + 0x1000000 * i for i in range(len(shapes))]
        outputs = [0x20000000 + 0x1000000 * i for i in range(len(spec.outputs))]

        def enqueue():  # what the Python plugin's enqueue does
            launcher.run(plan_of([tuple(s) for s in shapes], given), inputs, outputs, 0x40000000, 0x5000)

        enqueue()  # loads the modules: not timed
        per_call = []
        for _ in range(rounds):
            start = time.perf_counter_ns()
            for _ in range(calls):
                enqueue()
            per_call.append((time.perf_counter_ns() - start) / calls)
        found[name] = statistics.median(per_call)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", help="libedgetok_plugins.so to time (default: build one for sm86 here)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--python-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.python_child:
        print(json.dumps(python_cost(args.python_child, args.rounds, max(1, args.calls // 10))))
        return

    from edgetok.plugins import cubins, library

    with tempfile.TemporaryDirectory(prefix="edgetok-host-cost-") as tmp:
        tmp = Path(tmp)
        bundle = tmp / "sm86.cubins.zip"
        cubins.write_bundle(bundle, ["sm86"], say=lambda s: None)
        lib = Path(args.lib) if args.lib else Path(library.build(tmp / "lib", bundle=bundle)["path"])
        fake = tmp / "fake"
        fake.mkdir()
        (fake / "shim.c").write_text(SHIM % (ROOT / "plugins" / "tests" / "fake_libcuda.c"))
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(fake / "libcuda.so.1"), str(fake / "shim.c")],
                       check=True)
        headers = library.find_headers()
        exe = tmp / "plugin_host_cost"
        subprocess.run(["g++", "-O2", "-std=c++17", "-Wno-deprecated-declarations", f"-I{headers.path}",
                        f"-I{ROOT / 'plugins' / 'cuda_stub'}", str(ROOT / "bench" / "plugin_host_cost.cpp"),
                        "-o", str(exe), "-ldl"], check=True)
        _params_file(cubins.Bundle.open(bundle), tmp / "params.txt")
        env = {**os.environ, "EDGETOK_LIBCUDA": str(fake / "libcuda.so.1"), "EDGETOK_FAKE_CUDA_CC": "86",
               "EDGETOK_FAKE_CUDA_PARAMS": str(tmp / "params.txt"), "LD_LIBRARY_PATH": str(fake)}
        env.pop("EDGETOK_FAKE_CUDA_LOG", None)
        def run_cpp(name, rounds, calls, run_env):
            fields, shapes = CASES[name]
            text = ",".join(f"{k}:{kind}:{v}" for k, (kind, v) in fields.items())
            done = subprocess.run([str(exe), str(lib), name, text, ";".join("x".join(map(str, s)) for s in shapes),
                                   str(rounds), str(calls)], env=run_env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"C++ {name}: {done.stderr.strip() or done.stdout.strip()}")
            return float(done.stdout.split()[-1])

        def run_python(rounds, calls, run_env):
            done = subprocess.run([sys.executable, __file__, "--python-child", str(bundle), "--rounds", str(rounds),
                                   "--calls", str(calls)], env=run_env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"Python: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.stdout}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        # what one call launches, recorded by the fake (two calls each: the untimed first one and one timed)
        launches = {}
        for side in ("C++", "Python"):
            for name in CASES:
                log = tmp / f"{side}-{name}.log"
                logged = {**env, "EDGETOK_FAKE_CUDA_LOG": str(log)}
                if side == "C++":
                    run_cpp(name, 1, 1, logged)
                else:
                    run_python(1, 1, {**logged, "EDGETOK_HOST_COST_ONLY": name})
                lines = [line.split(" params")[0] for line in log.read_text().splitlines() if line.startswith("launch")]
                launches[side, name] = lines[len(lines) // 2:]
        cpp = {name: run_cpp(name, args.rounds, args.calls, env) for name in CASES}
        python = run_python(args.rounds, args.calls, env)
        record = library.read_record(lib)
    print(f"host time per enqueue, DeiT-S shapes, batch 1, fake driver; median of {args.rounds} rounds "
          f"(C++ {args.calls} calls a round, Python {max(1, args.calls // 10)}); library {lib.name} "
          f"({record['platform']}, TensorRT {record['tensorrt_headers']['version']} headers), {shutil.which('g++')}")
    print(f"{'plugin':22s} {'launches':>8s} {'C++ us':>8s} {'Python us':>10s} {'ratio':>7s}")
    for name in CASES:
        same = launches["C++", name] == launches["Python", name]
        count = f"{len(launches['C++', name])}" + ("" if same else f"/{len(launches['Python', name])} DIFFER")
        print(f"{name:22s} {count:>8s} {cpp[name] / 1e3:8.2f} {python[name] / 1e3:10.1f} {python[name] / cpp[name]:6.0f}x")


if __name__ == "__main__":
    main()
