"""How a plugin module declares its plugin: the spec's parts (``Field``, ``Tensor``, ``Dynamic``,
``PluginSpec``) and the two decorators that enter it in the catalogue (``register`` the spec, ``reference``
its numpy reference).

Why apart from ``edgetok.plugins.spec`` (the catalogue: lookups by name and version, references run, which
plugins a graph uses): the catalogue imports the built-in plugin modules to fill itself, and they import
these declarations; were both in one module, the catalogue and its plugins would import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgetok.errors import EdgetokError

NAMESPACE = "edgetok"  # ONNX domain and TensorRT plugin namespace
VERSION = "1"


def node_attributes() -> dict:
    """What every exported edgetok node carries besides its fields, spelled for torch.onnx's ``g.op``.
    TensorRT's ONNX parser takes the plugin version from ``plugin_version`` and, before TensorRT 10.10
    (JetPack 6 has 10.3), the namespace only from ``plugin_namespace`` (default ""), not from the domain:
    without it the parser asks the registry for TokenMerge in the empty namespace and finds no creator."""
    return {"plugin_version_s": VERSION, "plugin_namespace_s": NAMESPACE}


class PluginError(EdgetokError):
    """A plugin node that the spec rejects (bad field, shape or dtype); the message is one line."""


@dataclass(frozen=True)
class Field:
    name: str
    type: type  # int or float: ONNX INT/FLOAT attributes, TensorRT INT32/FLOAT32 fields
    default: int | float
    doc: str


@dataclass(frozen=True)
class Tensor:
    name: str
    rank: int
    doc: str
    dtypes: tuple[str, ...] = ("float32",)
    size_tensor: bool = False  # a 0-d int64 output holding a data-dependent dimension (TensorRT size tensor)


@dataclass(frozen=True)
class Dynamic:
    """A data-dependent output dimension in a shape rule: its value is the plugin's size-tensor output
    ``size_output``; ``opt`` and ``upper`` (dims, or expressions over dims) are what TensorRT plans for and
    the sound upper bound it allocates for."""
    size_output: int
    opt: object
    upper: object


@dataclass(frozen=True)
class PluginSpec:
    name: str
    doc: str
    fields: tuple[Field, ...]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    # (input dims, fields) -> output dims. Dims are ints, or any type with + and - (TensorRT dimension
    # expressions): the same rule sizes reference outputs, ONNX shapes and TensorRT's computed shapes.
    # A data-dependent dim is a Dynamic (its size-tensor output, opt, upper); a size-tensor output's shape is [].
    output_shapes: Callable[[list[list], dict], list[list]]
    # (input shapes with ints, fields) -> None; raises PluginError naming the bad value and the fix.
    check: Callable[[list[tuple[int, ...]], dict], None]
    kernels: str  # module under edgetok.plugins.kernels with the Triton kernels
    # rng -> [(case name, inputs, fields)]: random and adversarial calls `plugins check` runs every kernel on
    cases: Callable | None = None
    # (inputs, fields) -> {scratch region: expected array}: what each kernel must compute on the way, so
    # `plugins check` can name the kernel that goes wrong (regions hold only the leading meaningful entries)
    intermediates: Callable | None = None
    # (inputs, fields) -> agreement.Margins: for a GPU, which sums in another order than the reference, how far
    # each of the reference's decisions is from going the other way, and what its float results are summed
    # from. None: no decision rests on float arithmetic, results compare exactly on any device
    margins: Callable | None = None
    version: str = VERSION
    formats: tuple[str, ...] = ("linear",)

    def resolve(self, given: dict) -> dict:
        """Fields with defaults filled in and types enforced; unknown names are an error."""
        unknown = sorted(set(given) - {f.name for f in self.fields} - {"plugin_version", "plugin_namespace"})
        if unknown:
            raise PluginError(f"{self.name}: unknown field(s) {', '.join(unknown)}; it takes "
                              + ", ".join(f.name for f in self.fields))
        values = {}
        for f in self.fields:
            value = given.get(f.name, f.default)
            if isinstance(value, bytes):
                value = value.decode()
            try:
                number = float(value)
                values[f.name] = f.type(value) if f.type is float else int(value if isinstance(value, str) else number)
                if f.type is int and number != values[f.name]:
                    raise ValueError
            except (TypeError, ValueError, OverflowError):  # int(inf) overflows
                raise PluginError(f"{self.name}: field {f.name}={value!r} is not {'an integer' if f.type is int else 'a number'}; "
                                  f"give e.g. {f.name}={f.default}") from None
        return values

    def validate(self, shapes: list[tuple[int, ...]], fields: dict, dtypes: list[str] | None = None) -> dict:
        """Check a concrete call against the spec; returns the resolved fields."""
        fields = self.resolve(fields)
        if len(shapes) != len(self.inputs):
            raise PluginError(f"{self.name} takes {len(self.inputs)} inputs "
                              f"({', '.join(t.name for t in self.inputs)}), got {len(shapes)}")
        for tensor, shape in zip(self.inputs, shapes):
            if len(shape) != tensor.rank:
                raise PluginError(f"{self.name}: input {tensor.name} must have rank {tensor.rank}, got shape "
                                  f"{list(shape)}")
        for tensor, dtype in zip(self.inputs, dtypes or []):
            if dtype not in tensor.dtypes:
                raise PluginError(f"{self.name}: input {tensor.name} is {dtype}, but the plugin takes "
                                  f"{'/'.join(tensor.dtypes)}; keep the reduction step in float32")
        self.check([tuple(int(d) for d in s) for s in shapes], fields)
        return fields

    def size_outputs(self) -> list[int]:
        """Positions of the size-tensor outputs (0-d int64 values of data-dependent dims)."""
        return [i for i, t in enumerate(self.outputs) if t.size_tensor]

    def concrete_shapes(self, shapes: list[tuple[int, ...]], fields: dict, sizes: dict | None = None) -> list[list[int]]:
        """Output shapes for integer input shapes: a ``Dynamic`` dim takes the value its size tensor holds in
        ``sizes`` ({output position: value}), or, for an output not yet computed, its upper bound (what
        TensorRT allocates before the kernels have counted)."""
        sizes = sizes or {}
        return [[int(sizes.get(d.size_output, d.upper)) if isinstance(d, Dynamic) else int(d) for d in dims]
                for dims in self.output_shapes([list(s) for s in shapes], fields)]

    def fields_doc(self) -> str:
        return ", ".join(f"{f.name}:{f.type.__name__}={f.default}" for f in self.fields)


_SPECS: dict[str, PluginSpec] = {}
_REFERENCES: dict[str, Callable] = {}


def register(spec: PluginSpec) -> PluginSpec:
    _SPECS[spec.name] = spec
    return spec


def reference(op: str):
    """Register the numpy reference of ``op`` (``@reference("TokenMerge")``), as Polygraphy's pluginref does."""
    def decorate(fn):
        _REFERENCES[op] = fn
        return fn
    return decorate
