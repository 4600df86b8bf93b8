"""libedgetok_plugins.so, the C++ plugin library: where its TensorRT headers come from, how it is built with
the host's g++ (or the aarch64 cross g++), and how an engine build or a runner finds the library for its
platform and knows it is the right one.

Why a library at all: TensorRT's own tools (trtexec, Triton Inference Server, DeepStream, C++ programs) can
only run engines whose plugins come from a shared library, and a C++ ``enqueue`` costs microseconds where the
Python plugin classes (``edgetok.plugins.tensorrt``) cost a third of a millisecond.

No nvcc is needed: the device code is the Triton cubins of a bundle (``edgetok.plugins.cubins``), which the
generator (``edgetok.plugins.codegen``) embeds as C++ sources beside the field tables and launch plans it
writes from the Python specs. The library records, beside itself as ``libedgetok_plugins.so.json``, the
TensorRT header version it was compiled against, its platform and GPU architectures, the kernel sources
hash (``cubins.source_key``) and its own SHA-256: a build uses a library only when these match what it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as _platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from edgetok.errors import EdgetokError

LIBRARY = "libedgetok_plugins.so"
RECORD_SUFFIX = ".json"  # the record of DIR/libedgetok_plugins.so is DIR/libedgetok_plugins.so.json

# platform -> the g++ that builds for it, the ELF e_machine of its libraries, where its TensorRT installs headers
PLATFORMS = {
    "x86_64": {"compiler": "x86_64-linux-gnu-g++", "native": "g++", "elf_machine": 62,
               "apt": "g++", "installed": "/usr/include/x86_64-linux-gnu"},
    "aarch64": {"compiler": "aarch64-linux-gnu-g++", "native": "g++", "elf_machine": 183,
                "apt": "g++-aarch64-linux-gnu", "installed": "/usr/include/aarch64-linux-gnu"},
}

# NVIDIA's TensorRT 10.14 headers, as bundled in a PyPI wheel (plugin-facing files byte-identical to NVIDIA's
# release/10.14 include/; its NvInferPlugin.h is a stub, which the library does not include).
HEADERS_WHEEL = "kernel-lens==2.0.1"
HEADERS_WHEEL_FILE = "kernel_lens-2.0.1-py3-none-any.whl"
HEADERS_WHEEL_SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
HEADERS_IN_WHEEL = "kernel_lens/include/tensorrt/"
# the headers a plugin library compiles against: a folder without them is not a TensorRT include folder
REQUIRED_HEADERS = ("NvInferRuntimePlugin.h", "NvInferRuntime.h", "NvInferVersion.h")


def host_platform() -> str:
    machine = _platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _check_platform(name: str) -> str:
    if name not in PLATFORMS:
        raise EdgetokError(f"--platform {name!r} is unknown; choose {' or '.join(PLATFORMS)}")
    return name


# --- headers -------------------------------------------------------------------------------------------------

def setup_headers_dir() -> Path:
    """Where tools/setup.sh unpacks the wheel's headers: inside the environment edgetok runs in."""
    return Path(sys.prefix) / "share" / "edgetok" / "tensorrt-include"


def installed_headers_dirs() -> list[Path]:
    """Where an installed TensorRT (Debian packages, JetPack) puts NvInfer.h on this machine."""
    return [Path(PLATFORMS[host_platform()]["installed"])] if host_platform() in PLATFORMS else []


def header_version(folder: str | Path) -> str:
    """TensorRT's version as its NvInferVersion.h states it ("10.14.1.48"); newer headers define the
    NV_TENSORRT_* macros through TRT_*_ENTERPRISE ones, which are followed."""
    path = Path(folder) / "NvInferVersion.h"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        raise EdgetokError(f"{folder} has no NvInferVersion.h; give TensorRT's include folder") from None
    defines = dict(re.findall(r"^\s*#\s*define\s+(\w+)\s+(\w+)", text, re.M))

    def value(name: str) -> str | None:
        seen = set()
        while name in defines and name not in seen:
            seen.add(name)
            name = defines[name]
        return name if name.isdigit() else None

    parts = [value(f"NV_TENSORRT_{p}") for p in ("MAJOR", "MINOR", "PATCH", "BUILD")]
    if None in parts[:2]:
        raise EdgetokError(f"{path} does not define NV_TENSORRT_MAJOR/MINOR; give TensorRT's include folder")
    return ".".join(p for p in parts if p is not None)


class Headers:
    """A TensorRT include folder, its version, and why it was chosen."""

    def __init__(self, path: Path, source: str):
        self.path, self.source = Path(path), source
        self.version = header_version(self.path)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "version": self.version, "source": self.source}


def _missing_headers(folder: Path) -> str | None:
    lacking = [h for h in REQUIRED_HEADERS if not (folder / h).is_file()]
    return lacking[0] if lacking else None


def find_headers(given: str | Path | None = None) -> Headers:
    """The TensorRT headers to compile against, in order: ``given`` (--tensorrt-include), $TENSORRT_INCLUDE_DIR,
    an installed TensorRT, the headers tools/setup.sh unpacked. A folder the user named that lacks them is an
    error, not a reason to look elsewhere: the user meant that one."""
    for value, label in ((given, "--tensorrt-include"), (os.environ.get("TENSORRT_INCLUDE_DIR"), "$TENSORRT_INCLUDE_DIR")):
        if value:
            folder = Path(value)
            lacking = _missing_headers(folder)
            if lacking:
                raise EdgetokError(f"{label} {value} has no {lacking}; give TensorRT's include folder (the one "
                                   "with NvInfer.h and NvInferRuntimePlugin.h)")
            return Headers(folder, label)
    for folder in installed_headers_dirs():
        if (folder / "NvInfer.h").is_file() and not _missing_headers(folder):
            return Headers(folder, "installed TensorRT")
    folder = setup_headers_dir()
    if not _missing_headers(folder):
        return Headers(folder, f"{HEADERS_WHEEL} (tools/setup.sh)")
    raise EdgetokError("no TensorRT headers found: give --tensorrt-include DIR (or set TENSORRT_INCLUDE_DIR) to "
                       "TensorRT's include folder, install TensorRT, or run tools/setup.sh, which unpacks NVIDIA's "
                       f"10.14 headers from the PyPI wheel {HEADERS_WHEEL} into {folder}")


def install_headers(target: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """Unpack NVIDIA's TensorRT 10.14 headers from the pinned wheel (downloaded with pip when ``wheel`` is not
    given) into ``target`` (default: ``setup_headers_dir()``). The wheel is checked against its SHA-256
    before anything is read from it."""
    target = Path(target) if target else setup_headers_dir()
    with tempfile.TemporaryDirectory(prefix="edgetok-headers-") as tmp:
        if wheel is None:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                                   HEADERS_WHEEL], capture_output=True, text=True)
            wheel = Path(tmp) / HEADERS_WHEEL_FILE
            if done.returncode != 0 or not wheel.is_file():
                reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise EdgetokError(f"pip download {HEADERS_WHEEL} failed ({reason}); give --tensorrt-include DIR "
                                   "to a TensorRT include folder instead")
        wheel = Path(wheel)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != HEADERS_WHEEL_SHA256:
            raise EdgetokError(f"{wheel.name} has SHA-256 {digest}, not the pinned {HEADERS_WHEEL_SHA256}; not "
                               "unpacking it (a changed or corrupted download)")
        staged = Path(tmp) / "include"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(HEADERS_IN_WHEEL) and name.endswith(".h") and "/" not in name[len(HEADERS_IN_WHEEL):]:
                    (staged / name[len(HEADERS_IN_WHEEL):]).write_bytes(z.read(name))
        lacking = _missing_headers(staged)
        if lacking:
            raise EdgetokError(f"{wheel.name} has no {HEADERS_IN_WHEEL}{lacking}; give --tensorrt-include DIR instead")
        (staged / "SOURCE").write_text(f"NVIDIA TensorRT {header_version(staged)} headers (Apache-2.0) from the PyPI "
                                       f"wheel {HEADERS_WHEEL} (sha256 {HEADERS_WHEEL_SHA256}), {HEADERS_IN_WHEEL}\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        shutil.copytree(staged, target)
        shutil.rmtree(old, ignore_errors=True)
    return target


# --- the library and its record --------------------------------------------------------------------------------

def default_dir(platform: str | None = None) -> Path:
    """Where `edgetok plugins build --lib` puts the library when no -o is given, and where build-engine,
    profile and eval look for it: $EDGETOK_CACHE/plugins/<platform> (EDGETOK_CACHE: ~/.cache/edgetok)."""
    root = Path(os.environ.get("EDGETOK_CACHE") or Path.home() / ".cache" / "edgetok")
    return root / "plugins" / _check_platform(platform or host_platform())


def record_path(library: str | Path) -> Path:
    return Path(f"{library}{RECORD_SUFFIX}")


def elf_platform(path: str | Path) -> str | None:
    """The platform an ELF shared library is built for (None: not an ELF file, or another machine)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return next((name for name, p in PLATFORMS.items() if p["elf_machine"] == machine), None)


def read_record(library: str | Path) -> dict:
    """The library's record; a library without one (or with a damaged one) is refused, naming the rebuild."""
    path = record_path(library)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgetokError(f"{library} has no record {path.name} beside it; build the library with edgetok plugins "
                           "build --lib (the record says which kernels and GPUs it carries)") from None
    except (OSError, ValueError) as exc:
        raise EdgetokError(f"{path} is not a readable record ({type(exc).__name__}); rebuild the library with "
                           "edgetok plugins build --lib") from None


def check(library: str | Path, platform: str | None = None, archs: list[str] | None = None,
          kernels: str | None = None, option: str = "--plugin-lib") -> dict:
    """The record of ``library`` if it can serve: an intact file for ``platform`` (default: this machine's),
    built from these kernel sources (``kernels``: cubins.source_key(), default: the current ones) with cubins
    for every architecture of ``archs``. Otherwise one line naming what is wrong and the rebuild."""
    from edgetok import sidecar

    platform = _check_platform(platform or host_platform())
    path = Path(library)
    if not path.is_file():
        raise EdgetokError(f"{option} {library} does not exist; build it with edgetok plugins build --lib")
    built_for = elf_platform(path)
    if built_for is None:
        raise EdgetokError(f"{option} {library} is not a Linux x86_64 or aarch64 shared library; give the "
                           f"{LIBRARY} that edgetok plugins build --lib wrote")
    if built_for != platform:
        raise EdgetokError(f"{option} {library} is built for {built_for}, but this build runs on {platform}; use the "
                           f"{platform} library (edgetok plugins build --lib --platform {platform})")
    record = read_record(path)
    if record.get("sha256") != sidecar.file_sha256(path):
        raise EdgetokError(f"{option} {library} changed after it was built (its SHA-256 is not the one in "
                           f"{record_path(path).name}); rebuild it with edgetok plugins build --lib")
    if kernels is None:
        from edgetok.plugins.cubins import source_key

        kernels = source_key()
    if record.get("kernels") != kernels:
        raise EdgetokError(f"{option} {library} was built from other plugin kernel sources ({record.get('kernels')}, "
                           f"these are {kernels}); rebuild it with edgetok plugins build --lib")
    lacking = [a for a in archs or [] if a not in record.get("archs", [])]
    if lacking:
        raise EdgetokError(f"{option} {library} has no {lacking[0]} kernels (it carries "
                           f"{', '.join(record.get('archs', []))}); rebuild it with edgetok plugins build --lib "
                           f"--arch {','.join(sorted(set(record.get('archs', [])) | set(lacking)))}")
    return record


def find(platform: str | None = None) -> Path | None:
    """The library in the default place for ``platform`` (this machine's), if one was built there."""
    path = default_dir(platform) / LIBRARY
    return path if path.is_file() else None


def for_build(given: str | None, python: bool, archs: list[str],
              say: Callable[[str], object] = lambda s: None) -> tuple[Path, dict] | None:
    """The library an engine build loads for its edgetok nodes, with its record; None: the Python plugins.
    ``given`` (--plugin-lib) must serve, or the build stops; the default one serves when it can, else the
    build says why it is not used and falls back to the Python plugins (so an old library never blocks a
    build, and never slips into one)."""
    if given and python:
        raise EdgetokError("--plugin-lib and --python-plugins choose different plugin implementations; give one")
    if python:
        return None
    if given:
        return Path(given).resolve(), check(given, archs=archs)
    path = find()
    if path is None:
        return None
    try:
        return path, check(path, archs=archs, option="the plugin library")
    except EdgetokError as exc:
        say(f"not using {exc} (--python-plugins silences this); building with the Python plugins")
        return None


def build_note(record: dict, serialized: bool) -> str:
    """What a process needs to run an engine built with the library (recorded in its build report)."""
    if serialized:
        return ("edgetok C++ plugin library serialized into the engine: the runtime must allow engine host code "
                "(trtexec --loadEngine=E --versionCompatible; C++: IRuntime::setEngineHostCodeAllowed(true))")
    return (f"edgetok C++ plugin library: load {record['library']} ({record['platform']}) before deserializing "
            "(trtexec --dynamicPlugins=PATH, C++/Python: the plugin registry's loadLibrary; edgetok profile/eval "
            "find it in the default place or through $EDGETOK_PLUGIN_LIB)")


LIBRARY_ENV = "EDGETOK_PLUGIN_LIB"  # profile/eval: the library to load for engines built with one


def locate(report: dict, engine: str | Path) -> Path:
    """The library to load before deserializing ``engine``, whose build report's ``edgetok_plugins`` is
    ``report``: $EDGETOK_PLUGIN_LIB, else the library the build used, else one beside the engine, else the
    default one of this platform; the first that is for this platform and was built from the same kernel
    sources (another build of them, e.g. the aarch64 one on a Jetson, serves as well as the original)."""
    want = report["library"]
    candidates = [(os.environ.get(LIBRARY_ENV), f"${LIBRARY_ENV}"), (want.get("path"), "the build's library"),
                  (Path(engine).parent / LIBRARY, "the library beside the engine"), (find(), "the default library")]
    reasons = []
    for path, label in candidates:
        if not path or not Path(path).is_file():
            if label == f"${LIBRARY_ENV}" and path:
                raise EdgetokError(f"${LIBRARY_ENV} {path} does not exist; point it at a {LIBRARY}")
            continue
        try:
            check(path, kernels=report["kernels_digest"], option=label)
            return Path(path)
        except EdgetokError as exc:
            if label == f"${LIBRARY_ENV}":
                raise
            reasons.append(str(exc))
    raise EdgetokError(f"{Path(engine).name} was built with edgetok's C++ plugin library, and no usable {LIBRARY} "
                       f"is here ({reasons[0] if reasons else 'none found'}); build it with edgetok plugins build --lib "
                       f"or set ${LIBRARY_ENV}")


def load(trt, path: str | Path) -> None:
    """Load the library into ``trt``'s plugin registry (TensorRT calls its getCreators), as trtexec's
    --dynamicPlugins does; a file the dynamic loader refuses is named with the loader's reason."""
    import ctypes

    try:
        ctypes.CDLL(str(path))  # dlerror's reason (a missing symbol, another CPU) when it cannot load
    except OSError as exc:
        raise EdgetokError(f"cannot load the plugin library {path}: {exc}") from None
    if trt.get_plugin_registry().load_library(str(path)) is None:
        raise EdgetokError(f"{trt.__name__}'s plugin registry refused {path} (no getCreators?); rebuild it with "
                           "edgetok plugins build --lib")


# --- building --------------------------------------------------------------------------------------------------

def sources_dir() -> Path:
    """The CMake project (plugins/ at the repository root, beside the edgetok package)."""
    folder = Path(__file__).resolve().parents[2] / "plugins"
    if not (folder / "CMakeLists.txt").is_file():
        raise EdgetokError(f"the C++ plugin sources ({folder}) are not here: the library builds from a source "
                           "checkout of edgetok (git clone, then pip install -e .)")
    return folder


def compiler(platform: str) -> str:
    """The g++ that builds for ``platform``: the host's own for its platform, else the cross compiler."""
    info = PLATFORMS[platform]
    candidates = [info["native"], info["compiler"]] if platform == host_platform() else [info["compiler"]]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise EdgetokError(f"--platform {platform} needs {info['compiler']}, which is not installed: apt-get install "
                       f"{info['apt']}")


def _version_line(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return tool
    return (out.splitlines() or [tool])[0].strip()


def _run(cmd: list[str], what: str, log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        first = next((line.strip() for line in lines if "error" in line.lower() and not line.startswith("$")),
                     lines[-1] if lines else "")
        raise EdgetokError(f"{what} failed: {first[:300]}")


def cmake_args(build_dir: Path, generated: Path, headers: Headers, platform: str, cxx: str) -> list[str]:
    """The CMake configure command for ``platform``; aarch64 from another host is a cross build (CMake's
    system variables instead of a toolchain file, so no file outside plugins/ is needed)."""
    args = ["cmake", "-S", str(sources_dir()), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CXX_COMPILER={cxx}", f"-DTENSORRT_INCLUDE_DIR={headers.path}",
            f"-DEDGETOK_GENERATED_DIR={generated}", "-DEDGETOK_BUILD_TESTS=OFF"]
    if platform != host_platform():
        args += ["-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={platform}"]
        cc = shutil.which(cxx.replace("g++", "gcc"))
        if cc:
            args.append(f"-DCMAKE_C_COMPILER={cc}")
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return args


def build(out_dir: str | Path | None = None, archs: list[str] | None = None, platform: str | None = None,
          include: str | Path | None = None, say: Callable[[str], object] = lambda s: None,
          bundle: str | Path | None = None) -> dict:
    """Generate the sources from the specs and a cubin bundle (``bundle``, else one compiled for ``archs``),
    compile libedgetok_plugins.so for ``platform`` into ``out_dir`` (default: ``default_dir``) and write its
    record beside it; both appear whole or not at all. Returns the record."""
    from edgetok import atomic, sidecar
    from edgetok.plugins import cubins
    from edgetok.plugins.spec import NAMESPACE, specs

    platform = _check_platform(platform or host_platform())
    out = Path(out_dir) if out_dir else default_dir(platform)
    if out.exists() and not out.is_dir():
        raise EdgetokError(f"-o {out} is a file; give a folder (the library is written as {LIBRARY} in it)")
    cxx = compiler(platform)
    if shutil.which("cmake") is None:
        raise EdgetokError("building the plugin library needs CMake: apt-get install cmake (or pip install cmake)")
    headers = find_headers(include)
    say(f"TensorRT {headers.version} headers from {headers.source} ({headers.path})")
    from edgetok.plugins import codegen

    with atomic.staging_dir(out / LIBRARY) as stage:
        work = stage / "work"
        work.mkdir()
        if bundle is None:
            archs = cubins.parse_archs(",".join(archs) if archs else "all")
            say(f"plugin cubins for {', '.join(archs)}")
            bundle = work / "kernels.cubins.zip"
            cubins.write_bundle(bundle, archs, say=lambda text: text.startswith("wrote ") or say(text))
        manifest = cubins.Bundle.open(bundle).manifest
        generated = work / "generated"
        say("generating the C++ field tables, launch plans and embedded cubins from the specs")
        codegen.generate(generated, bundle)
        log = work / "build.log"
        say(f"compiling {LIBRARY} for {platform} with {Path(cxx).name}")
        _run(cmake_args(work / "build", generated, headers, platform, cxx), "cmake (configure)", log)
        _run(["cmake", "--build", str(work / "build"), "--target", "edgetok_plugins", "--parallel",
              str(os.cpu_count() or 2)], f"compiling {LIBRARY}", log)
        built = next(iter(sorted((work / "build").rglob(LIBRARY))), None)
        if built is None:
            raise EdgetokError(f"the CMake build wrote no {LIBRARY} (see plugins/CMakeLists.txt)")
        shutil.copyfile(built, stage / LIBRARY)
        record = sidecar.stamp({
            "kind": "plugin-library",
            "library": LIBRARY,
            "bytes": (stage / LIBRARY).stat().st_size,
            "sha256": sidecar.file_sha256(stage / LIBRARY),
            "platform": platform,
            "archs": sorted(manifest["archs"], key=lambda a: int(a[2:])),
            "kernels": manifest.get("source") or cubins.source_key(),  # the sources its cubins came from
            "bundle_sha256": sidecar.file_sha256(bundle),
            "triton": manifest.get("triton"),
            "tensorrt_headers": headers.as_dict(),
            "compiler": _version_line(cxx),
            "plugins": [{"name": name, "namespace": NAMESPACE, "version": spec.version}
                        for name, spec in sorted(specs().items())],
        })
        sidecar.write(stage / record_path(LIBRARY).name, record)
        shutil.rmtree(work)
        out.mkdir(parents=True, exist_ok=True)
        atomic.publish(stage, out)  # the library first, its record (.json) last
    return {**record, "path": str(out / LIBRARY)}


def describe(record: dict) -> str:
    headers = record["tensorrt_headers"]
    return "\n".join([
        f"wrote {record['path']} ({record['bytes'] / 1e6:.1f} MB) + {record_path(LIBRARY).name}",
        f"  platform   {record['platform']} ({record['compiler']})",
        f"  kernels    {', '.join(record['archs'])}; kernel sources {record['kernels']}",
        f"  TensorRT   {headers['version']} headers from {headers['source']}",
        "  plugins    " + ", ".join(f"{p['namespace']}::{p['name']} v{p['version']}" for p in record["plugins"]),
        f"  use        trtexec --dynamicPlugins={record['path']}; edgetok build-engine uses it by default"
        if Path(record["path"]).parent == default_dir(record["platform"]) else
        f"  use        trtexec --dynamicPlugins={record['path']}; edgetok build-engine --plugin-lib {record['path']}",
    ])


def _main(argv: list[str]) -> int:
    """``python -m edgetok.plugins.library install-headers [DIR]``: what tools/setup.sh runs."""
    if not argv or argv[0] != "install-headers":
        print("usage: python -m edgetok.plugins.library install-headers [DIR]", file=sys.stderr)
        return 2
    try:
        target = install_headers(argv[1] if len(argv) > 1 else None)
    except EdgetokError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"TensorRT {header_version(target)} headers from {HEADERS_WHEEL} in {target}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(_main(sys.argv[1:]))
