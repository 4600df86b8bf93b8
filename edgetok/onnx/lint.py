"""Find the ops that TensorRT (and TensorRT-RTX) refuse to parse, before anyone tries a build."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

# Op -> why TensorRT rejects it; "@reduction" entries only when a reduction attribute is set.
REJECTED = {
    "NonZero": "data-dependent output shape; TensorRT has no NonZero layer without a plugin",
    "Unique": "data-dependent output shape; not supported by TensorRT",
    "ScatterElements@reduction": "TensorRT supports ScatterElements only with reduction='none'",
    "ScatterND@reduction": "TensorRT supports ScatterND only with reduction='none'",
}


@dataclass
class Finding:
    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node or '<unnamed>'} ({self.op_type}): {self.reason}"


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


# Why an edgetok node without a plugin_namespace attribute cannot be built (see spec.node_attributes)
UNNAMESPACED = ("no plugin_namespace attribute (exported before edgetok wrote it): TensorRT <= 10.9's ONNX parser "
                "(JetPack 6) would look for the plugin in the empty namespace and not find it; re-export the model "
                "with this edgetok")


def unnamespaced_plugin_nodes(model: onnx.ModelProto) -> list[str]:
    """The edgetok plugin nodes (by name) that lack ``plugin_namespace``: graphs exported before it was written."""
    from edgetok.plugins.spec import NAMESPACE

    return [node.name or node.op_type for node in _nodes(model.graph)
            if node.domain == NAMESPACE and not any(a.name == "plugin_namespace" for a in node.attribute)]


def _plugin_problem(node: onnx.NodeProto) -> str | None:
    """Our own ops are checked against their specs; other custom domains need a plugin edgetok does not have."""
    from edgetok.plugins.spec import NAMESPACE, PluginError, node_spec

    if node.domain != NAMESPACE:
        return f"custom domain {node.domain!r}: TensorRT needs a plugin for it, and edgetok registers only {NAMESPACE!r}"
    try:
        node_spec(node)
    except PluginError as exc:
        return str(exc)
    if not any(a.name == "plugin_namespace" for a in node.attribute):
        return UNNAMESPACED
    return None


def _qdq_problem(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str | None:
    """TensorRT's explicit-quantization rules: zero points 0 (symmetric), no int32 DequantizeLinear (a quantized
    bias), per-channel scales only on weights and along axis 0 or 1."""
    from onnx import numpy_helper

    if len(node.input) > 2 and node.input[2]:
        point = constants.get(node.input[2])
        if point is None:
            return "its zero point is computed in the graph; TensorRT needs a constant zero point of 0"
        if numpy_helper.to_array(point).any():
            return "non-zero zero point (asymmetric quantization); TensorRT takes symmetric Q/DQ only: quantize " \
                   "with symmetric activations and weights"
    source = constants.get(node.input[0])
    if node.op_type == "DequantizeLinear" and source is not None and source.data_type == onnx.TensorProto.INT32:
        return "int32 DequantizeLinear (a quantized bias); TensorRT rejects it: quantize with biases left in float"
    scale = constants.get(node.input[1])
    if scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1:
        if source is None and node.op_type == "QuantizeLinear":
            return "per-channel scale on an activation; TensorRT takes per-channel scales on weights only"
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        if axis not in (0, 1):
            return f"per-channel axis {axis}; TensorRT quantizes weights per channel along axis 0 or 1 only"
    return None


TOPK_MAX = 3840  # TensorRT's ITopKLayer (and TensorRT-RTX 1.7's: K = 3840 builds, 3841 does not)


def _topk_problem(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str | None:
    """TopK with a constant K beyond TensorRT's limit (GTP's sparsity θ takes the N²·(1 − θ) smallest)."""
    from onnx import numpy_helper

    k = constants.get(node.input[1]) if len(node.input) > 1 else None
    if k is None:
        return None
    value = int(numpy_helper.to_array(k).reshape(-1)[0])
    if value <= TOPK_MAX:
        return None
    return (f"K={value} is beyond TensorRT's TopK limit of {TOPK_MAX} (with GTP's --sparsity θ, K = N²·(1 − θ): "
            f"raise θ so that it is at most {TOPK_MAX})")


def lint(model: onnx.ModelProto) -> list[Finding]:
    findings = []
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: onnx.helper.get_attribute_value(n.attribute[0]) for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for node in _nodes(model.graph):
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx"):
            reason = _qdq_problem(node, constants)
            if reason:
                findings.append(Finding(node.name, node.op_type, reason))
            continue
        if node.domain not in ("", "ai.onnx"):
            reason = _plugin_problem(node)
            if reason:
                findings.append(Finding(node.name, f"{node.domain}::{node.op_type}", reason))
            continue
        reason = REJECTED.get(node.op_type)
        if node.op_type == "TopK":
            reason = _topk_problem(node, constants)
        if reason is None:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            reduction = attrs.get("reduction", b"none")
            if reduction not in (b"none", "none"):
                reason = REJECTED.get(f"{node.op_type}@reduction")
                if reason:
                    reason = f"{reason} (has reduction={reduction.decode()!r})"
        if reason:
            findings.append(Finding(node.name, node.op_type, reason))
    return findings
