"""The reference VLM trained here: a tiny LLaVA that answers questions about a 2×2 grid of handwritten digits,
so that visual-token reduction has an accuracy to lose, measured without downloading anything.

The task needs the image *and* its layout: ``top-left`` (which digit is there?), ``sum-bottom-row``. A reduction
that merges tokens across the grid's cells, or drops a cell's tokens, shows up in the answers.

- Image: 32×32 RGB, four scikit-learn digits (8×8, upscaled to 16×16) in a 2×2 grid, so the vision tower sees
  the token geometry of the digits ViT (``edgetok.vit.digits``: 32×32 input, 4×4 patches, 64 patches + class).
- Vision tower: ``CLIPVisionModel`` converted from the digits ViT's timm weights (``clip_tower_from_timm``),
  then fine-tuned with the rest by ``tools/train_digits_vlm.py``.
- Language model: a three-layer Llama over a word-level tokenizer (``tokenizer``): ``<image> sum-top-row`` →
  ``9 <eos>``. Every prompt has the same length, so a batch of questions needs no padding.
- Data: grids are made of the digits ViT's *training* digits for training; ``write_data`` writes grids of its
  held-out digits (never trained on, by either model) for `edgetok eval`, or of its training digits for
  calibrating dtome. Each digit of a split is used once, in a fixed shuffle.

The shipped folder (``edgetok/assets/digits_vlm``) is an ordinary Hugging Face LLaVA folder:
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from edgetok import atomic
from edgetok.errors import EdgetokError

ASSET = Path(__file__).parents[1] / "assets" / "digits_vlm"
CELL, GRID = 16, 32  # a digit's side, the image's side (2×2 cells)
PAD, EOS, UNK, IMAGE = "<pad>", "<eos>", "<unk>", "<image>"
# Question -> the grid cells (0 top left, 1 top right, 2 bottom left, 3 bottom right) whose digits it adds. Each
# question is one word, so the prompt's last token itself asks which cells to look at (with a "?" after a
# three-word question the model must first gather the words into it: it learned far slower).
QUESTIONS = {
    "top-left": (0,), "top-right": (1,), "bottom-left": (2,), "bottom-right": (3,),
    "sum-top-row": (0, 1), "sum-bottom-row": (2, 3), "sum-left-column": (0, 2), "sum-right-column": (1, 3),
}
ANSWERS = [str(n) for n in range(19)]  # 0..9 for a digit, 0..18 for a sum: one token each
QUESTIONS_FILE = "questions.jsonl"
IMAGES = "images"  # DIR/images/<grid>.png: one class folder, so DIR is also an ImageFolder (dtome's --calibrate)


def prompt(question: str) -> str:
    return f"{IMAGE} {question}"


def answer(question: str, labels) -> str:
    return str(sum(int(labels[cell]) for cell in QUESTIONS[question]))


@functools.lru_cache(maxsize=1)
def digit_cells() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as 16×16 uint8 cells (upscaled as the digits ViT upscales them to 32×32:
    PIL bilinear), with their labels, in scikit-learn's order."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    cells = np.stack([np.asarray(Image.fromarray((row * 255.0 / 16.0).round().astype(np.uint8), mode="L")
                                 .resize((CELL, CELL), Image.BILINEAR)) for row in digits.images])
    return cells, digits.target.astype(int)


def grid_pixels(cells: np.ndarray) -> np.ndarray:
    """Four cells [4, 16, 16] (top left, top right, bottom left, bottom right) as one [32, 32] grid; also
    batched: [B, 4, 16, 16] -> [B, 32, 32]."""
    top = np.concatenate([cells[..., 0, :, :], cells[..., 1, :, :]], axis=-1)
    bottom = np.concatenate([cells[..., 2, :, :], cells[..., 3, :, :]], axis=-1)
    return np.concatenate([top, bottom], axis=-2)


def split_grids(split: str) -> list[np.ndarray]:
    """The digit indices of each grid of a split (``heldout`` or ``train`` of ``edgetok.vit.digits``): the
    split's digits in a fixed shuffle, four at a time, each used once."""
    from edgetok.vit.digits import split_indices

    train, held = split_indices(1797)
    chosen = held if split == "heldout" else train
    order = np.random.default_rng(1).permutation(chosen)
    return [order[i : i + 4] for i in range(0, len(order) - 3, 4)]


def tokenizer():
    """The word-level tokenizer: specials, the question words, the answers "0".."18"; whitespace-separated."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for q in QUESTIONS for w in q.split()})
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, IMAGE, *words, *ANSWERS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([PAD, EOS, UNK, IMAGE])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left",
                                   bos_token=None, extra_special_tokens={"image_token": IMAGE},
                                   clean_up_tokenization_spaces=False)


def image_processor():
    """The digits ViT's preprocessing (identity resize at 32×32, scale to [0, 1], normalise with mean and std 0.5)
    as the CLIP image processor a LLaVA folder carries."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": GRID}, crop_size={"height": GRID, "width": GRID},
                              resample=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def processor(folder: str | Path | None = None):
    """transformers' LlavaProcessor: expands ``<image>`` to the 64 visual tokens and preprocesses the image."""
    from transformers import AutoProcessor, LlavaProcessor

    from edgetok import hf

    if folder is not None:
        return AutoProcessor.from_pretrained(str(folder), **hf.LOCAL)
    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer(), patch_size=4,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


# The projector's and language model's init std: about 1/sqrt(hidden 128). At transformers' default 0.02 the
# attention logits start so small that the model took 800+ steps to begin using the image at all (the loss sat at
# the answers' marginal); at 0.1 it learns from the first hundred.
INIT = 0.1


def llava_config(tok, feature_layer: int = -1):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=6, num_attention_heads=3,
                              image_size=GRID, patch_size=4, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6,
                              projection_dim=96)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                       tie_word_embeddings=False, initializer_range=INIT)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE),
                       image_seq_length=(GRID // 4) ** 2, vision_feature_layer=feature_layer,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, initializer_range=INIT)


def clip_tower_state(vit) -> dict:
    """The timm ViT's weights as the state dict of LLaVA's CLIP tower (``CLIPVisionTransformer``). Exact except for
    what CLIP has and timm's ViT does not: CLIP's patch convolution has no bias, so timm's is folded into the
    patch positions' position embeddings (the class position gets none, as in timm); ``pre_layrnorm`` (a
    LayerNorm before the first layer) is left to the caller's initialisation and is trained."""
    sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    pos = sd["pos_embed"][0].clone()
    pos[1:] += sd["patch_embed.proj.bias"]
    out = {"embeddings.class_embedding": sd["cls_token"].reshape(dim),
           "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
           "embeddings.position_embedding.weight": pos,
           "post_layernorm.weight": sd["norm.weight"], "post_layernorm.bias": sd["norm.bias"]}
    for i in range(len(vit.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[src + "attn.qkv.bias"].chunk(3)
        out.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                    dst + "self_attn.v_proj.weight": v, dst + "self_attn.q_proj.bias": qb,
                    dst + "self_attn.k_proj.bias": kb, dst + "self_attn.v_proj.bias": vb,
                    dst + "self_attn.out_proj.weight": sd[src + "attn.proj.weight"],
                    dst + "self_attn.out_proj.bias": sd[src + "attn.proj.bias"]})
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
    return out


def initial_model(tok, seed: int = 0):
    """The LLaVA before training: the vision tower is the shipped digits ViT (``clip_tower_state``; its
    ``pre_layrnorm`` at LayerNorm's default init), projector and language model at transformers' seeded init."""
    import timm
    import torch
    from transformers import LlavaForConditionalGeneration

    from edgetok.vit import digits as vit_digits

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(tok)).float()
    vit = timm.create_model(vit_digits.NAME, checkpoint_path=str(vit_digits.WEIGHTS))
    missing, unexpected = model.model.vision_tower.load_state_dict(clip_tower_state(vit), strict=False)
    if unexpected or set(missing) != {"pre_layrnorm.weight", "pre_layrnorm.bias"}:
        raise RuntimeError(f"digits ViT -> CLIP: missing {missing}, unexpected {unexpected}")
    return model


def questions(split: str) -> list[dict]:
    """Every question of every grid of a split: image name, prompt, answer, question, the grid's labels."""
    _, labels = digit_cells()
    rows = []
    for g, idx in enumerate(split_grids(split)):
        for q in QUESTIONS:
            rows.append({"image": f"{IMAGES}/{g:04d}.png", "prompt": prompt(q), "answer": answer(q, labels[idx]),
                         "question": q, "digits": [int(i) for i in idx]})
    return rows


def write_data(out_dir: str | Path, split: str = "heldout") -> dict:
    """A split's grids and questions, written whole or not at all:

        DIR/images/0000.png ...   32×32 RGB grids (DIR is also an ImageFolder: ``--calibrate DIR``)
        DIR/questions.jsonl       {"image": "images/0000.png", "prompt": "<image> sum-top-row", "answer": "9",
                                   "question": ..., "digits": [scikit-learn indices, top left first]}

    ``heldout`` is for accuracy (`edgetok eval DIR --data`); ``train`` (the digits both models learned from) for
    calibrating a method, never for accuracy."""
    if split not in ("heldout", "train"):
        raise EdgetokError(f"--split {split!r} is unknown; choose heldout (for accuracy) or train (for calibration)")
    out_dir = Path(out_dir)
    blocking = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EdgetokError(f"-o {out_dir}: {blocking} is a file, not a folder; choose another output folder")
    atomic.check_target(out_dir, "folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):  # checked again when publishing
        raise EdgetokError(f"{out_dir} exists and is not empty; choose a new folder")
    from PIL import Image

    cells, _ = digit_cells()
    rows = questions(split)
    grids = split_grids(split)
    with atomic.staging_dir(out_dir) as stage:
        (stage / IMAGES).mkdir()
        for g, idx in enumerate(grids):
            Image.fromarray(grid_pixels(cells[idx]), mode="L").convert("RGB").save(stage / IMAGES / f"{g:04d}.png")
        (stage / QUESTIONS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (stage / "README.txt").write_text(
            f"{len(grids)} grids of four scikit-learn digits (32x32 PNG) and {len(rows)} questions about them, written "
            f"by `edgetok data digits-vlm --split {split}`. " + (
                "Held-out digits: neither the reference VLM nor the digits ViT saw them in training.\n"
                if split == "heldout" else "Training digits: for calibrating methods (--calibrate DIR), never for "
                "accuracy.\n"))
        atomic.publish_folder(stage, out_dir)
    return {"path": str(out_dir), "images": len(grids), "questions": len(rows)}


def training_record() -> dict | None:
    path = ASSET / "TRAINING.json"
    return json.loads(path.read_text()) if path.is_file() else None
