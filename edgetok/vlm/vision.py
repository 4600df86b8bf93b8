"""vision.onnx: the (reduced) vision tower and projector of a LLaVA model, exported, linted and checked.

``pixel_values [B, 3, H, W] -> image_embeds [B, N, H_text]``, plus ``visual_tokens [B]`` (int64) when the
method's count follows the image (dtome): image_embeds then holds the batch's largest count of rows and each
image's rows past its own count are zero. The batch is dynamic; N is fixed for a fixed-count method (its plan)
and dynamic otherwise. The check runs ONNX Runtime against the PyTorch module on a batch the export never saw.
"""

from __future__ import annotations

from pathlib import Path

from edgetok.errors import EdgetokError

INPUT_NAME = "pixel_values"
TOKENS_AXIS = "tokens"  # the name of image_embeds' row axis when the count follows the image
EXPORT_BATCH = 2  # the traced example; validation runs one more


def export_vision(tower, path, opset: int = 17, tolerance: float = 1e-3, batch: int = EXPORT_BATCH) -> dict:
    """Export ``tower`` (a LoadedViT from edgetok.vlm.llava's tower_vit / reduce_tower, or a Llava: its unreduced
    tower) to ``path``; returns the validation (ONNX Runtime vs PyTorch; with ``visual_tokens`` per image and
    whether they are equal, for a count that follows the image). A graph TensorRT would reject or a mismatch is
    one line. The caller publishes ``path`` (write it inside a staging folder)."""
    import numpy as np
    import onnx
    import torch

    from edgetok.onnx.export import export_module
    from edgetok.onnx.lint import lint
    from edgetok.onnx.validate import compare_with_torch, ort_session
    from edgetok.vlm.llava import Llava, tower_vit

    if isinstance(tower, Llava):
        tower = tower_vit(tower)
    path = Path(path)
    counts = "visual_tokens" in tower.output_names
    shape = (tower.in_chans, tower.img_size, tower.img_size)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch, *shape, generator=gen)
    unseen = torch.randn(batch + 1, *shape, generator=gen)  # a batch the export never saw

    model = export_module(tower.module, example, path, INPUT_NAME, tower.output_names, opset)
    if counts:  # export_module fixes every non-batch axis to the example's size; this one follows the image
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = TOKENS_AXIS
        onnx.save_model(model, str(path))
    findings = lint(model)
    if findings:
        raise EdgetokError(f"vision.onnx has {len(findings)} node(s) TensorRT rejects: {findings[0]}"
                           + (f" and {len(findings) - 1} more" if len(findings) > 1 else "")
                           + "; please report the model and method")
    comparison = compare_with_torch(str(path), tower.module, unseen, tolerance, classifier=False)
    result = comparison.as_dict()
    if counts:
        session = ort_session(str(path))
        got = session.run(None, {INPUT_NAME: unseen.numpy()})[1]
        with torch.no_grad():
            expected = tower.module(unseen)[1].numpy()
        result["visual_tokens"] = [int(n) for n in got]
        result["visual_tokens_equal"] = bool(np.array_equal(got, expected))
        if not result["visual_tokens_equal"]:
            raise EdgetokError(f"vision.onnx keeps {result['visual_tokens']} visual tokens per image where PyTorch "
                               f"keeps {expected.tolist()}; the export is wrong, please report the model and method")
    if not comparison.passed:
        raise EdgetokError(f"vision.onnx differs from PyTorch by {comparison.max_abs_diff:.3g} (> {tolerance}) in "
                           "ONNX Runtime; the export is wrong, please report the model and method")
    return result
