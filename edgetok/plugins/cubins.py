"""Ahead-of-time cubins of the plugin kernels, for every supported GPU, compiled on a machine without one.

``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` needs no driver, so one x86 machine with Triton
builds the cubins for Orin (sm87), Thor (sm110), RTX (sm86/89/120) and H100/H200 (sm90); the Jetson then
runs them through cuda-python without Triton or torch. What a launcher needs besides the cubin is in the
manifest: the parameters in order (the declared ones, then the two pointers Triton appends: global scratch
and profile scratch, checked against the PTX of every build), threads per block, dynamic shared memory and
scratch sizes. Builds are cached per Triton version and kernel source, and bundled into one zip beside an
engine (``bundle_path``).

Which driver can run them: Triton assembles sm86-sm90 with its CUDA 12 ptxas and sm110/sm120 with its CUDA 13
one; by CUDA's minor version compatibility a cubin loads on any driver of its assembler's major version or
newer (CUDA 13: R580+). The bundle also carries each kernel's PTX, written in the oldest PTX ISA that has the
target (never older than 8.0, CUDA 12.0), so that a driver too old for the cubin (an RTX 50 on R570, CUDA
12.8) JIT-compiles it instead (``edgetok.plugins.launch`` decides). The manifest records, per architecture,
the assembler and the driver each form needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from edgetok.atomic import staging_dir, write_text
from edgetok.plugins.spec import PluginError

FORMAT = 3  # 2: PTX parameter types recorded per kernel and arch; 3: PTX carried, assembler and drivers recorded
ARCHS = ("sm86", "sm87", "sm89", "sm90", "sm110", "sm120")
HIDDEN_PARAMS = (("global_scratch", "*i8"), ("profile_scratch", "*i8"))  # appended by Triton to every entry
MANIFEST = "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same cubins give the same bundle bytes

# The PTX ISA each architecture's PTX is written in (80: 8.0): the first ISA with its target (sm_XX, or sm_XXa,
# which Triton compiles for CC >= 90), but not older than OLDEST_PTX, CUDA 12.0's: the oldest driver family
# edgetok claims (desktop R525+, JetPack 6). A lower ISA changes no instruction: the SASS of tome_merge,
# tome_match and prune_gather was identical at ISA 8.0 and 8.8 (sm86), 8.7 and 9.3 (sm120), 9.0 and 9.3 (sm110).
OLDEST_PTX = 80
_TARGET_PTX = {86: 71, 87: 74, 89: 78, 90: 80, 110: 90, 120: 87}


def ptx_isa(arch: str) -> int:
    """The PTX ISA version (80 for 8.0) ``arch``'s PTX is written in."""
    return max(OLDEST_PTX, _TARGET_PTX[_cc(arch)])


def cuda_text(version: int) -> str:
    """12080 (as cuDriverGetVersion reports CUDA 12.8) -> '12.8'."""
    return f"{int(version) // 1000}.{int(version) % 1000 // 10}"


def driver_for_ptx(isa: str) -> int:
    """The oldest driver (12080 for CUDA 12.8) that JIT-compiles PTX ISA ``isa`` ('8.7'): ISA 7.x came with
    CUDA 11.x, 8.0-8.5 with 12.0-12.5, 8.6 with 12.7, 8.7 with 12.8, 8.8 with 12.9, 9.x with 13.x."""
    major, minor = (int(p) for p in str(isa).split("."))
    if major == 7:
        cuda = (11, minor)
    elif major == 8:
        cuda = (12, minor if minor <= 5 else minor + 1)
    elif major >= 9:
        cuda = (13 + major - 9, minor)
    else:
        raise PluginError(f"PTX ISA {isa} is older than CUDA 11; rebuild the bundle with `edgetok plugins build`")
    return 1000 * cuda[0] + 10 * cuda[1]


def driver_for_cubin(assembler: str) -> int:
    """The oldest driver that loads a cubin from ptxas ``assembler`` ('12.9.86'): by CUDA's minor version
    compatibility, any of the same CUDA major version (12000 for CUDA 12.x, 13000 for 13.x)."""
    return 1000 * int(str(assembler).split(".")[0])


def _assembler(cc: int) -> str:
    """The version ('12.9.86') of the ptxas Triton assembles ``cc`` with (its CUDA 13 one from sm100 on)."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    found = re.search(r"V(\d+\.\d+\.\d+)", get_ptxas_version(cc)) or re.search(r"release (\d+\.\d+)",
                                                                                get_ptxas_version(cc))
    if not found:
        raise PluginError(f"cannot read the version of Triton's ptxas for sm{cc}; update edgetok.plugins.cubins")
    return found.group(1)


def _cc(arch: str) -> int:
    return int(arch[2:])


def _normalise(value) -> str | None:
    """'sm87', 'sm_87', 'SM87', '87', 87 -> 'sm87'; None when it is not an sm number at all."""
    match = re.fullmatch(r"(?:sm_?)?(\d+)[a-z]?", str(value).strip().lower())
    return f"sm{int(match.group(1))}" if match else None


def parse_archs(text: str) -> list[str]:
    """Architectures from a CLI value ("sm87,sm90", "87", "all"), in the given order without repeats."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    if not parts:
        raise PluginError(f"no GPU architecture given; valid: {', '.join(ARCHS)} (or all)")
    archs: list[str] = []
    for part in parts:
        found = list(ARCHS) if part.lower() == "all" else [_normalise(part)]
        if found[0] not in ARCHS:
            raise PluginError(f"unknown GPU architecture {part!r}; valid: {', '.join(ARCHS)} (or all)")
        archs += [a for a in found if a not in archs]
    return archs


def _kernels() -> list[tuple[str, object]]:
    """(plugin name, Kernel) for every kernel of every plugin; names must be unique across plugins."""
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import specs

    found, seen = [], {}
    for name, spec in sorted(specs().items()):
        for kernel in kernels.module(spec).KERNELS:
            if kernel.name in seen:
                raise PluginError(f"kernel {kernel.name} is defined by both {seen[kernel.name]} and {name}")
            seen[kernel.name] = name
            found.append((name, kernel))
    return found


def source_key() -> str:
    """Hash of every kernels module's source and of this format: a new kernel means a new cache folder."""
    import importlib.util

    from edgetok.plugins import kernels
    from edgetok.plugins.spec import specs

    digest = hashlib.sha256(f"format={FORMAT}".encode())
    for name, spec in sorted(specs().items()):
        digest.update(name.encode())
        plan = kernels.module(spec)
        sources = sorted({spec.output_shapes.__module__, *(k.source for k in plan.KERNELS)})
        for path in [plan.__file__, *(importlib.util.find_spec(m).origin for m in sources)]:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """$EDGETOK_CACHE/cubins/<triton version>-<source hash> (EDGETOK_CACHE defaults to ~/.cache/edgetok)."""
    import triton

    root = Path(os.environ.get("EDGETOK_CACHE") or Path.home() / ".cache" / "edgetok")
    return root / "cubins" / f"{triton.__version__}-{source_key()}"


def _entry_params(ptx: str, entry: str) -> list[str]:
    """The PTX types of the parameters the entry really takes (declared + what the compiler appended)."""
    match = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if not match:
        raise PluginError(f"no .entry {entry} in the PTX Triton produced; update edgetok.plugins.cubins")
    return re.findall(r"\.param\s+\.(\w+)", match.group(1))


# Triton parameter type -> the PTX parameter types it compiles to (pointers are 64-bit addresses)
PTX_TYPES = {"*": ("u64", "b64"), "i32": ("u32", "s32", "b32"), "fp32": ("f32", "b32")}


def ptx_type_matches(triton_type: str, ptx_type: str) -> bool:
    return ptx_type in PTX_TYPES["*" if triton_type.startswith("*") else triton_type]


def _compile_arch(arch: str, folder: Path) -> dict:
    """Compile every kernel for ``arch`` into folder/<arch>/ with its arch.json; needs a compiling (not
    interpreting) Triton in this process."""
    import triton
    from triton.backends.compiler import GPUTarget

    from edgetok.plugins.kernels import jit_fn

    out = folder / arch
    out.mkdir(parents=True, exist_ok=True)
    start, entries, ptx_versions, targets = time.perf_counter(), {}, set(), set()
    isa = ptx_isa(arch)
    for _, kernel in _kernels():
        signature = dict(kernel.params) | {name: "constexpr" for name in kernel.constexprs}
        source = triton.compiler.ASTSource(fn=jit_fn(kernel), signature=signature, constexprs=dict(kernel.constexprs))
        compiled = triton.compile(source, target=GPUTarget("cuda", _cc(arch), 32),
                                  options={"num_warps": kernel.num_warps, "ptx_version": isa})
        meta, ptx, cubin = compiled.metadata, compiled.asm["ptx"], compiled.asm["cubin"]
        version = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.M)
        target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
        ptx_versions.add(version.group(1) if version else "unknown")
        targets.add(target.group(1) if target else f"sm_{_cc(arch)}")
        (out / f"{kernel.name}.cubin").write_bytes(cubin)
        (out / f"{kernel.name}.ptx").write_text(ptx)
        entries[kernel.name] = {
            "cubin": f"{arch}/{kernel.name}.cubin", "sha256": hashlib.sha256(cubin).hexdigest(), "entry": meta.name,
            "ptx": f"{arch}/{kernel.name}.ptx", "ptx_sha256": hashlib.sha256(ptx.encode()).hexdigest(),
            "shared": int(meta.shared), "num_warps": int(meta.num_warps),
            "global_scratch_size": int(meta.global_scratch_size), "global_scratch_align": int(meta.global_scratch_align),
            "profile_scratch_size": int(meta.profile_scratch_size),
            "profile_scratch_align": int(meta.profile_scratch_align),
            "ptx_param_types": _entry_params(ptx, meta.name),
        }
    if ptx_versions != {f"{isa // 10}.{isa % 10}"}:
        raise PluginError(f"Triton wrote PTX {'/'.join(sorted(ptx_versions))} for {arch}, asked for "
                          f"{isa // 10}.{isa % 10}; update edgetok.plugins.cubins")
    assembler = _assembler(_cc(arch))
    info = {"arch": arch, "target": "/".join(sorted(targets)), "ptx_version": "/".join(sorted(ptx_versions)),
            "assembler": assembler, "cubin_driver": driver_for_cubin(assembler),
            "ptx_driver": driver_for_ptx(f"{isa // 10}.{isa % 10}"),
            "compile_s": round(time.perf_counter() - start, 2), "kernels": entries}
    (out / "arch.json").write_text(json.dumps(info, indent=1))
    return info


def _cached(folder: Path, arch: str, names: list[str]) -> dict | None:
    """The arch.json of a complete, intact cached build of ``arch``, else None."""
    try:
        info = json.loads((folder / arch / "arch.json").read_text())
        for name in names:
            entry = info["kernels"][name]
            if hashlib.sha256((folder / entry["cubin"]).read_bytes()).hexdigest() != entry["sha256"] or \
                    hashlib.sha256((folder / entry["ptx"]).read_bytes()).hexdigest() != entry["ptx_sha256"]:
                return None
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _compile_elsewhere(archs: list[str], folder: Path) -> None:
    """Compile in a child process without TRITON_INTERPRET: an interpreting process (tests) has
    triton.language's own helpers turned into interpreter functions, which the compiler cannot use."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "edgetok.plugins.cubins", str(folder), *archs], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PluginError(f"compiling cubins for {', '.join(archs)} failed: {tail[0]}")


def _manifest(folder: Path, archs: list[str], infos: dict) -> dict:
    """The manifest of ``archs`` from their arch.json files; checks the hidden-parameter count."""
    import triton

    kernels = {}
    for plugin, kernel in _kernels():
        declared = [{"name": n, "type": t} for n, t in kernel.params]
        hidden = [{"name": n, "type": t, "hidden": True} for n, t in HIDDEN_PARAMS]
        per_arch = {}
        for arch in archs:
            entry = dict(infos[arch]["kernels"][kernel.name])
            expected = [p["type"] for p in declared + hidden]
            found = entry["ptx_param_types"]
            if len(found) != len(expected) or not all(map(ptx_type_matches, expected, found)):
                raise PluginError(f"{kernel.name} for {arch} takes ({', '.join(found)}) in its PTX, expected "
                                  f"{len(declared)} declared + {len(hidden)} hidden ({', '.join(expected)}): Triton "
                                  f"{triton.__version__} changed its calling convention; update edgetok.plugins.cubins")
            per_arch[arch] = entry
        kernels[kernel.name] = {"plugin": plugin, "params": declared + hidden, "declared_params": len(declared),
                                "constexprs": dict(kernel.constexprs), "num_warps": kernel.num_warps,
                                "threads": 32 * kernel.num_warps, "archs": per_arch}
    keys = ("target", "ptx_version", "assembler", "cubin_driver", "ptx_driver")
    arch_info = {a: {k: infos[a][k] for k in keys} for a in archs}  # no timings: reproducible
    from edgetok import __version__

    return {"format": FORMAT, "edgetok": __version__, "triton": triton.__version__,
            "source": folder.name.rsplit("-", 1)[-1],
            "ptx_version": _highest(arch_info), "archs": arch_info, "kernels": kernels}


def _highest(arch_info: dict) -> str | None:
    """The newest PTX ISA version among the architectures (sm110/sm120 need a newer one than sm87)."""
    versions = {v for a in arch_info.values() for v in a["ptx_version"].split("/") if re.fullmatch(r"\d+\.\d+", v)}
    return max(versions, key=lambda v: tuple(map(int, v.split("."))), default=None)


def build(archs=ARCHS, say: Callable[[str], object] = print) -> Path:
    """Compile what the cache lacks for ``archs``; returns the cache folder with manifest.json (covering every
    architecture built there so far) and <arch>/<kernel>.cubin."""
    import importlib.util

    from filelock import FileLock

    if importlib.util.find_spec("triton") is None:
        raise PluginError("compiling the plugin kernels needs Triton, which is not installed here (a Jetson has none): "
                          "run `edgetok plugins build -o NAME.cubins.zip` on an x86 machine with torch and copy the "
                          "bundle beside the ONNX or engine")
    from edgetok.plugins.kernels import interpreting

    archs = parse_archs(archs if isinstance(archs, str) else ",".join(archs))
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    names = [k.name for _, k in _kernels()]
    with FileLock(str(folder) + ".lock"):
        missing = [a for a in archs if _cached(folder, a, names) is None]
        for arch in archs:
            if arch not in missing:
                say(f"{arch}: cubins cached in {folder}")
        if missing:
            with staging_dir(folder / "build") as tmp:
                if interpreting():
                    _compile_elsewhere(missing, tmp)
                else:
                    for arch in missing:
                        _compile_arch(arch, tmp)
                for arch in missing:
                    if (folder / arch).exists():
                        shutil.rmtree(folder / arch)
                    os.replace(tmp / arch, folder / arch)
                    info = json.loads((folder / arch / "arch.json").read_text())
                    say(f"{arch}: compiled {len(names)} kernels ({info['target']}, PTX {info['ptx_version']}) "
                        f"in {info['compile_s']:.1f} s")
        infos = {a: info for a in ARCHS if (info := _cached(folder, a, names)) is not None}
        manifest = _manifest(folder, list(infos), infos)
        write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return folder


def cached_archs() -> list[str]:
    """Architectures with a complete, intact build in the cache of this Triton and kernel source ([] without
    Triton: the cache key needs its version)."""
    try:
        folder, names = cache_dir(), [k.name for _, k in _kernels()]
    except ImportError:
        return []
    return [a for a in ARCHS if _cached(folder, a, names) is not None]


def describe(manifest) -> str:
    """A few lines on a manifest (a dict, or the path of manifest.json) for `edgetok plugins build`."""
    if not isinstance(manifest, dict):
        manifest = json.loads(Path(manifest).read_text())
    archs = manifest.get("archs", {})
    lines = [f"cubins: Triton {manifest.get('triton')}, format {manifest.get('format')}, newest PTX "
             f"{manifest.get('ptx_version')}; " + ", ".join(f"{a} ({v['target']}, PTX {v['ptx_version']})"
                                                            for a, v in archs.items())]
    lines += [f"  {a:<6} ptxas {v['assembler']}: the cubins load on a CUDA {cuda_text(v['cubin_driver'])}+ driver, "
              f"their PTX {v['ptx_version']} JIT-compiles on {cuda_text(v['ptx_driver'])}+"
              for a, v in archs.items() if "assembler" in v]
    for name, kernel in manifest.get("kernels", {}).items():
        shared = sorted({v["shared"] for v in kernel["archs"].values()})
        lines.append(f"  {name:<12} {kernel['plugin']}: {kernel['declared_params']} params + "
                     f"{len(kernel['params']) - kernel['declared_params']} hidden, {kernel['threads']} threads, "
                     f"shared {'/'.join(map(str, shared))} B")
    return "\n".join(lines)


def restrict(manifest: dict, archs: list[str]) -> dict:
    """The manifest of a subset of its architectures."""
    out = json.loads(json.dumps(manifest))
    out["archs"] = {a: v for a, v in out["archs"].items() if a in archs}
    for kernel in out["kernels"].values():
        kernel["archs"] = {a: v for a, v in kernel["archs"].items() if a in archs}
    out["ptx_version"] = _highest(out["archs"])
    return out


def _member(name: str, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, _ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info, data


def write_bundle(path, archs=ARCHS, say: Callable[[str], object] = print) -> dict:
    """Build (or reuse) the cubins of ``archs`` and write them with their manifest into the zip ``path``,
    whole or not at all. Returns the bundle's manifest."""
    path = Path(path)
    archs = parse_archs(archs if isinstance(archs, str) else ",".join(archs))
    folder = build(archs, say)
    manifest = restrict(json.loads((folder / MANIFEST).read_text()), archs)
    members = [_member(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())]
    for name in sorted(manifest["kernels"]):
        for arch, entry in sorted(manifest["kernels"][name]["archs"].items()):
            for member in (entry["cubin"], entry["ptx"]):
                members.append(_member(member, (folder / member).read_bytes()))
    with staging_dir(path) as tmp:
        staged = tmp / path.name
        with open(staged, "wb") as f:
            with zipfile.ZipFile(f, "w") as z:
                for info, data in members:
                    z.writestr(info, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    say(f"wrote {path} ({', '.join(archs)}; {len(manifest['kernels'])} kernels)")
    return manifest


def bundle_path(artifact) -> Path:
    """Where an engine's (or ONNX model's) cubin bundle lives: beside it."""
    return Path(f"{artifact}.cubins.zip")


# What a bundle may hold, checked before anything is inflated (a zip bomb: a 1.4 MB bundle declaring a 1 GiB
# member took build-engine to 2.6 GB). The largest member of an all-architecture bundle is 0.8 MB (bsa_select's
# PTX) and cubins and PTX deflate 3-11x; zeros deflate ~1000x.
MEMBER_LIMIT = 64 << 20  # bytes, declared and read, per member
TOTAL_LIMIT = 512 << 20  # bytes, all members together
MEMBER_COUNT_LIMIT = 4096
RATIO_LIMIT = 100  # inflated / deflated size, for members over RATIO_FLOOR bytes
RATIO_FLOOR = 1 << 20
_ELF_CUDA = 190  # e_machine of a cubin (EM_CUDA)


def _refuse(path, why: str) -> PluginError:
    return PluginError(f"{path} is refused: {why}; rebuild it from this edgetok's kernels with "
                       f"`edgetok plugins build -o {path}` (build-engine compiles its own when Triton is installed)")


def _read_members(path: Path) -> dict[str, bytes]:
    """Every member of the zip at ``path``, streamed under the limits above: sizes and ratios are refused from
    the directory before inflating, and the bytes actually inflated are counted too."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            if len(infos) > MEMBER_COUNT_LIMIT:
                raise _refuse(path, f"it has {len(infos)} members, more than the {MEMBER_COUNT_LIMIT} a bundle may hold")
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                twice = next(n for n in names if names.count(n) > 1)
                raise _refuse(path, f"member {twice} appears twice")
            declared = sum(i.file_size for i in infos)
            for i in infos:
                if i.file_size > MEMBER_LIMIT:
                    raise _refuse(path, f"member {i.filename} declares {i.file_size} bytes, over the {MEMBER_LIMIT} "
                                        "a member may hold (not inflated)")
                if i.file_size > RATIO_FLOOR and i.file_size > RATIO_LIMIT * max(i.compress_size, 1):
                    raise _refuse(path, f"member {i.filename} inflates {i.file_size / max(i.compress_size, 1):.0f}x "
                                        f"(over {RATIO_LIMIT}x: a zip bomb; not inflated)")
            if declared > TOTAL_LIMIT:
                raise _refuse(path, f"its members declare {declared} bytes in all, over the {TOTAL_LIMIT} limit "
                                    "(not inflated)")
            files, total = {}, 0
            for i in infos:
                chunks, size = [], 0
                with z.open(i) as member:
                    while chunk := member.read(1 << 20):
                        size += len(chunk)
                        total += len(chunk)
                        if size > min(i.file_size, MEMBER_LIMIT) or total > TOTAL_LIMIT:
                            raise _refuse(path, f"member {i.filename} inflates past its declared {i.file_size} bytes")
                        chunks.append(chunk)
                files[i.filename] = b"".join(chunks)
            return files
    except FileNotFoundError:
        raise PluginError(f"no cubin bundle at {path}: run `edgetok plugins build` and rebuild the engine") from None
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, RuntimeError,
            NotImplementedError, ValueError) as e:  # damaged, encrypted, or an unknown compression method
        raise PluginError(f"{path} is not a cubin bundle ({type(e).__name__}: {' '.join(str(e).split())}); "
                          "rebuild it with `edgetok plugins build`") from None


def _expected_params(kernel) -> list[dict]:
    return ([{"name": n, "type": t} for n, t in kernel.params]
            + [{"name": n, "type": t, "hidden": True} for n, t in HIDDEN_PARAMS])


def verify(path: Path, manifest, files: dict[str, bytes]) -> None:
    """Refuse (one line) a bundle that is not exactly what this edgetok's own build writes: a manifest with
    provenance, every member listed in it with a matching SHA-256 and nothing else, compiled from this
    edgetok's kernel sources, and every kernel's parameter layout, threads and compile-time constants equal to
    what our kernel specs declare, in the manifest and in the PTX entry it carries. A consistent foreign bundle
    (re-hashed members, a forged argument layout) would otherwise be launched with our plan's arguments."""
    if not isinstance(manifest, dict):
        raise _refuse(path, f"its {MANIFEST} is not an object")
    fmt = manifest.get("format")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise PluginError(f"{path} has cubin bundle format {fmt!r}, newer than this edgetok's ({FORMAT}); upgrade "
                          "edgetok or rebuild the bundle")
    if not isinstance(manifest.get("edgetok"), str):
        raise _refuse(path, "its manifest does not record which edgetok built it")
    kernels, archs = manifest.get("kernels"), manifest.get("archs")
    if not isinstance(kernels, dict) or not isinstance(archs, dict) or not set(archs) <= set(ARCHS):
        raise _refuse(path, "its manifest lists no kernels or unknown architectures")
    listed = {MANIFEST: None}
    for name, kernel in kernels.items():
        per_arch = kernel.get("archs") if isinstance(kernel, dict) else None
        if not isinstance(per_arch, dict) or not set(per_arch) <= set(archs):
            raise _refuse(path, f"kernel {name} in its manifest has no valid architectures")
        for arch, entry in per_arch.items():
            for kind, digest in (("cubin", "sha256"), ("ptx", "ptx_sha256")):
                if kind == "ptx" and fmt < 3:
                    continue
                member = entry.get(kind) if isinstance(entry, dict) else None
                if member != f"{arch}/{name}.{kind}" or not isinstance(entry.get(digest), str):
                    raise _refuse(path, f"its manifest names {member!r} for the {kind} of {name} on {arch}")
                listed[member] = entry[digest]
    extra = sorted(set(files) - set(listed))
    if extra:
        raise _refuse(path, f"member {extra[0]} is not in its manifest")
    for member, digest in listed.items():
        if member != MANIFEST and member not in files:
            raise _refuse(path, f"member {member} that its manifest lists is missing")
        if member != MANIFEST and hashlib.sha256(files[member]).hexdigest() != digest:
            raise _refuse(path, f"member {member} fails its manifest's SHA-256")
    if manifest.get("source") != source_key():
        raise PluginError(f"{path} holds kernels compiled from other plugin sources than this edgetok's "
                          f"(source {manifest.get('source')}, here {source_key()}); rebuild it: "
                          f"`edgetok plugins build -o {path}`, or re-export with --plugins and rebuild the engine")
    ours = {kernel.name: (plugin, kernel) for plugin, kernel in _kernels()}
    if set(kernels) != set(ours):
        odd = sorted(set(kernels) ^ set(ours))[0]
        raise _refuse(path, f"kernel {odd} is {'not ours' if odd in kernels else 'missing'}")
    for name, (plugin, kernel) in ours.items():
        got, params = kernels[name], _expected_params(kernel)
        declared = {"plugin": plugin, "params": params, "declared_params": len(kernel.params),
                    "constexprs": json.loads(json.dumps(dict(kernel.constexprs))), "num_warps": kernel.num_warps,
                    "threads": 32 * kernel.num_warps}
        for key, value in declared.items():
            if got.get(key) != value:
                raise _refuse(path, f"kernel {name}'s {key} in its manifest ({got.get(key)!r}) differ from what "
                                    f"this edgetok's kernel declares ({value!r})")
        for arch, entry in got["archs"].items():
            numbers = ("shared", "num_warps", "global_scratch_size", "profile_scratch_size")
            if entry.get("entry") != name or entry.get("num_warps") != kernel.num_warps or \
                    not all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in numbers):
                raise _refuse(path, f"kernel {name} on {arch}: its manifest entry (entry point, warps, shared and "
                                    "scratch sizes) is not what this edgetok compiles")
            types = [p["type"] for p in params]
            recorded = entry.get("ptx_param_types")
            ptx = files.get(entry.get("ptx"), b"").decode("utf-8", "replace") if fmt >= 3 else None
            found = _entry_params(ptx, name) if ptx is not None and f".entry {name}" in ptx else None
            for what, kinds in (("manifest", recorded), ("PTX", found if fmt >= 3 else recorded)):
                if not isinstance(kinds, list) or len(kinds) != len(types) or \
                        not all(map(ptx_type_matches, types, kinds)):
                    raise _refuse(path, f"kernel {name} on {arch} takes ({', '.join(map(str, kinds or []))}) in its "
                                        f"{what}, but this edgetok launches it with ({', '.join(types)})")
            cubin = files[entry["cubin"]]
            if cubin[:4] != b"\x7fELF" or int.from_bytes(cubin[18:20], "little") != _ELF_CUDA or \
                    name.encode() not in cubin:
                raise _refuse(path, f"{entry['cubin']} is not a CUDA binary with entry {name}")


class Bundle:
    """A cubin bundle opened for launching: manifest plus cubins, read into memory once, under size limits,
    and verified (``verify``) before anything in it is used."""

    def __init__(self, path: Path, manifest: dict, files: dict[str, bytes]):
        self.path, self.manifest, self._files = path, manifest, files

    @classmethod
    def open(cls, path) -> Bundle:
        path = Path(path)
        files = _read_members(path)
        try:
            manifest = json.loads(files.pop(MANIFEST))
        except KeyError:
            raise _refuse(path, f"it has no {MANIFEST}") from None
        except ValueError as e:
            raise _refuse(path, f"its {MANIFEST} is not JSON ({e})") from None
        verify(path, manifest, files)
        return cls(path, manifest, files)

    def verify(self) -> None:
        """``verify`` again (the run-time preflight does, just before an engine is deserialized)."""
        verify(self.path, self.manifest, self._files)

    @property
    def archs(self) -> list[str]:
        return [a for a in ARCHS if a in self.manifest.get("archs", {})]

    def kernel(self, name: str) -> dict:
        """The manifest entry of kernel ``name`` (params, num_warps, threads, per-arch cubin facts)."""
        kernels = self.manifest.get("kernels", {})
        if name not in kernels:
            raise PluginError(f"no kernel {name} in {self.path} (it has {', '.join(sorted(kernels)) or 'none'}); "
                              "rebuild the bundle with this edgetok")
        return kernels[name]

    def cubin(self, name: str, arch) -> bytes:
        """The cubin of kernel ``name`` for ``arch`` ('sm87', 'sm_87', 87), checked against its sha256."""
        return self.image(name, arch, "cubin")

    def ptx(self, name: str, arch) -> bytes:
        """The PTX of kernel ``name`` for ``arch``, NUL-terminated as cuModuleLoadData takes it."""
        return self.image(name, arch, "ptx") + b"\0"

    def image(self, name: str, arch, kind: str) -> bytes:
        """The ``kind`` ('cubin' or 'ptx') of kernel ``name`` for ``arch``, checked against its sha256."""
        entry = self.kernel(name)
        wanted = _normalise(arch) or str(arch)
        if wanted not in ARCHS:
            raise PluginError(f"no cubin for {arch} in {self.path}: edgetok builds plugin cubins for "
                              f"{', '.join(ARCHS)} only")
        if wanted not in entry["archs"]:
            raise PluginError(f"no cubin for sm_{_cc(wanted)} in {self.path} (it has {', '.join(entry['archs']) or 'none'}): "
                              f"run `edgetok plugins build --arch {wanted}` on a machine with Triton (x86 with torch), "
                              "then rebuild the engine")
        meta = entry["archs"][wanted]
        member, digest = (meta["cubin"], meta["sha256"]) if kind == "cubin" else (meta.get("ptx"), meta.get("ptx_sha256"))
        data = self._files.get(member) if member else None
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            raise PluginError(f"{kind} {member or f'of {name} for {wanted}'} in {self.path} is missing or damaged; "
                              f"rebuild the bundle with `edgetok plugins build --arch {wanted} -o {self.path}`")
        return data


def _main(argv: list[str]) -> int:
    """Child entry of ``_compile_elsewhere``: ``python -m edgetok.plugins.cubins FOLDER ARCH...``."""
    folder, archs = Path(argv[0]), argv[1:]
    for arch in parse_archs(",".join(archs)):
        _compile_arch(arch, folder)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
