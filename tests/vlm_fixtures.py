"""Tiny random-weight LLaVA folders for the VLM tests (CLIP + Llama, SigLIP + Qwen2), saved as Hugging Face
folders so every test goes through the same loading path a user's model does.

Sizes are the smallest that still exercise what matters: a 32x32 image in 8x8 patches (16 patches, plus CLIP's
class token), three vision layers so the default feature layer (-2) leaves one layer unrun, a two-layer language
model with grouped KV heads, and the image token inside the vocabulary. No tokenizer: tests pass --prompt-ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

IMAGE_SIZE, PATCH_SIZE = 32, 8
VOCAB = 96
IMAGE_TOKEN = 95  # inside the vocabulary, as real checkpoints have it (llava-1.5: 32000 of 32064)
EOS = 2
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
FAMILIES = ("clip-llama", "siglip-qwen2")


def llava_config(family: str = "clip-llama", **overrides):
    """A LlavaConfig for ``family``; ``overrides`` go to LlavaConfig (vision_feature_layer, ...)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig

    vision_cls, text_cls = {"clip-llama": (CLIPVisionConfig, LlamaConfig),
                            "siglip-qwen2": (SiglipVisionConfig, Qwen2Config)}[family]
    # llava checkpoints with a SigLIP tower keep every patch (it has no class token): "full"
    strategy = "default" if family == "clip-llama" else "full"
    kw = dict(vision_config=vision_cls(**VISION), text_config=text_cls(**TEXT), image_token_index=IMAGE_TOKEN,
              vision_feature_select_strategy=strategy, vision_feature_layer=-2, projector_hidden_act="gelu",
              image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, tie_word_embeddings=False)
    return LlavaConfig(**{**kw, **overrides})


def image_processor(family: str):
    """The image processor a checkpoint of this family ships (CLIP: resize shortest edge + centre crop; SigLIP:
    resize to a square), at the fixture's image size."""
    if family == "clip-llama":
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                  crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def save_llava(folder: Path, family: str = "clip-llama", *, processor: bool = True, seed: int = 0,
               **overrides) -> Path:
    """A seeded random LlavaForConditionalGeneration saved to ``folder`` (weights as safetensors, and the image
    processor's preprocessor_config.json unless ``processor`` is False)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(family, **overrides)).eval()
    with torch.no_grad():  # random init leaves small logits; larger ones make the greedy argmax well separated
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    if processor:
        image_processor(family).save_pretrained(folder)
    return Path(folder)


def save_image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    """A random RGB PNG (not square and not the model's size, so preprocessing's resize and crop both run)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return Path(path)


@pytest.fixture(scope="session")
def llava_folders(tmp_path_factory) -> dict[str, Path]:
    """{family: folder} for both families, built once per session."""
    root = tmp_path_factory.mktemp("llava")
    return {family: save_llava(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def test_images(tmp_path_factory) -> list[Path]:
    """Three random images of different sizes."""
    root = tmp_path_factory.mktemp("images")
    return [save_image(root / f"img{i}.png", seed=i, size=(40 + 8 * i, 48 - 4 * i)) for i in range(3)]
