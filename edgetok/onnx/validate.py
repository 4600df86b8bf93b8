"""Run an exported model in ONNX Runtime (CPU) and compare it with the PyTorch module it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class Comparison:
    backend: str
    batch: int
    max_abs_diff: float
    cosine: float  # lowest per-sample cosine similarity over all outputs
    top1_agreement: float | None  # fraction of samples with the same argmax (classifier outputs)
    tolerance: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def ort_session(path: str, threads: int = 0, extra_outputs: tuple[str, ...] = ()):
    """A CPU session; ``extra_outputs`` makes inner tensors graph outputs too (after the model's own), e.g. the
    sizes a data-dependent step leaves, to count tokens kept."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: shape-inference warnings are noise to users
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from edgetok.runtime.plugins import prepare_ort

    if extra_outputs:  # the model is loaded once, both to check its nodes and to add the outputs
        import onnx

        model = onnx.load(path)
        prepare_ort(options, path, model)  # graphs with edgetok plugin nodes run their references
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra_outputs)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    prepare_ort(options, path)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare_with_torch(
    path: str, module: torch.nn.Module, inputs: torch.Tensor, tolerance: float = 1e-3, classifier: bool = True
) -> Comparison:
    session = ort_session(path)
    with torch.no_grad():
        expected = module(inputs)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    max_diff, cosine = 0.0, 1.0
    if len(got) != len(expected) or not all(np.isfinite(o).all() for o in got):
        return Comparison("onnxruntime-cpu", len(inputs), float("inf"), 0.0, None, tolerance, False)
    for ref, out in zip(expected, got):
        ref = ref.numpy().reshape(len(inputs), -1).astype(np.float64)
        out = out.reshape(len(inputs), -1).astype(np.float64)
        if ref.shape != out.shape:
            return Comparison("onnxruntime-cpu", len(inputs), float("inf"), 0.0, None, tolerance, False)
        max_diff = max(max_diff, float(np.abs(ref - out).max()))
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        cosine = min(cosine, float(((ref * out).sum(axis=1) / np.maximum(norms, 1e-30)).min()))
    top1 = None
    if classifier:
        top1 = float((expected[0].numpy().argmax(-1) == got[0].argmax(-1)).mean())
    return Comparison("onnxruntime-cpu", len(inputs), max_diff, cosine, top1, tolerance, max_diff <= tolerance)
