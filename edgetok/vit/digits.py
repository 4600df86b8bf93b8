"""The reference ViT trained here: a tiny timm ViT on scikit-learn's handwritten digits (8×8, shipped
inside scikit-learn) upscaled to 32×32, so accuracy figures are real without downloading anything.

Registered with timm as ``edgetok_digits_vit``; edgetok loads its shipped weights when no checkpoint is
given. The held-out split is written on demand as an ImageFolder (``edgetok data digits``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from edgetok import atomic
from edgetok.errors import EdgetokError

NAME = "edgetok_digits_vit"
ASSET = Path(__file__).parents[1] / "assets" / "digits_vit"
WEIGHTS = ASSET / "model.safetensors"
HELD_OUT = 0.3  # fraction of the 1797 digits kept out of training
# Where ATS samples on this model when --ats-blocks is not given: chosen on the training split by
# bench/ats_blocks.py (the earliest first block within 1 point of dense there). The reference's DeiT-S config
# scaled to 6 blocks (1-5) samples 64 tokens from the second block on and costs 3.9 points on held-out digits.
METHOD_DEFAULTS = {"ats_blocks": [4, 5]}
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
               "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}


@register_model
def edgetok_digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny-like: 32×32 input, 4×4 patches (64 tokens + class), 6 blocks of width 96."""
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0, num_classes=10)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory passes these
        kwargs.pop(key, None)
    model = VisionTransformer(**{**args, **kwargs})
    model.pretrained_cfg = {**DATA_CONFIG, "num_classes": 10, "architecture": NAME,
                            "edgetok_defaults": METHOD_DEFAULTS}
    return model


def digit_images():
    """All 1797 digits as 32×32 RGB PIL images, with labels, in scikit-learn's order."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for row in digits.images:  # 8×8, values 0..16
        small = Image.fromarray((row * 255.0 / 16.0).round().astype(np.uint8), mode="L")
        images.append(small.resize((32, 32), Image.BILINEAR).convert("RGB"))
    return images, digits.target.astype(int)


def split_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, stratified by nothing but a fixed shuffle: the same everywhere."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - HELD_OUT)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def write_heldout_folder(out_dir: str | Path, split: str = "heldout") -> dict:
    """A split as an ImageFolder: ``out_dir/<digit>/<index>.png``; written whole or not at all. ``heldout`` is
    for accuracy; ``train`` (what the model was trained on) for calibrating a method, never for accuracy."""
    out_dir = Path(out_dir)
    blocking = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EdgetokError(f"-o {out_dir}: {blocking} is a file, not a folder; choose another output folder")
    images, labels = digit_images()
    train, held = split_indices(len(images))
    if split not in ("heldout", "train"):
        raise EdgetokError(f"--split {split!r} is unknown; choose heldout (for accuracy) or train (for calibration)")
    held = held if split == "heldout" else train
    atomic.check_target(out_dir, "folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):  # checked again when publishing: another write may get there first
        raise EdgetokError(f"{out_dir} exists and is not empty; choose a new folder")
    with atomic.staging_dir(out_dir) as stage:
        for digit in range(10):
            (stage / str(digit)).mkdir()
        for i in held:
            images[i].save(stage / str(labels[i]) / f"{i:04d}.png")
        (stage / "README.txt").write_text(
            f"{len(held)} held-out scikit-learn digits (32x32 PNG), written by `edgetok data digits`; the reference "
            "ViT never saw them in training.\n" if split == "heldout" else
            f"{len(held)} scikit-learn digits the reference ViT was trained on (32x32 PNG), written by `edgetok data "
            "digits --split train`: for calibrating methods, never for accuracy.\n")
        atomic.publish_folder(stage, out_dir)  # one rename, onto nothing or an empty folder only, as spec-pair's
    return {"path": str(out_dir), "images": len(held), "classes": 10}


def training_record() -> dict | None:
    path = ASSET / "TRAINING.json"
    return json.loads(path.read_text()) if path.is_file() else None
