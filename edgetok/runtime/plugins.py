"""Make edgetok's plugins available wherever a model is opened: ONNX Runtime sessions (export validation,
``profile``, ``eval``) and TensorRT engines (before deserializing). A graph or engine without edgetok nodes
is left alone, so nothing here is needed, or imported, for plain models."""

from __future__ import annotations

import json
from pathlib import Path

from edgetok.errors import EdgetokError


def onnx_needs_plugins(path: str | Path) -> list[dict]:
    """The edgetok plugins an ONNX file uses ([] for none); unknown ops or versions raise one line."""
    import onnx

    from edgetok.plugins.spec import NAMESPACE, uses

    model = onnx.load(str(path), load_external_data=False)
    if not any(n.domain == NAMESPACE for n in model.graph.node):
        return []
    return uses(model)


def prepare_ort(options, path: str | Path) -> list[dict]:
    """Register the edgetok ONNX Runtime ops on ``options`` if the graph at ``path`` has edgetok nodes."""
    needed = onnx_needs_plugins(path)
    if needed:
        try:
            from edgetok.plugins import ort_ops
        except ImportError:  # pragma: no cover - a dependency of edgetok
            raise EdgetokError(f"{path} has edgetok plugin nodes; ONNX Runtime runs them with "
                               "onnxruntime-extensions: pip install onnxruntime-extensions") from None
        ort_ops.register(options)
    return needed


def engine_plugins(engine: str | Path) -> list[dict]:
    """The edgetok plugins an engine was built with, from its build report ([] if none or no report)."""
    report = Path(f"{engine}.build.json")
    if not report.is_file():
        return []
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return []
    return list((data.get("edgetok_plugins") or {}).get("plugins") or [])


def prepare_engine(trt, engine: str | Path) -> list[dict]:
    """Register edgetok's TensorRT plugins (launching the cubins carried beside the engine) before it is
    deserialized; a missing bundle is named with its fix."""
    needed = engine_plugins(engine)
    if not needed:
        return []
    from edgetok.plugins.cubins import bundle_path
    from edgetok.plugins.tensorrt import register

    bundle = bundle_path(engine)
    if not bundle.is_file():
        raise EdgetokError(f"{engine} uses edgetok plugins ({', '.join(p['name'] for p in needed)}) whose kernels "
                           f"come in {bundle.name} beside it, which is missing; copy it along with the engine "
                           "(edgetok profile --host does) or rebuild the engine with edgetok build-engine")
    register(trt, bundle)
    return needed
