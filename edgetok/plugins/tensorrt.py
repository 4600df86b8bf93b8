"""The edgetok plugins as TensorRT IPluginV3 classes, for ``tensorrt`` and ``tensorrt_rtx`` alike.

The two libraries expose the same Python plugin API under different module names, so the classes are made
per module (``register(trt, ...)``) from each plugin's spec: field names and types, outputs and their
dtypes, the output-shape rule and the checks all come from ``edgetok.plugins.spec``. Kernels are the
ahead-of-time compiled Triton cubins of a bundle (``<engine>.cubins.zip``), launched through cuda-python
(``edgetok.plugins.launch``, which needs neither torch nor Triton); the launches of one call come from the
plugin's launch plan (``kernels/<name>_plan.py``, which does not import Triton either).
A data-dependent dim of the spec (``Dynamic``) becomes a size tensor (``declare_size_tensor`` with the spec's
opt and upper bound); the size-tensor output itself is 0-d INT64. TensorRT allocates such outputs for the
upper bound and the kernels write them packed at the size they count.

These are Python plugins: the process that deserializes an engine must call ``register(trt, bundle_path)``
first (trtexec and C++ applications cannot run such engines).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from edgetok.plugins.spec import NAMESPACE, Dynamic, PluginError, PluginSpec, specs

# spec dtype -> TensorRT DataType member
_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int32": "INT32", "int64": "INT64",
           "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

_REGISTERED: dict[str, dict[str, object]] = {}  # trt module name -> {plugin name: creator}; creators must stay alive
_FAILURES: list[str] = []  # one-line reasons from callbacks: TensorRT logs them only as "plugin failed"
# format refusals are normal probing (TensorRT proposes fp16 too); they explain a failure only when nothing
# else was accepted at that position
_REFUSED: dict[tuple, str] = {}
_ACCEPTED: set[tuple] = set()


def failures(clear: bool = False) -> list[str]:
    """Why plugin callbacks failed in this process (the builder itself only says that they did): exceptions
    first, then input formats for which no combination was accepted."""
    found = list(dict.fromkeys(_FAILURES + [m for k, m in _REFUSED.items() if k not in _ACCEPTED]))
    if clear:
        _FAILURES.clear()
        _REFUSED.clear()
        _ACCEPTED.clear()
    return found


_SIZE_TENSORS: list[dict] = []  # size tensors declared in get_output_shapes in this process
SIZE_TENSOR_LOG = "EDGETOK_PLUGIN_SIZE_TENSOR_LOG"  # a file: each declaration also appended there as a JSON line


def size_tensors(clear: bool = False) -> list[dict]:
    """The size tensors declared to TensorRT in this process ({node, plugin, output, name, opt, upper}; opt and
    upper are ints when TensorRT's expressions are constants, else None). Builds run in a worker process: set
    $EDGETOK_PLUGIN_SIZE_TENSOR_LOG to a file to see them from outside (what the bound really was)."""
    found = list(_SIZE_TENSORS)
    if clear:
        _SIZE_TENSORS.clear()
    return found


def _record_size_tensor(plugin, output: int, opt, upper) -> None:
    def value(expr):
        return int(expr.get_constant_value()) if expr.is_constant() else None

    entry = {"node": plugin.node, "plugin": plugin.spec.name, "output": output,
             "name": plugin.spec.outputs[output].name, "opt": value(opt), "upper": value(upper)}
    _SIZE_TENSORS.append(entry)
    log = os.environ.get(SIZE_TENSOR_LOG)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _reported(method):
    """Remember why a callback failed before TensorRT turns the exception into a generic error."""
    @functools.wraps(method)
    def wrapper(self, *args):
        try:
            return method(self, *args)
        except Exception as exc:
            where = f"{self.node}: " if self.node else ""
            _FAILURES.append(where + (_one_line(exc) if isinstance(exc, PluginError)
                                      else f"{self.spec.name}.{method.__name__}: {_one_line(exc)}"))
            raise
    return wrapper


class _Dim:
    """A TensorRT dimension expression with + and -, so the spec's shape rule runs on it unchanged."""

    __slots__ = ("builder", "expr", "ops")

    def __init__(self, builder, expr, ops):
        self.builder, self.expr, self.ops = builder, expr, ops

    def _lift(self, other):
        return other.expr if isinstance(other, _Dim) else self.builder.constant(int(other))

    def __add__(self, other):
        return _Dim(self.builder, self.builder.operation(self.ops.SUM, self.expr, self._lift(other)), self.ops)

    __radd__ = __add__

    def __sub__(self, other):
        return _Dim(self.builder, self.builder.operation(self.ops.SUB, self.expr, self._lift(other)), self.ops)

    def __rsub__(self, other):
        return _Dim(self.builder, self.builder.operation(self.ops.SUB, self._lift(other), self.expr), self.ops)


class _Runtime:
    """What plugins created after a ``register`` call launch with: the bundle, opened on first use."""

    def __init__(self, bundle_path: str | Path | None):
        self.bundle_path = Path(bundle_path) if bundle_path else None
        self._bundle = None
        self._launcher = None

    def bundle(self):
        if self._bundle is None:
            if self.bundle_path is None:
                raise PluginError("no cubin bundle registered: call edgetok.plugins.tensorrt.register(trt, "
                                  "bundle_path) with the engine's .cubins.zip before running it")
            from edgetok.plugins.cubins import Bundle

            self._bundle = Bundle.open(self.bundle_path)
        return self._bundle

    def launcher(self):
        if self._launcher is None:
            from edgetok.plugins.launch import Launcher

            self._launcher = Launcher(self.bundle())
        return self._launcher


def _field_type(trt, f):
    return trt.PluginFieldType.INT32 if f.type is int else trt.PluginFieldType.FLOAT32


def _field_array(f, value):
    return np.array([value], dtype=np.int32 if f.type is int else np.float32)


def _fields_from(fc) -> dict:
    """PluginFieldCollection -> {name: Python scalar}; empty fields fall back to the spec's defaults."""
    given = {}
    for f in fc or []:
        data = np.asarray(f.data).reshape(-1)
        if data.size:
            given[f.name] = data[0].item()
    return given


@functools.cache
def _classes(trt):
    """The plugin and creator classes bound to one TensorRT module (tensorrt or tensorrt_rtx)."""

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, spec: PluginSpec, fields: dict, runtime: _Runtime, node: str = ""):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.spec, self.fields, self.runtime, self.node = spec, dict(fields), runtime, node
            self.plugin_name = spec.name
            self.plugin_namespace = NAMESPACE
            self.plugin_version = spec.version
            self.num_outputs = len(spec.outputs)
            # one timing entry per configuration: instances with the same fields share it
            self.timing_cache_id = f"{NAMESPACE}::{spec.name}/{spec.version}/" + ",".join(
                f"{k}={v}" for k, v in sorted(self.fields.items()))

        def get_capability_interface(self, type):
            return self

        def clone(self):
            return Plugin(self.spec, self.fields, self.runtime, self.node)

        # build

        @_reported
        def get_output_data_types(self, input_types):
            return [getattr(trt.DataType, _DTYPES[t.dtypes[0]]) for t in self.spec.outputs]

        @_reported
        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            ops = trt.DimensionOperation
            dims = [[_Dim(expr_builder, d[i], ops) for i in range(len(d))] for d in inputs]
            shapes = self.spec.output_shapes(dims, self.fields)
            declared = {}  # size-tensor output -> its dimension expression, declared once for every use

            def expr(d):
                if isinstance(d, _Dim):
                    return d.expr
                if isinstance(d, Dynamic):
                    if d.size_output not in declared:
                        opt, upper = expr(d.opt), expr(d.upper)
                        declared[d.size_output] = expr_builder.declare_size_tensor(d.size_output, opt, upper)
                        _record_size_tensor(self, d.size_output, opt, upper)
                    return declared[d.size_output]
                return expr_builder.constant(int(d))

            return [trt.DimsExprs([expr(d) for d in shape]) for shape in shapes]

        @_reported
        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            tensor = self.spec.inputs[pos] if pos < num_inputs else self.spec.outputs[pos - num_inputs]
            dtype = _DTYPE_NAMES.get(desc.type.name, desc.type.name.lower())
            key = (self.timing_cache_id, pos)
            if desc.format not in [getattr(trt.TensorFormat, f.upper()) for f in self.spec.formats]:
                return False
            if dtype not in tensor.dtypes:
                if pos < num_inputs:
                    _REFUSED.setdefault(key, f"{self.node}: {self.spec.name}: input {tensor.name} is {dtype}, but the plugin "
                                             f"takes {'/'.join(tensor.dtypes)}; keep the reduction step in float32")
                return False
            _ACCEPTED.add(key)
            return True

        @_reported
        def configure_plugin(self, inp, out):
            shapes = [tuple(d.max) for d in inp]
            dtypes = [_DTYPE_NAMES.get(d.desc.type.name, d.desc.type.name.lower()) for d in inp]
            self.spec.validate(shapes, self.fields, dtypes)

        @_reported
        def get_workspace_size(self, inp, out):
            from edgetok.plugins.kernels import module
            from edgetok.plugins.launch import workspace_size

            plan = module(self.spec).plan([tuple(d.max) for d in inp], self.fields)
            return workspace_size(plan, self.runtime.bundle())

        def get_valid_tactics(self):
            return []

        # runtime

        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            # a PluginField points into its array without owning it: the plugin keeps the arrays alive
            self._serialized = [_field_array(f, self.fields[f.name]) for f in self.spec.fields]
            return trt.PluginFieldCollection([trt.PluginField(f.name, data, _field_type(trt, f))
                                              for f, data in zip(self.spec.fields, self._serialized)])

        @_reported
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from edgetok.plugins.kernels import module

            plan = module(self.spec).plan([tuple(d.dims) for d in input_desc], self.fields)
            self.runtime.launcher().run(plan, list(inputs), list(outputs), int(workspace), int(stream))

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, spec: PluginSpec, runtime: _Runtime):
            trt.IPluginCreatorV3One.__init__(self)
            self.spec, self.runtime = spec, runtime
            self.name = spec.name
            self.plugin_namespace = NAMESPACE
            self.plugin_version = spec.version
            self._empty = [_field_array(f, 0)[:0] for f in spec.fields]  # kept alive, as PluginField does not
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField(f.name, data, _field_type(trt, f)) for f, data in zip(spec.fields, self._empty)])

        def create_plugin(self, name, fc, phase):
            try:
                fields = self.spec.resolve(_fields_from(fc))
            except PluginError as exc:
                _FAILURES.append(f"{name}: {_one_line(exc)}")
                raise
            return Plugin(self.spec, fields, self.runtime, name)

    return Plugin, Creator


def register(trt, bundle_path: str | Path | None = None) -> list[dict]:
    """Register a creator for every edgetok plugin with ``trt`` (the tensorrt or tensorrt_rtx module).

    Call it before parsing an ONNX with edgetok nodes and before deserializing an engine built from one,
    with ``bundle_path`` the engine's cubin bundle (``edgetok.plugins.cubins.bundle_path(engine)``).
    Idempotent per process; a later call with another bundle applies to plugins created after it."""
    _, Creator = _classes(trt)
    registry = trt.get_plugin_registry()
    creators = _REGISTERED.setdefault(trt.__name__, {})
    runtime = _Runtime(bundle_path)
    done = []
    for name, spec in specs().items():
        creator = creators.get(name)
        if creator is not None:
            creator.runtime = runtime
        else:
            creator = Creator(spec, runtime)
            if not registry.register_creator(creator, NAMESPACE):
                raise PluginError(f"{NAMESPACE}::{name} version {spec.version} is already registered with "
                                  f"{trt.__name__} by someone else; register edgetok's plugins first")
            creators[name] = creator
        done.append({"name": name, "namespace": NAMESPACE, "version": spec.version,
                     "fields": [f.name for f in spec.fields]})
    return done


def creator(trt, name: str):
    """The registered creator of ``name`` (after ``register``): tests and tools make plugins with it."""
    try:
        return _REGISTERED[trt.__name__][name]
    except KeyError:
        raise PluginError(f"{NAMESPACE}::{name} is not registered with {trt.__name__}; call register(trt) first") from None
