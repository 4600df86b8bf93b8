"""ONNX Runtime (CPU) ops for every plugin spec, through onnxruntime-extensions Python custom ops.

Each op runs the plugin's registered reference, so a graph holding ``edgetok`` nodes runs in ONNX Runtime
and is checked against PyTorch like any other export. Python and numpy: for checking, not for speed.
Output shapes are those of the returned arrays, so data-dependent outputs (TokenPrune's [B, K, C]) need
nothing special; a size tensor comes back as a 0-d int64.
"""

from __future__ import annotations

from edgetok.plugins.spec import NAMESPACE, specs

_DEFINED: set[str] = set()


def _define(spec) -> None:
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from edgetok.plugins.spec import run_reference

    types = {int: PyCustomOpDef.dt_int64, float: PyCustomOpDef.dt_float}
    tensors = {"float32": PyCustomOpDef.dt_float, "float16": PyCustomOpDef.dt_float16,
               "int32": PyCustomOpDef.dt_int32, "int64": PyCustomOpDef.dt_int64}
    attrs = {f.name: types[f.type] for f in spec.fields}
    attrs["plugin_version"] = PyCustomOpDef.dt_string

    def compute(*inputs, **fields):
        import numpy as np

        fields.pop("plugin_version", None)  # the version was checked when the graph was opened
        outputs = run_reference(spec.name, list(inputs), fields)
        return tuple(np.asarray(o, dtype=t.dtypes[0]) for o, t in zip(outputs, spec.outputs))

    onnx_op(op_type=f"{NAMESPACE}::{spec.name}", inputs=[tensors[t.dtypes[0]] for t in spec.inputs],
            outputs=[tensors[t.dtypes[0]] for t in spec.outputs], attrs=attrs)(compute)


def register(options) -> None:
    """Make every edgetok op available to sessions created with ``options`` (ORT SessionOptions)."""
    from onnxruntime_extensions import get_library_path

    for name, spec in specs().items():
        if name not in _DEFINED:  # ops must exist before the library is registered
            _define(spec)
            _DEFINED.add(name)
    options.register_custom_ops_library(get_library_path())
