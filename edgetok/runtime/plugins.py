"""Make edgetok's plugins available wherever a model is opened: ONNX Runtime sessions (export validation,
``profile``, ``eval``) and TensorRT engines (before deserializing). A graph or engine without edgetok nodes
is left alone, so nothing here is needed, or imported, for plain models."""

from __future__ import annotations

import json
from pathlib import Path

from edgetok.errors import EdgetokError


def onnx_needs_plugins(model) -> list[dict]:
    """The edgetok plugins an ONNX model (a path, or a model already loaded) uses ([] for none); unknown ops
    or versions raise one line."""
    import onnx

    from edgetok.plugins.spec import NAMESPACE, uses

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    if not any(n.domain == NAMESPACE for n in model.graph.node):
        return []
    return uses(model)


def prepare_ort(options, path: str | Path, model=None) -> list[dict]:
    """Register the edgetok ONNX Runtime ops on ``options`` if the graph at ``path`` (``model``, when the
    caller has it loaded already) has edgetok nodes."""
    needed = onnx_needs_plugins(path if model is None else model)
    if needed:
        try:
            from edgetok.plugins import ort_ops
        except ImportError:  # pragma: no cover - a dependency of edgetok
            raise EdgetokError(f"{path} has edgetok plugin nodes; ONNX Runtime runs them with "
                               "onnxruntime-extensions: pip install onnxruntime-extensions") from None
        ort_ops.register(options)
    return needed


def engine_plugins(engine: str | Path) -> list[dict]:
    """The edgetok plugins an engine was built with, from its build report ([] if it has none)."""
    report = Path(f"{engine}.build.json")
    if not report.is_file():
        return []
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        raise EdgetokError(f"{report} is not a readable build report ({type(exc).__name__}); rebuild the engine "
                           "with edgetok build-engine") from None
    return list((data.get("edgetok_plugins") or {}).get("plugins") or [])


def data_dependent_plugins(engine: str | Path) -> list[str]:
    """The engine's plugins whose output sizes follow the input (a size-tensor output), by name."""
    from edgetok.plugins.spec import get

    found = []
    for use in engine_plugins(engine):
        spec = get(use["name"], use.get("version", "1"))
        if any(t.size_tensor for t in spec.outputs):
            found.append(use["name"])
    return found


def _report_plugins(engine: str | Path) -> dict:
    report = Path(f"{engine}.build.json")
    return (json.loads(report.read_text()).get("edgetok_plugins") or {}) if report.is_file() else {}


def engine_host_code(engine: str | Path) -> bool:
    """Whether the engine carries edgetok's plugin library inside (build-engine --serialize-plugins): the
    runtime must then be allowed to run the engine's host code."""
    return bool((_report_plugins(engine).get("library") or {}).get("serialized"))


def prepare_engine(trt, engine: str | Path) -> list[dict]:
    """Make edgetok's TensorRT plugins available before the engine is deserialized: for an engine built with
    the C++ library, load that library (unless it is serialized into the engine); for one built with the
    Python plugins, register them (launching the cubins carried beside the engine), and check now what enqueue
    would otherwise fail on inside TensorRT, which only logs it: the bundle is there, matches this edgetok's
    kernels, and has intact cubins (or PTX) that this GPU and its driver can load."""
    from edgetok.plugins.cubins import Bundle, bundle_path

    needed = engine_plugins(engine)
    built = _report_plugins(engine) if needed else {}
    if built.get("library"):
        if not built["library"].get("serialized"):
            from edgetok.plugins import library

            library.load(trt, library.locate(built, engine))
        return needed
    bundle = bundle_path(engine)
    if not bundle.is_file():
        if needed:
            raise EdgetokError(f"{engine} uses edgetok plugins ({', '.join(p['name'] for p in needed)}) whose kernels "
                               f"come in {bundle.name} beside it, which is missing; copy it along with the engine "
                               "(edgetok profile --host does) or rebuild the engine with edgetok build-engine")
        return []
    from edgetok.plugins import launch
    from edgetok.plugins.tensorrt import register

    launch.preflight(Bundle.open(bundle), launch.device_capability(), launch.driver_version())
    register(trt, bundle)
    return needed


def run_failure() -> str | None:
    """Why an edgetok plugin failed while an engine ran (TensorRT only logs that it did); None if none did."""
    import sys

    if "edgetok.plugins.tensorrt" not in sys.modules:
        return None
    from edgetok.plugins.tensorrt import failures

    found = failures(clear=True)
    return found[0] if found else None
