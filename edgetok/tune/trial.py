"""One trial's work, as a Ray worker runs it: :func:`prepare` (export, quantize, evaluate: CPU, any node) and
:func:`measure` (build and profile: on a node that offers the target). Plain functions over plain data, so
they run the same in a Ray task, an actor or a test, and go through the same library calls as `edgetok export
vit`, `quantize`, `eval`, `build-engine` and `profile` (no second path whose numbers could differ).

Artifacts travel as bytes (Ray's object store), each with its SHA-256, checked where it lands: a worker on a
Jetson shares no folder with the workstation.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from pathlib import Path

from edgetok.errors import EdgetokError

EXPORT_NAME = "model.onnx"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _node() -> dict:
    """Where this runs: the Ray node id (None outside Ray) and the host name."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"node_id": node, "host": socket.gethostname(), "pid": os.getpid()}


def unpack(files: dict[str, dict], folder: Path) -> None:
    """Write ``files`` ({name: {"bytes", "sha256"}}) into ``folder``, each checked against its SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, item in files.items():
        if Path(name).name != name:
            raise EdgetokError(f"artifact name {name!r} is not a plain file name")
        if sha256(item["bytes"]) != item["sha256"]:
            raise EdgetokError(f"artifact {name} arrived with SHA-256 {sha256(item['bytes'])[:12]}…, not the "
                               f"{item['sha256'][:12]}… it was sent with: the transfer corrupted it")
        (folder / name).write_bytes(item["bytes"])


def pack(folder: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file():
            data = path.read_bytes()
            files[path.name] = {"bytes": data, "sha256": sha256(data)}
    return files


def export_options(config: dict, spec: dict, output: str):
    """The ``edgetok export vit`` options of a trial's configuration."""
    from edgetok.vit.export import ViTExportOptions

    options = dict(config["options"])
    if config["method"] == "dtome":
        options["calibrate"] = spec["calibrate"]
    sparse = config.get("attention") == "sparse"
    return ViTExportOptions(model=spec["model"], checkpoint=spec.get("checkpoint"), method=config["method"],
                            output=output, plugins=bool(config.get("plugins")), attention="sparse" if sparse else None,
                            attention_block=config.get("attention_block") if sparse else None,
                            attention_mass=config.get("attention_mass") if sparse else None, **options)


def prepare(config: dict, spec: dict, reference: dict | None = None) -> dict:
    """Export (and quantize) the trial's model and evaluate it on ``spec["data"]``; ``reference``: the dense
    export's files, for the agreement metric. Returns the files (bytes + SHA-256), which of them is the model
    the trial is about, its accuracy and FLOPs, and where it ran."""
    from edgetok import sidecar
    from edgetok.vit.export import export_vit
    from edgetok.workflows.evaluate import EvalOptions, evaluate

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgetok-tune-") as work:
        folder = Path(work) / "trial"
        exported = export_vit(export_options(config, spec, str(folder / EXPORT_NAME)))
        model = folder / EXPORT_NAME
        quantized = None
        if config["precision"] in ("int8", "fp8"):
            from edgetok.workflows.quantize import QuantizeOptions, quantize

            quantized = quantize(QuantizeOptions(
                model=str(model), calibrate=spec["calibrate"], mode=config["precision"], samples=spec["samples"],
                output=str(folder / f"model_{config['precision']}.onnx"),
                targets=[] if spec["target"] == "cpu" else [spec["target"]]))
            model = folder / f"model_{config['precision']}.onnx"
        reference_path = None
        if reference is not None:
            unpack(reference["files"], Path(work) / "dense")
            reference_path = str(Path(work) / "dense" / reference["artifact"])
        accuracy = evaluate(EvalOptions(model=str(model), data=spec["data"], batch=spec["eval_batch"],
                                        reference=reference_path))
        accuracy.pop("dataset", None)
        if "reference" in accuracy:
            accuracy["reference"]["model"] = "the dense trial's export"
        files = pack(folder)
        side = sidecar.read(model)
    flops = dict(exported.get("flops") or {})
    if accuracy.get("gmacs"):  # tokens (or attention blocks) follow the image: what the images cost on average
        flops["reduced_gmacs"] = accuracy["gmacs"]["mean"]
        flops["reduced_gmacs_from"] = "eval: the mean over the images"
    return {"files": files, "artifact": model.name, "accuracy": accuracy, "flops": flops,
            "tokens_per_layer": exported["reduction"].get("tokens_per_layer"),
            "quantization": (quantized or {}).get("quantization") if quantized else None,
            "sidecar_sha256": side.get("onnx", {}).get("sha256"), "node": _node(),
            "seconds": round(time.monotonic() - start, 3)}


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def measure(config: dict, spec: dict, files: dict, artifact: str) -> dict:
    """Build (engine targets) and profile the trial's model on this node. ``--target cpu``: ONNX Runtime's CPU
    provider here. An engine target: TensorRT on the node's GPU (``--device jetson`` on a Jetson). A node
    offering the target's resource without a GPU is refused, unless ``spec["cpu_stand_in"]``: then the model
    is profiled with ONNX Runtime on that node's CPU and recorded as a stand-in (a fleet's plumbing, tried
    without devices)."""
    from edgetok.profile.profiler import ProfileOptions, profile

    start = time.monotonic()
    node = _node()
    with tempfile.TemporaryDirectory(prefix="edgetok-tune-measure-") as work:
        folder = Path(work)
        unpack(files, folder)
        model, build, device = folder / artifact, None, "cpu"
        if spec["target"] != "cpu":
            if _has_gpu():
                from edgetok.engine.build import build_engine
                from edgetok.engine.options import BuildOptions
                from edgetok.profile import jetson

                batch = spec["batch"]
                build = build_engine(BuildOptions(
                    onnx=str(model), output=str(folder / "model.engine"), batch=f"{batch}:{batch}:{batch}",
                    precision="fp16" if config["precision"] == "fp16" else "fp32"))
                model = Path(build["path"])
                device = "jetson" if jetson.is_jetson() else "cuda"
            elif not spec.get("cpu_stand_in"):
                raise EdgetokError(f"node {node['host']} ({node['node_id']}) offers the resource {spec['target']} but "
                                   "has no CUDA GPU here; start it without that resource, or pass --cpu-stand-in to "
                                   "try the fleet's plumbing with ONNX Runtime on its CPU")
        result = profile(ProfileOptions(models=[str(model)], device=device, batch=spec["batch"],
                                        duration_s=spec["duration_s"], warmup_ms=spec["warmup_ms"],
                                        threads=spec.get("threads", 0)))
    entry = result["models"][0]
    if spec["target"] == "cpu":
        where = f"cpu: ONNX Runtime on {result['environment'].get('cpu', 'this CPU')}"
    elif build is None:
        where = (f"cpu stand-in for {spec['target']}: ONNX Runtime on {result['environment'].get('cpu', 'the CPU')}"
                 " (this node has the resource but no GPU; no engine was built)")
    else:
        env = result["environment"]
        where = f"{device}: {env.get('jetson_model') or ', '.join(map(str, env.get('gpus') or [])) or spec['target']}"
    return {"latency_ms": entry["timings_ms"]["latency"], "throughput": entry.get("throughput"),
            "iterations": entry.get("iterations"), "batch": entry.get("batch"), "device": where,
            "runner": entry.get("runner"), "build": _build_record(build), "node": node,
            "seconds": round(time.monotonic() - start, 3)}


def _build_record(build: dict | None) -> dict | None:
    """What tune.json keeps of a build report: its settings and timings, not the engine's bytes."""
    if build is None:
        return None
    keep = ("engine", "backend", "precision", "strongly_typed", "profiles", "settings", "build_seconds",
            "network_layers", "edgetok_plugins", "versions")
    return {k: v for k, v in build.items() if k in keep}
