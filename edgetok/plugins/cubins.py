"""Ahead-of-time cubins of the plugin kernels, for every supported GPU, compiled on a machine without one.

``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` needs no driver, so one x86 machine with Triton
builds the cubins for Orin (sm87), Thor (sm110), RTX (sm86/89/120) and H100/H200 (sm90); the Jetson then
runs them through cuda-python without Triton or torch. What a launcher needs besides the cubin is in the
manifest: the parameters in order (the declared ones, then the two pointers Triton appends: global scratch
and profile scratch, checked against the PTX of every build), threads per block, dynamic shared memory and
scratch sizes. Builds are cached per Triton version and kernel source, and bundled into one zip beside an
engine (``bundle_path``).
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
from pathlib import Path
from typing import Callable

from edgetok.atomic import staging_dir, write_text
from edgetok.plugins.spec import PluginError

FORMAT = 2  # 2: PTX parameter types recorded per kernel and arch
ARCHS = ("sm86", "sm87", "sm89", "sm90", "sm110", "sm120")
HIDDEN_PARAMS = (("global_scratch", "*i8"), ("profile_scratch", "*i8"))  # appended by Triton to every entry
MANIFEST = "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same cubins give the same bundle bytes


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
    for _, kernel in _kernels():
        signature = dict(kernel.params) | {name: "constexpr" for name in kernel.constexprs}
        source = triton.compiler.ASTSource(fn=jit_fn(kernel), signature=signature, constexprs=dict(kernel.constexprs))
        compiled = triton.compile(source, target=GPUTarget("cuda", _cc(arch), 32), options={"num_warps": kernel.num_warps})
        meta, ptx, cubin = compiled.metadata, compiled.asm["ptx"], compiled.asm["cubin"]
        version = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.M)
        target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
        ptx_versions.add(version.group(1) if version else "unknown")
        targets.add(target.group(1) if target else f"sm_{_cc(arch)}")
        (out / f"{kernel.name}.cubin").write_bytes(cubin)
        entries[kernel.name] = {
            "cubin": f"{arch}/{kernel.name}.cubin", "sha256": hashlib.sha256(cubin).hexdigest(), "entry": meta.name,
            "shared": int(meta.shared), "num_warps": int(meta.num_warps),
            "global_scratch_size": int(meta.global_scratch_size), "global_scratch_align": int(meta.global_scratch_align),
            "profile_scratch_size": int(meta.profile_scratch_size),
            "profile_scratch_align": int(meta.profile_scratch_align),
            "ptx_param_types": _entry_params(ptx, meta.name),
        }
    info = {"arch": arch, "target": "/".join(sorted(targets)), "ptx_version": "/".join(sorted(ptx_versions)),
            "compile_s": round(time.perf_counter() - start, 2), "kernels": entries}
    (out / "arch.json").write_text(json.dumps(info, indent=1))
    return info


def _cached(folder: Path, arch: str, names: list[str]) -> dict | None:
    """The arch.json of a complete, intact cached build of ``arch``, else None."""
    try:
        info = json.loads((folder / arch / "arch.json").read_text())
        for name in names:
            entry = info["kernels"][name]
            if hashlib.sha256((folder / entry["cubin"]).read_bytes()).hexdigest() != entry["sha256"]:
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
    arch_info = {a: {k: infos[a][k] for k in ("target", "ptx_version")} for a in archs}  # no timings: reproducible
    return {"format": FORMAT, "triton": triton.__version__, "source": folder.name.rsplit("-", 1)[-1],
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
            members.append(_member(entry["cubin"], (folder / entry["cubin"]).read_bytes()))
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


class Bundle:
    """A cubin bundle opened for launching: manifest plus cubins, read into memory once."""

    def __init__(self, path: Path, manifest: dict, files: dict[str, bytes]):
        self.path, self.manifest, self._files = path, manifest, files

    @classmethod
    def open(cls, path) -> Bundle:
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as z:
                files = {name: z.read(name) for name in z.namelist()}
            manifest = json.loads(files.pop(MANIFEST))
        except FileNotFoundError:
            raise PluginError(f"no cubin bundle at {path}: run `edgetok plugins build` and rebuild the engine") from None
        except (OSError, zipfile.BadZipFile, KeyError, ValueError) as e:
            raise PluginError(f"{path} is not a cubin bundle ({type(e).__name__}: {e}); rebuild it with "
                              "`edgetok plugins build`") from None
        if not isinstance(manifest, dict) or manifest.get("format", 0) > FORMAT:
            raise PluginError(f"{path} has cubin bundle format {manifest.get('format')!r}, newer than this "
                              f"edgetok's ({FORMAT}); upgrade edgetok or rebuild the bundle")
        return cls(path, manifest, files)

    @property
    def archs(self) -> list[str]:
        return [a for a in ARCHS if a in self.manifest.get("archs", {})]

    def check_current(self) -> None:
        """The cubins were compiled from this edgetok's kernels and launch plans: an older bundle would run
        the current plan against other kernels, silently wrong."""
        if self.manifest.get("source") != source_key():
            raise PluginError(f"{self.path} holds kernels compiled from other plugin sources than this edgetok's "
                              f"(source {self.manifest.get('source')}, here {source_key()}); rebuild it: "
                              f"`edgetok plugins build -o {self.path}`, or re-export with --plugins and rebuild the engine")

    def kernel(self, name: str) -> dict:
        """The manifest entry of kernel ``name`` (params, num_warps, threads, per-arch cubin facts)."""
        kernels = self.manifest.get("kernels", {})
        if name not in kernels:
            raise PluginError(f"no kernel {name} in {self.path} (it has {', '.join(sorted(kernels)) or 'none'}); "
                              "rebuild the bundle with this edgetok")
        return kernels[name]

    def cubin(self, name: str, arch) -> bytes:
        """The cubin of kernel ``name`` for ``arch`` ('sm87', 'sm_87', 87), checked against its sha256."""
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
        data = self._files.get(meta["cubin"])
        if data is None or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise PluginError(f"cubin {meta['cubin']} in {self.path} is missing or damaged; rebuild the bundle "
                              f"with `edgetok plugins build --arch {wanted}`")
        return data


def _main(argv: list[str]) -> int:
    """Child entry of ``_compile_elsewhere``: ``python -m edgetok.plugins.cubins FOLDER ARCH...``."""
    folder, archs = Path(argv[0]), argv[1:]
    for arch in parse_archs(",".join(archs)):
        _compile_arch(arch, folder)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
