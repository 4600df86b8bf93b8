"""`edgetok plugins list`: the specs, and which implementations of each exist on this machine."""

from __future__ import annotations

import importlib.util

from edgetok.plugins.spec import NAMESPACE, specs


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def implementations() -> dict[str, str]:
    """Implementation -> what this machine has of it (same for every spec: each is derived from the spec)."""
    from edgetok.plugins import cubins

    built = cubins.cached_archs()
    missing = [a for a in cubins.ARCHS if a not in built]
    return {
        "reference": "yes (numpy)",
        "onnxruntime op": "yes (onnxruntime-extensions)" if _available("onnxruntime_extensions")
        else "no: pip install onnxruntime-extensions",
        "tensorrt plugin": "yes" if _available("tensorrt") else "no: tensorrt not installed",
        "tensorrt-rtx plugin": "yes" if _available("tensorrt_rtx") else "no: tensorrt-rtx not installed",
        "triton kernels": "yes (interpreter on CPU; JIT on a GPU)" if _available("triton") else "no: triton not installed",
        "cubins": (", ".join(built) if built else "none built")
        + (f"; not built: {', '.join(missing)} (edgetok plugins build)" if missing else ""),
    }


class _Symbol:
    """A stand-in input dim: the shape rule runs on it to show which output dims are data-dependent."""

    def __add__(self, other):
        return self

    __radd__ = __sub__ = __rsub__ = __add__


def _dynamic(spec, position: int) -> str:
    """' (size tensor)' or ' (dim 1 = count, data-dependent)' for an output, else ''."""
    from edgetok.plugins.spec import Dynamic

    if spec.outputs[position].size_tensor:
        return " (size tensor)"
    try:
        dims = spec.output_shapes([[_Symbol() for _ in range(t.rank)] for t in spec.inputs],
                                  {f.name: f.default for f in spec.fields})[position]
    except Exception:  # a rule that needs real numbers: nothing to say
        return ""
    found = [f"dim {k} = {spec.outputs[d.size_output].name}" for k, d in enumerate(dims) if isinstance(d, Dynamic)]
    return f" ({', '.join(found)}, data-dependent)" if found else ""


def describe() -> str:
    lines = []
    for name, spec in specs().items():
        lines.append(f"{NAMESPACE}::{name} version {spec.version} - {spec.doc}")
        lines.append(f"  fields   {spec.fields_doc()}")
        lines.append("  inputs   " + ", ".join(f"{t.name} {'/'.join(t.dtypes)} rank {t.rank}" for t in spec.inputs))
        lines.append("  outputs  " + ", ".join(f"{t.name} {'/'.join(t.dtypes)} rank {t.rank}{_dynamic(spec, i)}"
                                           for i, t in enumerate(spec.outputs)))
    lines.append("implementations here:")
    lines += [f"  {k:<20} {v}" for k, v in implementations().items()]
    return "\n".join(lines)
