"""A LLaVA model's image preprocessing: transformers' own image processor, found in the model or export folder, or
built from the vision config when the folder ships none.

Everything that feeds the vision tower (the export's validation, `generate --image`, dtome's calibration images)
goes through :func:`pixel_values`, so they all see what the model's processor makes of an image.

A LLaVA folder without ``preprocessor_config.json`` gets its tower family's processor at the tower's image size
with that class's defaults, which are what the family's checkpoints ship: CLIP (``CLIPImageProcessor``: resize
the shortest edge, centre crop, OpenAI CLIP's mean/std, bicubic) and SigLIP (``SiglipImageProcessor``: resize to
the square, mean/std 0.5, bicubic). A model trained with other statistics must ship its preprocessor_config.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetok.errors import EdgetokError

CONFIG = "preprocessor_config.json"
EXPORT_FOLDER = "preprocessor"  # where `edgetok export vlm` writes the processor
INTERPOLATION = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes -> timm's names


def image_processor(folder):
    """transformers' image processor for ``folder``: an export folder (its ``preprocessor/``), a LLaVA folder
    with its ``preprocessor_config.json``, or a LLaVA folder without one (built from the vision config). For a
    LLaVA folder, a processor whose output is not the tower's image size is refused in one line."""
    path = Path(folder)
    if (path / EXPORT_FOLDER / CONFIG).is_file():
        return _load(path / EXPORT_FOLDER)
    vision = _vision_config(path)
    size = int(vision.image_size)
    if (path / CONFIG).is_file():
        processor = _load(path)
    else:
        from transformers import CLIPImageProcessor, SiglipImageProcessor

        if vision.model_type == "clip_vision_model":
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        else:
            processor = SiglipImageProcessor(size={"height": size, "width": size})
    made = output_size(processor)
    if made != (size, size):
        raise EdgetokError(f"{path / CONFIG} makes {made[0]}x{made[1]} images but the vision tower takes "
                           f"{size}x{size} (vision_config.image_size); fix its size/crop_size")
    return processor


def _load(folder: Path):
    from transformers import AutoImageProcessor

    from edgetok import hf

    try:
        return AutoImageProcessor.from_pretrained(str(folder), **hf.LOCAL)
    except Exception as exc:
        raise hf.load_error(folder, CONFIG, exc) from None


def _vision_config(folder: Path):
    """The vision tower's config as transformers resolves it (LlavaConfig's defaults for keys left out); the
    folder was checked by edgetok.vlm.llava.check_folder (a LLaVA with a CLIP or SigLIP tower)."""
    from transformers import AutoConfig

    from edgetok import hf

    if not (folder / "config.json").is_file():
        raise EdgetokError(f"{folder} has neither {EXPORT_FOLDER}/{CONFIG} (an `edgetok export vlm` folder) nor "
                           "config.json (a LLaVA folder)")
    try:
        config = AutoConfig.from_pretrained(str(folder), **hf.LOCAL)
    except Exception as exc:
        raise hf.load_error(folder, "config.json", exc) from None
    vision = getattr(config, "vision_config", None)
    if vision is None or vision.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise EdgetokError(f"{folder} is not a LLaVA folder with a CLIP or SigLIP vision tower; give one (or an "
                           "`edgetok export vlm` folder)")
    return vision


def output_size(processor) -> tuple[int, int]:
    """(height, width) of the pixel values ``processor`` makes (it resizes every image to one size)."""
    from PIL import Image

    probe = Image.new("RGB", (37, 29))
    shape = processor(images=probe, return_tensors="np")["pixel_values"].shape
    return int(shape[-2]), int(shape[-1])


def pixel_values(processor, path) -> np.ndarray:
    """The image at ``path`` as the model sees it: float32 [1, 3, H, W]. A file that cannot be decoded is one
    line naming it."""
    from edgetok.images import read_image

    image = read_image(str(path))
    return np.ascontiguousarray(processor(images=image, return_tensors="np")["pixel_values"], dtype=np.float32)


def preprocessing(processor) -> dict:
    """The processor in the terms of timm's eval transform (edgetok.images.image_folder: input size,
    interpolation, crop, mean/std) for code that reads image folders that way; recorded in the manifest too,
    with the processor's class (its whole configuration is the export's preprocessor/ folder)."""
    height, width = output_size(processor)
    crop = bool(getattr(processor, "do_center_crop", False))
    normalize = bool(getattr(processor, "do_normalize", True))
    resample = getattr(processor, "resample", 3)
    return {
        "input_size": [3, height, width],
        "interpolation": INTERPOLATION.get(int(getattr(resample, "value", resample) or 0), "bicubic"),
        "crop_pct": 1.0,
        "crop_mode": "center" if crop else "squash",  # shortest edge + centre crop, or resize to the size
        "mean": [float(v) for v in processor.image_mean] if normalize else [0.0, 0.0, 0.0],
        "std": [float(v) for v in processor.image_std] if normalize else [1.0, 1.0, 1.0],
        "processor": type(processor).__name__,
    }
