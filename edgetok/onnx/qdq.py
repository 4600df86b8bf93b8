"""What a Q/DQ model is quantized to, and which GPUs can run it: FP8 needs FP8 tensor cores (SM 8.9+)."""

from __future__ import annotations

import onnx

from edgetok.errors import EdgetokError

FP8_TARGETS = ("sm89", "sm90", "sm100", "sm110", "sm120", "sm121")  # Ada, Hopper, Blackwell, Thor
FLOAT8 = (onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
          onnx.TensorProto.FLOAT8E5M2FNUZ)


def is_fp8(model: onnx.ModelProto) -> bool:
    """Whether a Q/DQ model quantizes to an 8-bit float (its zero points are float8)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and types.get(n.input[2]) in FLOAT8
               for n in model.graph.node)


def check_fp8_targets(targets: list[str], what: str) -> None:
    """FP8 only where the GPU has FP8 tensor cores; one line naming the first target that lacks them."""
    low = [t for t in targets if t not in FP8_TARGETS]
    if low:
        orin = " (Jetson Orin)" if low[0] == "sm87" else ""
        raise EdgetokError(f"{what}: FP8 needs SM 8.9 or newer and {low[0]}{orin} has no FP8; use --mode int8 for it, "
                           f"or target {', '.join(FP8_TARGETS)}")
