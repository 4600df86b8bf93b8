"""`edgetok build-engine`: check options, prepare the ONNX, build in a child process, publish the
engine and its ``<engine>.build.json`` together (or nothing at all)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edgetok import atomic, sidecar
from edgetok.engine.backend import RTX_TARGETS, Backend, select
from edgetok.engine.options import BuildOptions, InputProfile, parse_batch, parse_shapes
from edgetok.errors import EdgetokError
from edgetok.plugins.token_counts import add_count_outputs, add_kept_outputs, attention_kept_outputs, sizes_outputs

REPORT_SUFFIX = ".build.json"


def report_path(engine: str | Path) -> Path:
    return Path(f"{engine}{REPORT_SUFFIX}")


def _load_onnx(path: str) -> onnx.ModelProto:
    p = Path(path)
    if p.is_dir():
        raise EdgetokError(f"{path} is a folder; give an .onnx file (e.g. from `edgetok export`)")
    if not p.is_file():
        raise EdgetokError(f"{path} does not exist; give an .onnx file (e.g. from `edgetok export`)")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        protobuf = type(exc).__name__ == "DecodeError" or "Message type" in str(exc)  # JSON, text, another protobuf
        reason = "not an ONNX protobuf" if protobuf else " ".join(str(exc).split())[:120] or type(exc).__name__
        raise EdgetokError(f"{path} is not an ONNX model ({reason}); give an .onnx file from `edgetok export`") from None
    _check_external_data(model, p)
    return model


def _load_failure(exc: Exception, staged: Path) -> str:
    """ONNX Runtime's complaint about a graph edgetok wrote into its staging folder, whole, without that
    folder: the path is gone once the build fails and means nothing to the user."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(rf"Load model from {re.escape(str(staged))} failed:\s*", "", text)
    return text.replace(str(staged), staged.name) or type(exc).__name__


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Weights kept in other files must be files beside the model: a builder (or the fp16 conversion) must
    never read a file outside the model's folder, and a missing one is named here, not deep in a parser."""
    folder = path.parent.resolve()
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise EdgetokError(f"{path}: tensor {init.name!r} keeps its data in {location!r}, outside the model's "
                               "folder; keep external data files beside the .onnx (re-export, or onnx.save with "
                               "a plain file name as location)")
        if not target.is_file():
            raise EdgetokError(f"{path}: tensor {init.name!r} keeps its data in {location!r}, which is missing; "
                               "copy it beside the .onnx")


def _graph_inputs(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    initializers = {i.name for i in model.graph.initializer}
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in model.graph.input if v.name not in initializers
    }


def example_inputs(model: onnx.ModelProto, profiles: list[InputProfile]) -> dict[str, np.ndarray]:
    """One input per profile at its MIN shape, typed as the graph declares: floats random, integers 1 (a valid
    token, position, mask value), booleans True (a decoder's mask: attend everywhere)."""
    rng = np.random.default_rng(0)
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in model.graph.input}
    inputs = {}
    for p in profiles:
        dtype = types.get(p.name, np.dtype(np.float32))
        if dtype == np.float32:
            inputs[p.name] = rng.standard_normal(p.min, dtype=np.float32)
        elif np.issubdtype(dtype, np.floating):
            inputs[p.name] = rng.standard_normal(p.min).astype(dtype)
        else:
            inputs[p.name] = np.ones(p.min, dtype)
    return inputs


def default_batch(side: dict | None) -> str:
    """The sidecar's batch profile, else 1:1:1 (a static-batch engine)."""
    if side and "batch_profile" in side.get("onnx", {}):
        return ":".join(str(b) for b in side["onnx"]["batch_profile"])
    return "1:1:1"


def resolve_profiles(model: onnx.ModelProto, opts: BuildOptions, side: dict | None) -> list[InputProfile]:
    """One optimization profile covering every input, from --shapes, else --batch, else the sidecar."""
    inputs = _graph_inputs(model)
    explicit = {p.name: p for p in map(parse_shapes, opts.shapes)}
    for name in explicit:
        if name not in inputs:
            raise EdgetokError(f"--shapes names input {name!r}, but the model's inputs are {', '.join(inputs)}")
    low, opt, high = parse_batch(opts.batch or default_batch(side))
    profiles = []
    for name, dims in inputs.items():
        if name in explicit:
            profile = explicit[name]
            if len(profile.min) != len(dims):
                raise EdgetokError(f"--shapes {name}: the model's input has {len(dims)} dimensions, e.g. "
                                   + "x".join(str(d if isinstance(d, int) and d > 0 else 1) for d in dims))
            for i, d in enumerate(dims):
                if isinstance(d, int) and d > 0 and not profile.min[i] == profile.max[i] == d:
                    raise EdgetokError(f"--shapes {name}: dimension {i} is fixed to {d} in the model")
            profiles.append(profile)
            continue
        static = [d for d in dims[1:] if not (isinstance(d, int) and d > 0)]
        if static:
            raise EdgetokError(
                f"input {name} has dynamic dimensions besides the batch ({dims}); give --shapes {name}:MIN:OPT:MAX"
            )
        batch = dims[0] if dims else 1
        if isinstance(batch, int) and batch > 0 and (low, high) != (batch, batch):
            raise EdgetokError(
                f"--batch {low}:{opt}:{high} is outside what {Path(opts.onnx).name} allows: input {name} has a fixed "
                f"batch of {batch}; use --batch {batch} or re-export with a dynamic batch"
            )
        rest = [int(d) for d in dims[1:]]
        profiles.append(InputProfile(name, [low, *rest], [opt, *rest], [high, *rest]))
    return profiles


def _name_failed_nodes(errors: list[dict], model: onnx.ModelProto) -> list[dict]:
    """Some parser errors carry no node (index -1): find it from the importer that failed
    (``importScatterElements``), preferring the nodes our lint flags."""
    from edgetok.onnx.lint import lint

    flagged = {f.node for f in lint(model)}
    named = []
    for err in errors:
        if not err["node"] and err.get("importer", "").startswith("import"):
            op = err["importer"][len("import"):]
            candidates = [n.name or f"<{op} #{i}>" for i, n in enumerate(model.graph.node) if n.op_type == op]
            candidates = [c for c in candidates if c in flagged] or candidates
            err = {**err, "node": ", ".join(candidates[:3]) or "?", "op_type": err["op_type"] or op}
        named.append(err)
    return named


def _layer_counts(layers: list[dict]) -> dict:
    by_type: dict[str, int] = {}
    for layer in layers:
        by_type[layer["type"]] = by_type.get(layer["type"], 0) + 1
    return {"count": len(layers), "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]))}


def default_output(opts: BuildOptions, backend: Backend, quantized: str | None = None) -> Path:
    """MODEL.<backend>.<precision>.engine; a Q/DQ model's precision is its quantization mode (int8, fp8; with
    --precision fp16 for the float rest, int8+fp16), as profile labels it: its layers are not fp32."""
    src = Path(opts.onnx)
    precision = opts.precision if not quantized else quantized if opts.precision == "fp32" \
        else f"{quantized}+{opts.precision}"
    return src.with_name(f"{src.stem}.{backend.name}.{precision}.engine")


def _run_worker(request: dict, workdir: Path, say: Callable[[str], None]) -> tuple[dict, str]:
    """Run the child; returns its last event and the tail of its log."""
    request_path = workdir / "request.json"
    request_path.write_text(json.dumps(request))
    read_fd, write_fd = os.pipe()
    log_path = workdir / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgetok.engine.worker", str(request_path), str(write_fd), str(os.getpid())],
            stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
        )
    os.close(write_fd)
    last: dict = {}
    try:
        with os.fdopen(read_fd) as events:
            for line in events:
                event = json.loads(line)
                if event["event"] == "stage":
                    say(event["text"])
                elif event["event"] == "progress" and not event.get("parent"):
                    say(f"building: {event['phase']}")
                else:
                    last = event
        code = proc.wait()
    finally:  # interrupted (Ctrl-C, SIGTERM): the worker goes too, before its staging folder is removed
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    if code < 0 and not last:
        last = {"event": "error", "message": f"the builder process was killed by signal {-code}"}
    elif code != 0 and not last:
        last = {"event": "error", "message": f"the builder process exited with code {code}"}
    return last, " | ".join(tail)


@contextlib.contextmanager
def progress(enabled: bool):
    """A live status line (rich) with elapsed time; plain lines when not on a terminal."""
    if not enabled:
        yield lambda text: print(f"· {text}", file=sys.stderr)
        return
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    current = ["starting"]
    with console.status("") as status:
        stop = threading.Event()

        def tick():
            while not stop.wait(0.5):
                status.update(f"{current[0]}  [{time.perf_counter() - start:.0f} s]")

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()

        def say(text: str) -> None:
            current[0] = text
            status.update(f"{text}  [{time.perf_counter() - start:.0f} s]")

        try:
            yield say
        finally:
            stop.set()
            thread.join()


def _request_record(opts: BuildOptions, backend: Backend, profiles, edgetok_plugins: dict | None = None) -> dict:
    """What decides an engine's contents besides its ONNX: recorded in the report, compared on reuse.
    ``edgetok_plugins`` (only for graphs with edgetok nodes, so plain engines stay reusable) names the plugins,
    the kernel sources and the cubins the engine is built with: any change rebuilds."""
    record = {
        "backend": backend.name, "precision": opts.precision, "profiles": [p.as_dict() for p in profiles],
        "workspace": opts.workspace, "opt_level": opts.opt_level, "targets": opts.targets,
        "plugins": [str(Path(p).resolve()) for p in opts.plugins], "dla_core": opts.dla_core,
    }
    if edgetok_plugins:
        record["edgetok_plugins"] = edgetok_plugins
    return json.loads(json.dumps(record))


def _plugin_uses(model: onnx.ModelProto, source: Path) -> list[dict]:
    """The edgetok plugins the graph needs; an unknown op or version is refused here, naming the fix,
    instead of as a parser error deep in the build."""
    from edgetok.onnx.lint import UNNAMESPACED, unnamespaced_plugin_nodes
    from edgetok.plugins.spec import PluginError, uses

    try:
        found = uses(model)
    except PluginError as exc:
        raise EdgetokError(f"{source.name}: {exc}") from None
    old = unnamespaced_plugin_nodes(model)
    if old:
        raise EdgetokError(f"{source.name}: {len(old)} edgetok plugin node(s) ({old[0]}"
                           + (f" and {len(old) - 1} more" if len(old) > 1 else "") + f") have {UNNAMESPACED}")
    return found


# TensorRT-RTX's default compute capabilities (SM 8.0, 8.6, 8.9, 12.0) that edgetok has kernels for
RTX_DEFAULT_ARCHS = ("sm86", "sm89", "sm120")


def _with_token_counts(path: Path, work: Path) -> tuple[Path, dict[int, str], dict[int, str]]:
    """A copy of the ONNX to parse with the per-image token counts of its data-dependent steps, and the kept
    fractions of its block-sparse attentions, as outputs."""
    model = onnx.load(str(path))
    counts, kept = add_count_outputs(model), add_kept_outputs(model)
    out = work / f"{path.stem}.counts.onnx"
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: weights beside it
    onnx.save(model, str(out), save_as_external_data=large, location=f"{out.name}.data" if large else None)
    return out, counts, kept


def _cubin_archs(opts: BuildOptions, backend: Backend) -> list[str]:
    """The architectures to carry cubins for: TensorRT-RTX's targets (or its defaults); for TensorRT, which
    builds on the GPU the engine will run on, every architecture edgetok compiles for."""
    from edgetok.plugins import cubins

    if backend.name != "tensorrt-rtx":
        return list(cubins.ARCHS)
    if not opts.targets:
        return [a for a in RTX_DEFAULT_ARCHS if a in cubins.ARCHS]
    missing = [t for t in opts.targets if t not in cubins.ARCHS]
    if missing:
        raise EdgetokError(f"--target {missing[0]}: the graph has edgetok plugin nodes, whose kernels edgetok "
                           f"compiles for {', '.join(a for a in cubins.ARCHS if a in RTX_TARGETS)} only; "
                           "choose among those targets")
    return list(opts.targets)


def _plugin_setup(opts: BuildOptions, backend: Backend, source: Path, uses: list[dict]) -> dict | None:
    """The plugin part of the request record: which plugins, which kernel code and compiler, which cubins."""
    if not uses:
        return None
    from importlib import metadata

    from edgetok.plugins.cubins import bundle_path, source_key

    beside = bundle_path(source)
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {
        "uses": uses,
        "kernels": source_key(),
        "triton": triton,
        "archs": _cubin_archs(opts, backend),
        "bundle_sha256": sidecar.file_sha256(beside) if beside.is_file() else None,
    }


def _library_setup(opts: BuildOptions, backend: Backend, uses: list[dict],
                   say: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The C++ plugin library the graph's edgetok nodes are built with (None: the Python plugins), checked
    against the architectures the engine targets (TensorRT-RTX; TensorRT builds for the GPU it runs on)."""
    from edgetok.plugins import library

    if not uses:
        if opts.serialize_plugins:
            raise EdgetokError(f"--serialize-plugins: {Path(opts.onnx).name} has no edgetok plugin nodes, so there is "
                               "no plugin library to put into the engine; drop --serialize-plugins")
        return None
    archs = _cubin_archs(opts, backend) if backend.name == "tensorrt-rtx" else []
    chosen = library.for_build(opts.plugin_lib, opts.python_plugins, archs, say)
    if chosen is None and opts.serialize_plugins:
        raise EdgetokError("--serialize-plugins puts edgetok's C++ plugin library into the engine, and this build uses "
                           "the Python plugins; build the library (edgetok plugins build --lib) or give --plugin-lib, "
                           "without --python-plugins")
    if chosen is not None:
        say(f"edgetok plugins from the C++ library {chosen[0]}" + (" (serialized into the engine)"
                                                                     if opts.serialize_plugins else ""))
    return chosen


def _library_record(uses: list[dict], chosen: tuple[Path, dict], serialized: bool) -> dict:
    """The plugin part of the request record for a build with the C++ library: another library (or the Python
    plugins) rebuilds the engine."""
    path, record = chosen
    return {"uses": uses, "kernels": record["kernels"], "archs": record["archs"],
            "library": {"sha256": record["sha256"], "platform": record["platform"]}, "serialized": serialized}


def _library_report(setup: dict, chosen: tuple[Path, dict]) -> dict:
    from edgetok.plugins.library import build_note

    path, record = chosen
    return {
        "plugins": setup["uses"],
        "kernels_digest": setup["kernels"],
        "library": {"path": str(path), "file": path.name, "sha256": record["sha256"], "bytes": record["bytes"],
                    "platform": record["platform"], "archs": record["archs"],
                    "tensorrt_headers": record["tensorrt_headers"]["version"], "serialized": setup["serialized"]},
        "requires_edgetok_runtime": False,
        "runtime": build_note(record, setup["serialized"]),
    }


def cubins_source(archs: list[str]) -> str:
    """Where the cubins for ``archs`` will come from: the cache (compiled before, for this Triton and these
    kernel sources), or a compile, which takes minutes, so only a compile is announced as one."""
    from edgetok.plugins import cubins

    cached = set(cubins.cached_archs())
    missing, have = [a for a in archs if a not in cached], [a for a in archs if a in cached]
    if not missing:
        return f"plugin cubins for {', '.join(have)} from the cache"
    return f"compiling the plugin kernels for {', '.join(missing)}" + (f" ({', '.join(have)} from the cache)" if have else "")


def _stage_bundle(setup: dict, source: Path, target: Path, say: Callable[[str], None]) -> None:
    """Put the cubins beside the engine-to-be, in the staging folder, so that they are published with it:
    a copy of the export's bundle when it covers every architecture needed and passes verification (the copy
    itself is verified, so what ships is what was checked), else freshly compiled ones from our own sources."""
    import shutil

    from edgetok.plugins import cubins
    from edgetok.plugins.spec import PluginError

    beside = cubins.bundle_path(source)
    if beside.is_file():
        shutil.copyfile(beside, target)
        try:  # tampered, foreign, a zip bomb, a forged parameter layout, other kernel sources: never shipped
            found = cubins.Bundle.open(target)
            lacking = [a for a in setup["archs"] if a not in found.archs]
            why = f"{beside.name} has no {lacking[0]} cubins" if lacking else None
        except PluginError as exc:
            why = str(exc).replace(str(target), beside.name).split("; rebuild it")[0]
        if why is None:
            say(f"using the plugin cubins in {beside.name} (verified)")
            return
        target.unlink()
        say(f"{why}; compiling the plugin kernels instead")
    say(cubins_source(setup["archs"]))
    try:
        cubins.write_bundle(target, setup["archs"], say=lambda text: text.startswith("wrote ") or say(text))
    except ImportError as exc:
        raise EdgetokError(f"compiling the plugin kernels needs Triton ({exc.name} is missing): pip install triton, "
                           f"or put a bundle from `edgetok plugins build -o {beside}` beside the ONNX") from None


def stale_reason(out: Path, source: Path, record: dict) -> str | None:
    """Why the engine at ``out`` is not what this build would make (None: it is)."""
    report, why = sidecar.request_mismatch(report_path(out), record, "build report")
    if why:
        return why
    if (report.get("source_onnx") or {}).get("sha256") != sidecar.file_sha256(source):
        return f"it was built from another {source.name}"
    if (report.get("engine") or {}).get("sha256") != sidecar.file_sha256(out):
        return "the engine file changed after its build"
    cubins = (report.get("edgetok_plugins") or {}).get("cubins")
    if cubins:
        beside = out.with_name(cubins["file"])
        if not beside.is_file() or sidecar.file_sha256(beside) != cubins["sha256"]:
            return f"its plugin kernels {cubins['file']} are missing or changed"
    return None


RUNTIME_NOTE = ("edgetok Python plugins: the process that deserializes this engine must first call "
                "edgetok.plugins.tensorrt.register(trt, bundle_path) with the .cubins.zip beside it "
                "(edgetok profile/eval do); trtexec and C++ applications cannot run it")


def _bundle_summary(path: Path) -> dict:
    """The bundle's manifest in brief: architectures, compiler versions, kernels and their parameters."""
    from edgetok.plugins.cubins import Bundle

    manifest = Bundle.open(path).manifest
    return {
        "archs": list(manifest["archs"]),
        "edgetok": manifest.get("edgetok"),  # provenance: the edgetok version whose build wrote the bundle
        "triton": manifest.get("triton"),
        "ptx_version": manifest.get("ptx_version"),
        # per architecture: its target and PTX ISA, the ptxas that assembled its cubins and the oldest driver
        # (cuDriverGetVersion, 12000 = CUDA 12.0) that loads them, and the one that JIT-compiles its PTX
        # (bundles before format 3 record neither)
        "targets": {a: {k: v for k, v in info.items()
                        if k in ("target", "ptx_version", "assembler", "cubin_driver", "ptx_driver")}
                    for a, info in manifest["archs"].items()},
        "kernels": {name: {"plugin": k.get("plugin"), "num_warps": k.get("num_warps"),
                           "params": [f"{p['name']}:{p['type']}" for p in k["params"]],
                           "hidden_params": sum(bool(p.get("hidden")) for p in k["params"])}
                    for name, k in manifest["kernels"].items()},
    }


def _plugins_report(setup: dict, bundle: Path) -> dict:
    return {
        "plugins": setup["uses"],
        "kernels_digest": setup["kernels"],
        "cubins": {"file": bundle.name, "bytes": bundle.stat().st_size, "sha256": sidecar.file_sha256(bundle),
                   **_bundle_summary(bundle)},
        "requires_edgetok_runtime": True,
        "runtime": RUNTIME_NOTE,
    }


def _check_fp8(model: onnx.ModelProto, opts: BuildOptions, backend: Backend) -> None:
    """An FP8 model builds only for GPUs with FP8 (TensorRT-RTX "builds" one for default targets that include
    Ampere, which cannot run it)."""
    from edgetok.onnx.qdq import check_fp8_targets, is_fp8

    if not is_fp8(model):
        return
    name = Path(opts.onnx).name
    if backend.name == "tensorrt-rtx":
        if not opts.targets:
            raise EdgetokError(f"{name} is FP8 and TensorRT-RTX's default targets include SM 8.0 and 8.6, which have no "
                               "FP8; give --target sm89 (and/or sm120)")
        check_fp8_targets(opts.targets, f"{name} is FP8 (--target)")
        return
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        check_fp8_targets([f"sm{major}{minor}"], f"{name} is FP8 and this GPU")


def build_engine(opts: BuildOptions, say: Callable[[str], None] = lambda s: None, reuse: bool = False) -> dict:
    """Build ``opts.onnx``; with ``reuse`` (recipes), keep an existing engine built the same way from the same ONNX."""
    backend, why = select(opts.backend)
    if why:
        say(why)
    version = backend.version()
    if opts.precision not in ("fp32", "fp16", "bf16"):
        raise EdgetokError(f"--precision {opts.precision!r} is unknown; choose fp32, fp16 or bf16")
    backend.check(opts, version)
    for lib in opts.plugins:
        if not Path(lib).is_file():
            raise EdgetokError(f"--plugins {lib} does not exist; give the path of a plugin .so")
    if opts.dla_core is not None and opts.precision == "fp32":
        raise EdgetokError("--dla-core needs --precision fp16 (DLA runs fp16 or int8)")
    model = _load_onnx(opts.onnx)
    from edgetok.onnx.lint import lint

    qdq = [f for f in lint(model) if f.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if qdq:  # the parser would refuse these with a less helpful message, after the worker started
        raise EdgetokError(f"{Path(opts.onnx).name}: {len(qdq)} Q/DQ node(s) TensorRT rejects: {qdq[0]}")
    _check_fp8(model, opts, backend)
    side = sidecar.read(opts.onnx) if sidecar.sidecar_path(opts.onnx).is_file() else None
    profiles = resolve_profiles(model, opts, side)
    quantized = ((side or {}).get("quantization") or {}).get("mode")
    out = Path(opts.output) if opts.output else default_output(opts, backend, quantized)
    if out.suffix not in (".engine", ".plan", ".trt"):
        raise EdgetokError(f"-o {out} should end in .engine (or .plan / .trt)")
    source = Path(opts.onnx)
    uses = _plugin_uses(model, source)
    if uses and backend.name == "tensorrt-rtx" and not opts.targets:
        # TensorRT-RTX's defaults include SM 8.0, for which there are no plugin kernels: name the targets
        opts = dataclasses.replace(opts, targets=list(RTX_DEFAULT_ARCHS))
        say(f"targets {', '.join(opts.targets)}: the architectures edgetok's plugin kernels are compiled for")
    library = _library_setup(opts, backend, uses, say)
    plugin_setup = _library_record(uses, library, opts.serialize_plugins) if library \
        else _plugin_setup(opts, backend, source, uses)
    record = _request_record(opts, backend, profiles, plugin_setup)
    if reuse and out.is_file():
        why = stale_reason(out, source, record)
        if why is None:
            say(f"reusing {out}: built from this ONNX with these options")
            report = json.loads(report_path(out).read_text())
            return {**report, "path": str(out), "reused": True}
        say(f"rebuilding {out}: {why}")
    backend.prepare()

    with atomic.staging_dir(out) as stage:
        work = stage / "work"
        work.mkdir()
        bundle = None
        if plugin_setup and not library:  # the library carries its kernels: no bundle beside the engine
            from edgetok.plugins.cubins import bundle_path

            bundle = stage / bundle_path(out.name).name
            _stage_bundle(plugin_setup, source, bundle, say)
        conversion = None
        onnx_to_parse = source
        if opts.precision != "fp32" and backend.strongly_typed(version):
            from edgetok.onnx.fp16 import MIN_COSINE, MIN_COSINE_QDQ, compare_precisions, convert_to_fp16

            say("converting the ONNX to fp16 (strongly typed network)")
            onnx_to_parse = work / f"{source.stem}.fp16.onnx"
            convert_to_fp16(source, onnx_to_parse)
            say("validating the fp16 ONNX in ONNX Runtime")
            try:
                qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
                conversion = compare_precisions(source, onnx_to_parse, example_inputs(model, profiles),
                                                MIN_COSINE_QDQ if qdq else MIN_COSINE)
            except EdgetokError:
                raise
            except Exception as exc:  # the converter wrote a graph ONNX Runtime will not load (seen on LLM decoders)
                raise EdgetokError(f"the fp16 conversion of {opts.onnx} is a graph ONNX Runtime will not load "
                                   f"({_load_failure(exc, onnx_to_parse)}); build it with --precision fp32") from None

        counts, kept = {}, {}
        if uses and (sizes_outputs(model) or attention_kept_outputs(model)):
            onnx_to_parse, counts, kept = _with_token_counts(onnx_to_parse, work)
            say(f"reporting what each image keeps: engine outputs {', '.join([*counts.values(), *kept.values()])}")
        request = {
            "backend": backend.name,
            "onnx": str(onnx_to_parse.resolve()),
            "engine": str(stage / out.name),
            "config": backend.config(opts, version),
            "profiles": [[p.as_dict() for p in profiles]],
            "plugins": [str(Path(p).resolve()) for p in opts.plugins],
            "save_timing_cache": opts.timing_cache if backend.name == "tensorrt" else None,
            "edgetok_plugins": {"bundle": str(bundle)} if bundle else
                               {"library": str(library[0]), "serialize": opts.serialize_plugins} if library else None,
        }
        event, log_tail = _run_worker(request, work, say)
        if event.get("event") == "parse_error":
            nodes = _name_failed_nodes(event["nodes"], model)
            listed = "; ".join(f"{n['node']} ({n['op_type']}): {n['reason']}" for n in nodes[:5])
            more = f"; and {len(nodes) - 5} more" if len(nodes) > 5 else ""
            raise EdgetokError(
                f"{backend.name} cannot parse {source.name}: {len(nodes)} node(s) failed: {listed}{more}; "
                "`edgetok export` lints for such ops before writing a model"
            )
        if event.get("event") != "result":
            detail = f" (log: {log_tail})" if log_tail and not event.get("plugin") else ""
            raise EdgetokError(f"{backend.name} build failed: {event.get('message', 'no result')}{detail}")

        engine_file = stage / out.name
        report = sidecar.stamp({
            "kind": "engine",
            "engine": {"file": out.name, "bytes": engine_file.stat().st_size,
                       "sha256": sidecar.file_sha256(engine_file)},
            "request": record,
            "backend": {"name": backend.name, "version": event["library_version"]},
            "precision": opts.precision,
            "strongly_typed": backend.strongly_typed(version),
            "fp16_conversion": conversion,
            "profiles": [[p.as_dict() for p in profiles]],
            "settings": {k: v for k, v in request["config"].items() if k != "strongly_typed"},
            **backend.notes(opts),
            "build_seconds": round(event["build_seconds"], 2),
            "network_layers": _layer_counts(event["network_layers"]),
            "network_outputs": event.get("network_outputs"),
            "engine_layers": event["engine_layers"],
            "engine_inspector": event["engine_inspector"],
            "source_onnx": {"path": str(source.resolve()), "sha256": sidecar.file_sha256(source)},
            "plugins": request["plugins"],
            "plugin_notes": event.get("plugin_notes", []),
            "edgetok_plugins": _plugins_report(plugin_setup, bundle) if bundle else
                               _library_report(plugin_setup, library) if library else None,
            "token_count_outputs": {str(block): name for block, name in counts.items()} or None,
            "attention_kept_outputs": {str(block): name for block, name in kept.items()} or None,
            "export": {k: side[k] for k in ("model", "reduction", "flops", "input_shape", "preprocessing",
                                            "quantization") if k in side} if side else None,
        })
        sidecar.write(stage / report_path(out).name, report)
        work_files = list(work.iterdir())
        for f in work_files:
            f.unlink()
        work.rmdir()
        atomic.publish(stage, out.parent)
    report["path"] = str(out)
    return report


def _drivers_lines(targets: dict) -> list[str]:
    """The cubins' assemblers and the drivers each form needs, one line per assembler (sm86-sm90 share
    CUDA 12's ptxas, sm110/sm120 CUDA 13's)."""
    from edgetok.plugins.cubins import cuda_text

    groups: dict[tuple, list[str]] = {}
    for arch, info in targets.items():
        if "assembler" in info:  # bundles before format 3 do not record it
            groups.setdefault((info["assembler"], info["cubin_driver"]), []).append(arch)
    lines = []
    for (assembler, driver), archs in groups.items():
        jit: dict[str, list[str]] = {}
        for arch in archs:
            jit.setdefault(cuda_text(targets[arch]["ptx_driver"]), []).append(arch)
        lines.append(f"  cubins     {', '.join(archs)}: ptxas {assembler}, load on CUDA {cuda_text(driver)}+ drivers; "
                     "their PTX JIT-compiles on " + ", ".join(f"{version}+" + (f" ({', '.join(a)})" if len(jit) > 1 else "")
                                                       for version, a in jit.items()))
    return lines


def summary(report: dict) -> str:
    profile = report["profiles"][0][0]
    conv = report["fp16_conversion"]
    lines = [
        f"{'reused' if report.get('reused') else 'wrote'} {report['path']} ({report['engine']['bytes'] / 1e6:.1f} MB)"
        f" + {report_path(report['path']).name}",
        f"  backend    {report['backend']['name']} {report['backend']['version']}, {report['precision']}"
        + (", strongly typed" if report["strongly_typed"] else ""),
        f"  profile    {profile['name']}: min {profile['min']} opt {profile['opt']} max {profile['max']}",
        f"  built in   {report['build_seconds']:.1f} s, {report['network_layers']['count']} network layers",
    ]
    if "targets" in report:
        targets = report["targets"]
        lines.append(f"  targets    {', '.join(targets) if isinstance(targets, list) else targets}")
    if conv:
        lines.append(f"  fp16 ONNX  validated in ONNX Runtime: cosine {conv['cosine']:.6f}, "
                     f"max |diff| {conv['max_abs_diff']:.2e}")
    plugins = report.get("edgetok_plugins")
    if plugins and plugins.get("library"):
        lib = plugins["library"]
        lines.append("  plugins    " + ", ".join(f"{p['namespace']}::{p['name']} v{p['version']} x{p['nodes']}"
                                                 for p in plugins["plugins"])
                     + f"; C++ library {lib['path']} ({lib['platform']}; {', '.join(lib['archs'])})"
                     + (", serialized into the engine" if lib["serialized"] else ""))
    elif plugins:
        cubins = plugins["cubins"]
        lines.append("  plugins    " + ", ".join(f"{p['namespace']}::{p['name']} v{p['version']} x{p['nodes']}"
                                                 for p in plugins["plugins"])
                     + f"; kernels in {cubins['file']} ({', '.join(cubins['archs'])}); runs only where edgetok "
                     "registers its plugins (Python)")
        lines += _drivers_lines(cubins.get("targets") or {})
    if report["engine_layers"] is None:
        lines.append(f"  engine     per-layer info unavailable: {report['engine_inspector']}")
    return "\n".join(lines)
