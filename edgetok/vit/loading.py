"""Load a ViT from a timm name (optionally with a local checkpoint) or a local Hugging Face folder.

Never touches the network: timm models are built with ``pretrained=False`` and Hugging Face folders
are read with ``local_files_only``. Without weights the model is randomly initialised and the
result says so (``weights: random``).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgetok import hf
from edgetok.errors import EdgetokError
from edgetok.vit import digits  # registers edgetok_digits_vit with timm

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class LoadedViT:
    module: nn.Module  # pixel_values -> output tensor(s), in eval mode
    family: str  # "timm" | "hf"
    name: str
    weights: str  # "random" or where the weights came from
    img_size: int
    patch_size: int
    in_chans: int
    prefix_tokens: int  # class + distillation + register tokens
    embed_dim: int
    attn_dim: int
    mlp_hidden: int
    num_heads: int
    num_classes: int
    blocks: list[nn.Module]
    output_names: list[str]
    preprocessing: dict = field(default_factory=dict)
    class_token: bool = True  # position 0 is a class token (ToMe keeps unmerged tokens in order then)
    head: str = ""  # what the outputs are, and why that head was chosen
    method_defaults: dict = field(default_factory=dict)  # a model's own defaults for a method's options

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2 + self.prefix_tokens


def load_vit(model: str, checkpoint: str | None = None, img_size: int | None = None) -> LoadedViT:
    if Path(model).is_dir():
        if checkpoint:
            raise EdgetokError(f"--checkpoint {checkpoint} applies to timm names; {model} is a folder with its own weights")
        return _load_hf(Path(model), img_size)
    return _load_timm(model, checkpoint, img_size)


def weights_file(model: str, checkpoint: str | None = None) -> Path | None:
    """The file ``load_vit`` takes weights from (None: random), without building the model."""
    if checkpoint:
        return Path(checkpoint)
    if Path(model).is_dir():
        return next((Path(model) / f for f in ("model.safetensors", "pytorch_model.bin")
                     if (Path(model) / f).is_file()), None)
    if model == digits.NAME and digits.WEIGHTS.is_file():
        return digits.WEIGHTS
    return None


def _check_img_size(img_size: int, patch: int, name: str) -> None:
    if img_size <= 0 or img_size % patch:
        fix = max(patch, round(img_size / patch) * patch)
        raise EdgetokError(
            f"--img-size {img_size} is not divisible by {name}'s patch size {patch}: use a multiple such as {fix}"
        )


def _load_timm(name: str, checkpoint: str | None, img_size: int | None) -> LoadedViT:
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if name not in timm.list_models():
        if Path(name).suffix or os.sep in name:
            raise EdgetokError(f"model {name!r} is neither a timm model name nor a Hugging Face model folder")
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('*vit*')"
        raise EdgetokError(f"unknown timm model {name!r}{hint}")
    if img_size is not None and img_size <= 0:
        raise EdgetokError(f"--img-size {img_size} must be a positive multiple of the patch size")
    kwargs = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (AssertionError, ValueError, TypeError, RuntimeError) as exc:
        raise EdgetokError(f"cannot build {name} with img_size={img_size}: {exc}".splitlines()[0]) from None
    if not isinstance(model, VisionTransformer):
        raise EdgetokError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer; edgetok reduces tokens of "
            "ViT-family models (vit_*, deit*, dinov2)"
        )
    patch = model.patch_embed.patch_size[0]
    size = img_size if img_size is not None else model.patch_embed.img_size[0]
    _check_img_size(size, patch, name)
    weights = "random"
    if checkpoint is None and name == digits.NAME and digits.WEIGHTS.is_file():
        checkpoint = str(digits.WEIGHTS)  # edgetok's own reference model ships its weights
    if checkpoint:
        _load_timm_checkpoint(model, checkpoint, checkpoint_filter_fn)
        weights = str(Path(checkpoint).resolve())
    return from_timm(model, name, weights)


def from_timm(model: nn.Module, name: str, weights: str = "random") -> LoadedViT:
    """Describe an already-built timm VisionTransformer (also for models made in code)."""
    from timm.data import resolve_data_config

    model.eval()
    size = model.patch_embed.img_size[0]
    data = resolve_data_config({}, model=model)
    data["input_size"] = (model.patch_embed.proj.in_channels, size, size)
    attn = model.blocks[0].attn if len(model.blocks) else None
    mlp = model.blocks[0].mlp if len(model.blocks) else None
    return LoadedViT(
        module=model,
        family="timm",
        name=name,
        weights=weights,
        img_size=size,
        patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels,
        prefix_tokens=model.num_prefix_tokens,
        embed_dim=model.embed_dim,
        attn_dim=getattr(attn, "attn_dim", model.embed_dim),
        mlp_hidden=mlp.fc1.out_features if hasattr(mlp, "fc1") else 4 * model.embed_dim,
        num_heads=getattr(attn, "num_heads", 0),
        num_classes=model.num_classes,
        blocks=list(model.blocks),
        output_names=["logits" if model.num_classes else "features"],
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in data.items()},
        class_token=getattr(model, "cls_token", None) is not None,
        head=(f"classifier: {model.num_classes} classes" if model.num_classes
              else "features: pooled embedding (num_classes=0, no class logits)"),
        method_defaults=dict((getattr(model, "pretrained_cfg", None) or {}).get("edgetok_defaults") or {}),
    )


def _load_timm_checkpoint(model: nn.Module, path: str, filter_fn) -> None:
    from timm.models import load_state_dict

    if not Path(path).is_file():
        raise EdgetokError(f"checkpoint {path} does not exist; give a .pth or .safetensors file")
    try:
        state = load_state_dict(path)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        raise EdgetokError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    try:
        state = filter_fn(state, model)
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).replace("\n", " ").replace("\t", "")[:300]
        raise EdgetokError(f"checkpoint {path} does not fit this model: {reason}") from None
    if result.missing_keys or result.unexpected_keys:
        raise EdgetokError(
            f"checkpoint {path} does not match the model: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:3]}; "
            "check the model name"
        )


class _HFOutputs(nn.Module):
    """Hugging Face models return dataclasses; export wants plain tensors."""

    def __init__(self, model: nn.Module, interpolate: bool):
        super().__init__()
        self.model = model
        self.interpolate = interpolate

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values=pixel_values, interpolate_pos_encoding=self.interpolate or None)
        if hasattr(out, "logits"):
            return out.logits
        if out.pooler_output is None:
            return out.last_hidden_state
        return out.last_hidden_state, out.pooler_output


def _load_hf(folder: Path, img_size: int | None) -> LoadedViT:
    from transformers import AutoConfig, ViTForImageClassification, ViTModel

    if not (folder / "config.json").is_file():
        raise EdgetokError(f"{folder} has no config.json; give a Hugging Face model folder or a timm name")
    try:
        config = AutoConfig.from_pretrained(folder, **hf.LOCAL)
    except Exception as exc:
        raise hf.load_error(folder, "config.json", exc) from None
    if config.model_type != "vit":
        raise EdgetokError(f"{folder} holds a {config.model_type!r} model; edgetok supports Hugging Face 'vit' models")
    has_weights = any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    classifier, reason = _hf_head(folder, config, has_weights)
    cls = ViTForImageClassification if classifier else ViTModel
    size = img_size if img_size is not None else config.image_size
    _check_img_size(size, config.patch_size, str(folder))
    if has_weights:
        try:
            model = cls.from_pretrained(folder, **hf.LOCAL)
        except Exception as exc:
            raise EdgetokError(f"cannot load the weights in {folder}: {str(exc).splitlines()[0]}") from None
        weights = str(folder.resolve())
    else:
        config.image_size = size
        model = cls(config)
        weights = "random"
    preprocessing = {}
    proc = folder / "preprocessor_config.json"
    if proc.is_file():
        import json

        p = json.loads(proc.read_text())
        preprocessing = {k: p[k] for k in ("image_mean", "image_std", "rescale_factor") if k in p}
        # ViTImageProcessor resizes to the input size without a centre crop; PIL resample 2 is bilinear.
        preprocessing.update(crop_pct=1.0, interpolation={2: "bilinear", 3: "bicubic"}.get(p.get("resample"), "bilinear"))
    return from_hf(model, str(folder), weights, size, preprocessing, head_source=reason)


def _hf_head(folder: Path, config, has_weights: bool) -> tuple[bool, str]:
    """Whether the folder means a classifier, and why: its ``architectures``, else its weights (a
    ``classifier.*`` tensor), else a label set in config.json (``num_labels`` / ``id2label``, which
    ``save_pretrained`` writes only when they differ from the default)."""
    import json

    if config.architectures:
        arch = config.architectures[0]
        return arch == "ViTForImageClassification", f"architectures: {arch}"
    if has_weights:
        names = _weight_names(folder)
        found = any(n.startswith("classifier.") for n in names)
        return found, "weights " + ("have" if found else "have no") + " classifier.* tensors (no architectures)"
    raw = json.loads((folder / "config.json").read_text())
    if "id2label" in raw or "num_labels" in raw:
        return True, f"config.json sets {config.num_labels} labels (no architectures)"
    return False, "config.json names no architectures and no labels"


def _weight_names(folder: Path) -> list[str]:
    if (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                return list(f.keys())
        except Exception as exc:
            raise EdgetokError(f"cannot read {folder}/model.safetensors: {str(exc).splitlines()[0]}") from None
    try:
        return list(torch.load(folder / "pytorch_model.bin", map_location="meta", weights_only=True))
    except Exception as exc:
        raise EdgetokError(f"cannot read {folder}/pytorch_model.bin: {str(exc).splitlines()[0]}") from None


def from_hf(
    model: nn.Module, name: str, weights: str = "random", img_size: int | None = None, preprocessing: dict | None = None,
    head_source: str = "",
) -> LoadedViT:
    """Describe an already-built Hugging Face ViTModel / ViTForImageClassification."""
    from transformers import ViTForImageClassification

    model.eval()
    config = model.config
    size = img_size or config.image_size
    vit = model.vit if hasattr(model, "vit") else model
    preprocessing = {"input_size": [config.num_channels, size, size], "crop_pct": 1.0, "interpolation": "bilinear",
                     **(preprocessing or {})}
    classifier = isinstance(model, ViTForImageClassification)
    if classifier:
        outputs = ["logits"]
        head = f"classifier: {type(model).__name__}, {config.num_labels} classes"
    else:
        outputs = ["last_hidden_state"] + (["pooler_output"] if vit.pooler is not None else [])
        head = f"encoder: {type(model).__name__} -> {', '.join(outputs)} (no class logits)"
    return LoadedViT(
        module=_HFOutputs(model, interpolate=size != config.image_size).eval(),
        family="hf",
        name=name,
        weights=weights,
        img_size=size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        prefix_tokens=1,
        embed_dim=config.hidden_size,
        attn_dim=config.hidden_size,
        mlp_hidden=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_classes=config.num_labels if classifier else 0,
        blocks=list(vit.layers),
        output_names=outputs,
        preprocessing=preprocessing,
        head=head + (f"; {head_source}" if head_source else ""),
    )
