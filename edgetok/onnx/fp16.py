"""fp32 ONNX -> fp16 ONNX (I/O kept fp32) for strongly typed TensorRT builds, validated in ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx

from edgetok.errors import EdgetokError
from edgetok.onnx.validate import ort_session

MIN_COSINE = 0.999
# A Q/DQ model's fp16 rest moves some values across an int8 rounding boundary (a full quantization step each), so
# on random inputs its cosine is lower although its accuracy is not: the digits ToMe r=8 int8 model converted to
# fp16 gave cosine 0.9969 on random inputs and 99.6 % top-1 agreement with the int8 model on held-out digits.
MIN_COSINE_QDQ = 0.99


def convert_to_fp16(source: Path, target: Path) -> None:
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    # The converter retypes every float tensor but leaves the graph's own Cast(to=FLOAT) nodes alone,
    # which then feed fp16 consumers with fp32 data; those casts must produce fp16 too.
    own_casts = {n.name for n in model.graph.node
                 if n.op_type == "Cast" and onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.FLOAT}
    # Plugin nodes take float32 (the reduction step stays in float): the converter casts around them.
    plugins = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(model, keep_io_types=True,
                                                     op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + plugins)
    for node in converted.graph.node:
        if node.name in own_casts:
            node.attribute[0].i = onnx.TensorProto.FLOAT16
    weights = sum(init.ByteSize() for init in converted.graph.initializer)
    onnx.save_model(converted, str(target), save_as_external_data=weights > 2**31 - 2**24,
                    all_tensors_to_one_file=True, location=f"{target.name}.data")


def compare_precisions(reference: Path, converted: Path, inputs: dict[str, np.ndarray],
                       min_cosine: float = MIN_COSINE) -> dict:
    """Outputs of both models on the same inputs: max abs diff, cosine, top-1 agreement."""
    ref = ort_session(str(reference)).run(None, inputs)
    got = ort_session(str(converted)).run(None, inputs)
    a, b = ref[0].astype(np.float64), got[0].astype(np.float64)
    cosine = float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    result = {
        "backend": "onnxruntime-cpu",
        "max_abs_diff": float(np.abs(a - b).max()),
        "cosine": cosine,
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()) if a.ndim == 2 else None,
        "min_cosine": min_cosine,
        "passed": cosine >= min_cosine,
    }
    if not result["passed"]:
        raise EdgetokError(
            f"the fp16 conversion changes the outputs too much (cosine {cosine:.5f} < {min_cosine}); build fp32"
        )
    return result
