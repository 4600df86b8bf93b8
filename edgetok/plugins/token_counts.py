"""How many tokens each image kept after each data-dependent step (ATS, dtome): the step's TokenPrune node
pads a batch to its largest image with size-0 rows, so an image's count is its rows of size > 0.

ONNX Runtime reads the padded sizes themselves (extra session outputs). An engine cannot hand them out cheaply
(their length is data-dependent), so build-engine adds a per-image count to the graph it parses, as standard
ops with a static shape [batch], and names those outputs in the build report. Block-sparse attention's kept
fraction of block pairs ([batch] already) is read the same two ways."""

from __future__ import annotations

import json
import re
from pathlib import Path

COUNT_OUTPUT = "edgetok.tokens_kept.block{}"  # an engine output: [batch] float, the tokens each image kept
KEPT_OUTPUT = "edgetok.attention_kept.block{}"  # an engine output: [batch] float, attention block pairs kept


def _outputs(model, wanted, position: int) -> dict[int, str]:
    import onnx

    from edgetok.plugins.spec import NAMESPACE, node_spec

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    found = {}
    for i, node in enumerate(n for n in model.graph.node if n.domain == NAMESPACE):
        if wanted(node_spec(node)):
            block = re.search(r"(?:blocks|layer)\.(\d+)", node.name)  # timm blocks.N, Hugging Face layer.N
            found[int(block.group(1)) if block else i] = node.output[position]
    return found


def sizes_outputs(model) -> dict[int, str]:
    """Block -> the sizes output of that block's data-dependent plugin node in an ONNX model (a path, or a
    model already loaded); {} for a graph without such steps."""
    return _outputs(model, lambda spec: any(t.size_tensor for t in spec.outputs), 1)


def attention_kept_outputs(model) -> dict[int, str]:
    """Block -> the ``kept`` output of that block's BlockSparseAttention node ([B]: the fraction of its
    attention's block pairs each image computed); {} without such nodes."""
    return _outputs(model, lambda spec: spec.name == "BlockSparseAttention", 1)


def per_image(sizes) -> list[int]:
    """An image's count from its padded sizes [B, K, 1]."""
    return (sizes[..., 0] > 0).sum(axis=1).tolist()


def add_count_outputs(model) -> dict[int, str]:
    """Add, in place, one output per data-dependent step to an ONNX model: the tokens each image kept,
    [batch] float32 (Cast, Greater, Cast, ReduceSum: any opset >= 13). Block -> output name."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    outputs = {}
    for block, sizes in sizes_outputs(model).items():
        name = COUNT_OUTPUT.format(block)
        stem = f"/edgetok/tokens_kept/block{block}/"
        zero, axes = stem + "zero", stem + "axes"
        model.graph.initializer.extend([numpy_helper.from_array(np.zeros((), np.float32), zero),
                                        numpy_helper.from_array(np.array([1, 2], np.int64), axes)])
        model.graph.node.extend([
            helper.make_node("Cast", [sizes], [stem + "f32"], to=TensorProto.FLOAT, name=stem + "Cast"),
            helper.make_node("Greater", [stem + "f32", zero], [stem + "real"], name=stem + "Greater"),
            helper.make_node("Cast", [stem + "real"], [stem + "ones"], to=TensorProto.FLOAT, name=stem + "Cast_1"),
            helper.make_node("ReduceSum", [stem + "ones", axes], [name], keepdims=0, name=stem + "ReduceSum"),
        ])
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        model.graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [batch.dim_param or batch.dim_value or "batch"]))
        outputs[block] = name
    return outputs


def add_kept_outputs(model) -> dict[int, str]:
    """Add, in place, each BlockSparseAttention's ``kept`` [batch] as a named output. Block -> output name."""
    from onnx import TensorProto, helper

    outputs = {}
    for block, kept in attention_kept_outputs(model).items():
        name = KEPT_OUTPUT.format(block)
        model.graph.node.append(helper.make_node("Identity", [kept], [name], name=f"/edgetok/attention_kept/block{block}"))
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        model.graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [batch.dim_param or batch.dim_value or "batch"]))
        outputs[block] = name
    return outputs


def engine_count_outputs(engine: str | Path, key: str = "token_count_outputs") -> dict[int, str]:
    """Block -> the engine output counting that block's kept tokens (``key`` "attention_kept_outputs": its
    attention's kept block pairs), from the build report ({} if none)."""
    report = Path(f"{engine}.build.json")
    if not report.is_file():
        return {}
    try:
        data = json.loads(report.read_text())
    except ValueError:
        return {}  # engine_plugins, read first, names an unreadable report
    return {int(block): name for block, name in (data.get(key) or {}).items()}
