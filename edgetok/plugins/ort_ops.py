"""ONNX Runtime (CPU) ops for every plugin spec, through onnxruntime-extensions Python custom ops.

Each op runs the plugin's registered reference, so a graph holding ``edgetok`` nodes runs in ONNX Runtime
and is checked against PyTorch like any other export. Python and numpy: for checking, not for speed.
Output shapes are those of the returned arrays, so data-dependent outputs (TokenPrune's [B, K, C]) need
nothing special; a size tensor comes back as a 0-d int64.

The ops are Python called from C++, and onnxruntime-extensions' kernel has no way to report a Python
exception: one that leaves the callback (a bug in a reference, or the KeyboardInterrupt of Ctrl-C and the
``Terminated`` our SIGTERM handler raises, which Python delivers at the next bytecode, inside the op) ends in
``std::terminate``: exit 134, no cleanup, temporary files left behind. So the callback never raises. It
remembers the exception, returns empty outputs of the declared types and sets ``RunOptions.terminate`` so ONNX
Runtime stops before the next node, and ``Session.run`` raises the remembered exception once ONNX Runtime has
returned, where unwinding runs every cleanup. A signal whose handler would run in the callback's own frame,
outside the ``try`` that guards the op (its first instruction, its error path), is deferred the same way.
"""

from __future__ import annotations

import functools
import signal
import threading

from edgetok.plugins.spec import NAMESPACE, specs

_DEFINED: set[str] = set()
_PENDING: list = []  # what the next Session.run raises: an op's exception, or a deferred (signum, handler)
_RUNS: list = []  # the RunOptions of the runs in progress, told to terminate when an op fails
_TERMINATED: list = []  # those we told to, reset afterwards (a caller may reuse its RunOptions)
_ORIGINAL: dict = {}  # onnxruntime-extensions' own callback


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
    _guard()
    options.register_custom_ops_library(get_library_path())


def _guard() -> None:
    """Install the guarded callback and run methods (once), and guard the current SIGINT and SIGTERM handlers
    (again whenever one was replaced, as `edgetok`'s main does for SIGTERM on each call)."""
    if not _ORIGINAL:
        from onnxruntime.capi.onnxruntime_inference_collection import Session
        from onnxruntime_extensions import PyCustomOpDef
        from onnxruntime_extensions._ocos import _on_pyop_invocation

        _ORIGINAL["callback"] = _on_pyop_invocation
        for name, options_at in (("run", 2), ("run_with_ort_values", 2), ("run_with_iobinding", 1)):
            setattr(Session, name, _checked(getattr(Session, name), options_at))
        PyCustomOpDef.install_hooker(_callback)
    if threading.current_thread() is not threading.main_thread():
        return  # handlers can only be set there
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if callable(handler) and not hasattr(handler, "edgetok_guarded"):
            signal.signal(sig, _guarded(handler))


def _callback(k_id, feed, attributes):
    """What onnxruntime-extensions' kernel calls: the op, or, once something failed, empty outputs."""
    try:
        if not _PENDING:
            return _op(k_id, feed, attributes)
    except BaseException as exc:  # noqa: B036 - nothing may reach C++, KeyboardInterrupt included
        _PENDING.append(exc)
    for options in list(_RUNS):
        options.terminate = True
        _TERMINATED.append(options)
    return _empty_outputs(k_id)


def _op(k_id, feed, attributes):
    """The op itself; a signal handler that raises in here (or deeper) raises into ``_callback``'s ``try``."""
    return _ORIGINAL["callback"](k_id, feed, attributes)


def _empty_outputs(k_id):
    """Well-formed outputs (shape [0], the declared element types) for a node whose run is being stopped."""
    import numpy as np
    import onnx
    from onnxruntime_extensions import Opdef

    types = Opdef._odlist[k_id]._nativedef.output_types
    return (k_id, *(part for t in types for part in ((0,), np.empty(0, onnx.helper.tensor_dtype_to_np_dtype(t)))))


def _in_callback(frame) -> bool:
    """Whether Python is running ``_callback``'s own code (or a helper it calls) rather than the op."""
    while frame is not None:
        if frame.f_code is _op.__code__:
            return False
        if frame.f_code is _callback.__code__:
            return True
        frame = frame.f_back
    return False


def _guarded(handler):
    """``handler``, except where an exception it raises would reach C++: there the signal is remembered and
    handled by ``Session.run`` once ONNX Runtime has returned."""
    @functools.wraps(handler)
    def on_signal(signum, frame):
        if _in_callback(frame):
            _PENDING.append((signum, handler))
            return None
        return handler(signum, frame)

    on_signal.edgetok_guarded = handler
    return on_signal


def _checked(method, options_at: int):
    """A Session run method that passes RunOptions our ops can stop, and raises what an op remembered."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        from onnxruntime import RunOptions

        args = list(args)
        if len(args) > options_at:
            options = args[options_at] = args[options_at] or RunOptions()
        else:
            options = kwargs["run_options"] = kwargs.get("run_options") or RunOptions()
        _raise_pending()
        _RUNS.append(options)
        try:
            result = method(self, *args, **kwargs)
        except BaseException:
            _raise_pending()
            raise
        finally:
            _RUNS.remove(options)
            while options in _TERMINATED:
                _TERMINATED.remove(options)
                options.terminate = False
        _raise_pending()
        return result

    return run


def _raise_pending() -> None:
    if not _PENDING:
        return
    # An interruption first: the user asked to stop, whatever else failed meanwhile.
    first = next((p for p in _PENDING if not isinstance(p, Exception)), _PENDING[0])
    _PENDING.clear()
    if isinstance(first, BaseException):
        raise first from None
    signum, handler = first
    handler(signum, None)  # raises KeyboardInterrupt or Terminated, as it would have in the op
