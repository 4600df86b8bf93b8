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


def _plugin_problem(node: onnx.NodeProto) -> str | None:
    """Our own ops are checked against their specs; other custom domains need a plugin edgetok does not have."""
    from edgetok.plugins.spec import NAMESPACE, PluginError, node_spec

    if node.domain != NAMESPACE:
        return f"custom domain {node.domain!r}: TensorRT needs a plugin for it, and edgetok registers only {NAMESPACE!r}"
    try:
        node_spec(node)
    except PluginError as exc:
        return str(exc)
    return None


def lint(model: onnx.ModelProto) -> list[Finding]:
    findings = []
    for node in _nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            reason = _plugin_problem(node)
            if reason:
                findings.append(Finding(node.name, f"{node.domain}::{node.op_type}", reason))
            continue
        reason = REJECTED.get(node.op_type)
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
