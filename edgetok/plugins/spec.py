"""One spec per plugin, and the references registered by op name (Polygraphy's ``pluginref`` model).

A spec says everything every implementation needs: the fields (ONNX attributes / TensorRT plugin fields)
with types and defaults, the inputs and outputs with their dtypes, the output-shape rule and the checks.
The reference (numpy), the ONNX Runtime op, the TensorRT plugin class and the Triton kernels all read it;
none of them repeats a field name, a default or a shape rule.

The declarations (what a spec is, ``register``, ``reference``) are in ``edgetok.plugins.declaration``, below
the plugin modules that use them; they are re-exported here for the readers of specs.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgetok.plugins.declaration import (_REFERENCES, _SPECS, NAMESPACE, VERSION, Dynamic, Field,  # noqa: F401
                                         PluginError, PluginSpec, Tensor, node_attributes, reference, register)


def _load_builtins() -> None:
    from edgetok.plugins import block_sparse_attention, size_biased_attention, token_merge, token_prune  # noqa: F401  (register their specs and references)


def specs() -> dict[str, PluginSpec]:
    """Every spec, by name in alphabetical order (whatever order their modules were imported in)."""
    _load_builtins()
    return dict(sorted(_SPECS.items()))


def get(name: str, version: str = VERSION, namespace: str = NAMESPACE) -> PluginSpec:
    """The spec of ``name``; one-line errors for an unknown op, namespace or version."""
    known = specs()
    if namespace != NAMESPACE:
        raise PluginError(f"plugin namespace {namespace!r} is not edgetok's; edgetok provides {NAMESPACE!r}")
    if name not in known:
        raise PluginError(f"{NAMESPACE}::{name} is not an edgetok plugin; known: {', '.join(sorted(known))}")
    spec = known[name]
    if str(version) != spec.version:
        raise PluginError(f"{NAMESPACE}::{name} version {version!r} is not provided (edgetok has version "
                          f"{spec.version!r}); re-export the model with this edgetok")
    return spec


def run_reference(name: str, inputs: list, fields: dict, any_float: bool = False) -> list:
    """Run the registered reference of ``name`` after checking the call against its spec; ``any_float`` lets
    float64 through (the reference is dtype-generic: exactness checks run it in float64)."""
    spec = get(name)
    resolved = spec.validate([x.shape for x in inputs], fields, None if any_float else [x.dtype.name for x in inputs])
    return list(_REFERENCES[name](*inputs, **resolved))


def node_fields(node) -> dict:
    """An ONNX node's attributes as plain Python values."""
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class PluginUse:
    """Which edgetok plugins a graph needs: recorded in sidecars and build reports."""
    name: str
    version: str
    nodes: int

    def as_dict(self) -> dict:
        return {"name": self.name, "namespace": NAMESPACE, "version": self.version, "nodes": self.nodes}


def plugin_nodes(model) -> list:
    """The nodes of an ONNX model in the edgetok domain."""
    return [n for n in model.graph.node if n.domain == NAMESPACE]


def node_spec(node) -> PluginSpec:
    """The spec an ``edgetok`` node asks for (its op, ``plugin_version`` and ``plugin_namespace``), its fields
    checked."""
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in node_fields(node).items()}
    spec = get(node.op_type, str(attrs.get("plugin_version", VERSION)), str(attrs.get("plugin_namespace", NAMESPACE)))
    spec.resolve(attrs)
    return spec


def uses(model) -> list[dict]:
    """Plugins a graph needs, one entry per op (checked against the specs: unknown ops/versions raise)."""
    found: dict[str, PluginUse] = {}
    for node in plugin_nodes(model):
        spec = node_spec(node)
        use = found.setdefault(node.op_type, PluginUse(node.op_type, spec.version, 0))
        use.nodes += 1
    return [u.as_dict() for u in found.values()]
