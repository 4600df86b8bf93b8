"""torch.nn.Module -> ONNX with a dynamic batch, checked for silently fixed shapes."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from edgetok.errors import EdgetokError

MIN_OPSET = 17


@contextlib.contextmanager
def quiet_stderr():
    """The TorchScript exporter prints its whole graph to the C-level stderr when it fails; hold it back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def export_module(
    module: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    input_name: str,
    output_names: list[str],
    opset: int = MIN_OPSET,
) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter, which keeps every per-layer token count static
    (TopK/Gather sizes) and only the batch dynamic. Large models get external data automatically."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as max_opset

    if not MIN_OPSET <= opset <= max_opset:
        raise EdgetokError(f"--opset {opset} is out of range: this torch exports opsets {MIN_OPSET} to {max_opset}")
    axes = {name: {0: "batch"} for name in [input_name, *output_names]}
    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=output_names,
                dynamic_axes=axes,
            )
        except Exception as exc:  # the exporter's message, without its graph dump
            reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise EdgetokError(f"torch.onnx.export failed: {reason[:200]}; please report the model and options") from None
    model = onnx.load(str(path), load_external_data=False)
    if _fix_static_dims(model, module, example):
        onnx.save_model(model, str(path))  # external tensors keep their references
    if uses_external_data(model):
        model = consolidate_external_data(path)
    for value in [*model.graph.input, *model.graph.output]:
        batch = value.type.tensor_type.shape.dim[0]
        if batch.dim_param != "batch":
            raise EdgetokError(f"export fixed the batch of {value.name!r} to {batch.dim_value}; report this model")
    return model


def _fix_static_dims(model: onnx.ModelProto, module: torch.nn.Module, example: torch.Tensor) -> bool:
    """Only the batch is dynamic; the exporter names the other output dims after the node making them
    (``LayerNormalizationlast_hidden_state_dim_1``). Write the real sizes instead."""
    with torch.no_grad():
        outs = module(example)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    changed = False
    for value, out in zip(model.graph.output, outs):
        for dim, size in list(zip(value.type.tensor_type.shape.dim, out.shape))[1:]:
            if dim.dim_param:
                dim.dim_value = size  # clears dim_param (a oneof)
                changed = True
    return changed


def io_signature(model: onnx.ModelProto) -> dict:
    """Names, shapes (``batch`` for the dynamic axis) and dtypes of the graph inputs and outputs."""

    def describe(value):
        t = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": value.name, "shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}

    return {
        "inputs": [describe(v) for v in model.graph.input],
        "outputs": [describe(v) for v in model.graph.output],
    }


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def consolidate_external_data(path: Path) -> onnx.ModelProto:
    """Models over 2 GB come out of the exporter with one file per weight; keep one ``.onnx.data``."""
    folder = path.parent
    before = {p for p in folder.iterdir() if p != path}
    model = onnx.load(str(path))  # reads every external tensor
    data_name = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    for stale in before - {folder / data_name}:
        stale.unlink()
    return onnx.load(str(path), load_external_data=False)
