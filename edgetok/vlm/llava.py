"""A local LLaVA folder (``LlavaForConditionalGeneration``): checked, loaded, and its vision tower as a reducible ViT.

LLaVA reads its visual tokens from one hidden state of the vision tower (``vision_feature_layer``, usually -2:
the last layer is never used), drops the class-token row or not (``vision_feature_select_strategy``
"default" / "full"), and projects them into the language model (``multi_modal_projector``). The tower here
(:class:`VisionEncoder`) runs exactly that path, with the tower's own modules: the embeddings, the layers up
to the feature layer (the later ones are not run, so a reduction plans over those alone), the selection and
the projector. A token reduction patches those same layer objects (edgetok/vit/patch.py), so the LLaVA model
they belong to is the PyTorch reference for the reduced export (:func:`patched_llava`).

``check_folder`` reads config.json as JSON: a wrong folder is refused in one line before torch is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgetok.errors import EdgetokError

ARCHITECTURE = "LlavaForConditionalGeneration"
TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}  # vision_config.model_type -> tower
LABELS = {"clip": "CLIP", "siglip": "SigLIP"}
STRATEGIES = ("default", "full")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# methods whose attention differs from the layer's own (ATS's softmax_with_policy), installed in ViT attention only
OWN_ATTENTION = ("ats",)
# methods that score tokens by the class token's attention (needs_class_token in their torch realisation, which
# edgetok/vit/reduction.py checks after torch for any method): SigLIP has no class token
CLASS_TOKEN_METHODS = ("evit", "ats")
CALIBRATION_BATCH = 32  # as `edgetok export vit --method dtome`


def check_folder(folder, method: str = "none") -> dict:
    """What config.json says about a LLaVA folder, read without torch; one line for a folder edgetok cannot
    export: missing, no config.json, another architecture, a vision tower other than CLIP/SigLIP, a feature
    layer outside the tower, an unknown selection strategy, or several feature layers while ``method``
    reduces (their token counts would differ), a method that needs its own attention in every layer (ATS), or one
    that needs a class token on a SigLIP tower (EViT).
    Keys left out of config.json take LlavaConfig's defaults."""
    path = Path(folder)
    if not path.is_dir():
        raise EdgetokError(f"{folder} is not a folder; give a local Hugging Face folder holding a {ARCHITECTURE}")
    if not (path / "config.json").is_file():
        raise EdgetokError(f"{folder} has no config.json; give a local Hugging Face folder holding a {ARCHITECTURE}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgetokError(f"{folder}/config.json cannot be read as JSON ({' '.join(str(exc).split())}); "
                           "restore the model's config.json") from None
    if not isinstance(config, dict):
        raise EdgetokError(f"{folder}/config.json is not a JSON object; restore the model's config.json")
    architectures = config.get("architectures") or []
    if ARCHITECTURE not in architectures and config.get("model_type") != "llava":
        found = architectures[0] if architectures else f"model_type {config.get('model_type')!r}"
        raise EdgetokError(f"{folder} holds a {found}, not a {ARCHITECTURE}; `edgetok export vlm` takes LLaVA "
                           "folders (for a language model alone use `edgetok export spec-pair`)")
    vision = config.get("vision_config") or {}
    kind = vision.get("model_type", "clip_vision_model")
    if kind not in TOWERS:
        raise EdgetokError(f"{folder}: the vision tower is a {kind!r}; edgetok reduces CLIP and SigLIP towers "
                           f"({', '.join(TOWERS)})")
    select = config.get("vision_feature_select_strategy", "default")
    if select not in STRATEGIES:
        raise EdgetokError(f"{folder}: vision_feature_select_strategy {select!r} is unknown; LLaVA has "
                           f"{' and '.join(STRATEGIES)}")
    layer = config.get("vision_feature_layer", -2)
    layers = layer if isinstance(layer, list) else [layer]
    depth = vision.get("num_hidden_layers")
    if not layers:
        raise EdgetokError(f"{folder}: vision_feature_layer is an empty list; give the layer LLaVA reads, e.g. -2")
    for value in layers:
        if not isinstance(value, int) or isinstance(value, bool):
            raise EdgetokError(f"{folder}: vision_feature_layer {layer!r} must be an integer or a list of integers")
        if isinstance(depth, int) and not -(depth + 1) <= value <= depth:
            raise EdgetokError(f"{folder}: vision_feature_layer {value} is outside the tower's {depth + 1} hidden "
                               f"states (give -{depth + 1}..{depth})")
    if method in OWN_ATTENTION:
        raise EdgetokError(f"--method {method} attends with its reference's own softmax in every layer, which edgetok "
                           f"installs in timm and Hugging Face ViT attention only, not in {LABELS[TOWERS[kind]]} "
                           "layers; use --method dtome (its count also follows the image) or tome")
    if method in CLASS_TOKEN_METHODS and TOWERS[kind] == "siglip":
        raise EdgetokError(f"--method {method} scores tokens by the class token's attention, and {folder} (siglip "
                           "tower) has no class token; use --method tome (or pitome, zerotprune, gtp, dtome)")
    if isinstance(layer, list) and method != "none":
        raise EdgetokError(f"{folder}: vision_feature_layer {layer} concatenates several layers, whose token counts "
                           f"a reduction would make differ; --method {method} needs one feature layer "
                           "(use --method none)")
    return {"tower": TOWERS[kind], "feature_layer": layer, "select": select,
            "image_token_id": config.get("image_token_index", config.get("image_token_id", 32000)),
            "text_model_type": (config.get("text_config") or {}).get("model_type", "llama")}


@dataclass
class Llava:
    model: object  # LlavaForConditionalGeneration, float32, eval, eager attention
    config: object  # its LlavaConfig
    tower: str  # "clip" | "siglip"
    feature_layer: int | list[int]  # as the config gives it (negative: from the end of the hidden states)
    select: str  # vision_feature_select_strategy: "default" drops the first row (CLIP's class token), "full" keeps all
    image_token_id: int
    image_size: int
    patch_size: int
    source: str  # the folder, resolved
    weights: str  # the folder, or "random" (config.json alone)

    @property
    def prefix_tokens(self) -> int:
        """Rows before the patches: CLIP's class token; SigLIP has none."""
        return 1 if self.tower == "clip" else 0

    @property
    def hidden_states(self) -> list[int]:
        """The feature layers as indices into the tower's hidden states (0: the embeddings, i: layer i's output)."""
        count = self.model.config.vision_config.num_hidden_layers + 1
        layers = self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]
        return [layer % count for layer in layers]

    @property
    def layers_run(self) -> int:
        """How many tower layers the features need (the deepest feature layer's)."""
        return max(self.hidden_states)

    @property
    def dropped(self) -> int:
        """Rows the selection drops from the tower's output ("default": the first)."""
        return 1 if self.select == "default" else 0


def load_llava(folder) -> Llava:
    """The folder's LLaVA in float32 with eager attention, in eval mode (random weights when the folder has
    only config.json, as `export vit` does for a folder without weights)."""
    info = check_folder(folder)
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from edgetok import hf

    hf_logging.disable_progress_bar()  # our own output stays one line per step
    path = Path(folder)
    try:
        config = AutoConfig.from_pretrained(path, **hf.LOCAL)
    except Exception as exc:
        raise hf.load_error(folder, "config.json", exc) from None
    if any((path / f).is_file() for f in WEIGHT_FILES):
        try:
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation="eager", **hf.LOCAL)
        except Exception as exc:
            raise hf.load_error(folder, "the weights", exc) from None
        weights = str(path.resolve())
    else:
        config._attn_implementation = "eager"
        model = LlavaForConditionalGeneration(config).float()
        weights = "random"
    model.eval()
    vision = model.config.vision_config
    return Llava(model=model, config=model.config, tower=info["tower"], feature_layer=model.config.vision_feature_layer,
                 select=model.config.vision_feature_select_strategy, image_token_id=model.config.image_token_id,
                 image_size=vision.image_size, patch_size=vision.patch_size, source=str(path.resolve()),
                 weights=weights)


def _vision_encoder_class():
    import torch
    from torch import nn

    class VisionEncoder(nn.Module):
        """pixel_values [B, 3, H, W] -> image_embeds [B, N, H_text] (+ visual_tokens [B] int64 when the count
        follows the image): LLaVA's ``get_image_features`` with the tower's own modules, running only the layers
        up to the feature layer. Rows past an image's count (a padded batch) are zero."""

        def __init__(self, llava: Llava):
            super().__init__()
            tower = llava.model.model.vision_tower
            self.embeddings = tower.embeddings
            self.pre_norm = getattr(tower, "pre_layrnorm", None)  # CLIP has a LayerNorm before the first layer
            self.layers = nn.ModuleList(tower.encoder.layers[: llava.layers_run])
            self.projector = llava.model.model.multi_modal_projector
            self.hidden_states = llava.hidden_states
            self.dropped = llava.dropped
            self.counts = False  # set by reduce_tower for a method whose count follows the image

        def forward(self, pixel_values: torch.Tensor):
            x = self.embeddings(pixel_values)
            if self.pre_norm is not None:
                x = self.pre_norm(x)
            states = [x]
            for layer in self.layers:
                x = layer(x, None)
                states.append(x)
            features = torch.cat([states[i][:, self.dropped:] for i in self.hidden_states], dim=-1)
            embeds = self.projector(features)
            if not self.counts:
                return embeds
            size = self.layers[0]._edgetok_state.size  # the last reduction's sizes (padding: 0)
            real = size[:, self.dropped:, 0] > 0
            return embeds * real.unsqueeze(-1).to(embeds.dtype), real.sum(dim=1).to(torch.int64)

    return VisionEncoder


def vision_encoder(llava: Llava):
    """A :class:`VisionEncoder` over ``llava``'s own modules (defined lazily: this module imports no torch)."""
    return _vision_encoder_class()(llava)


def tower_vit(llava: Llava):
    """The vision tower as a LoadedViT (edgetok/vit): the layers that run are its blocks, so the reduction methods
    plan and patch over them; its module is the :class:`VisionEncoder` (pixel values -> projected visual tokens)."""
    from edgetok.vit.loading import LoadedViT
    from edgetok.vlm.preprocess import image_processor, preprocessing

    encoder = vision_encoder(llava).eval()
    vision = llava.config.vision_config
    return LoadedViT(
        module=encoder, family="hf", name=f"{llava.source} ({llava.tower} tower)", weights=llava.weights,
        img_size=llava.image_size, patch_size=llava.patch_size, in_chans=vision.num_channels,
        prefix_tokens=llava.prefix_tokens, embed_dim=vision.hidden_size, attn_dim=vision.hidden_size,
        mlp_hidden=vision.intermediate_size, num_heads=vision.num_attention_heads, num_classes=0,
        blocks=list(encoder.layers), output_names=["image_embeds"],
        preprocessing=preprocessing(image_processor(llava.source)), class_token=llava.tower == "clip",
        head=(f"LLaVA visual tokens: hidden state {llava.feature_layer} of {vision.num_hidden_layers} "
              f"({llava.layers_run} layers run), {llava.select} selection, projector to "
              f"{llava.config.text_config.hidden_size}"),
    )


def reduce_tower(llava: Llava, method_name: str, options: dict, calibrate: str | None = None):
    """(LoadedViT, ReductionPlan): the tower with ``method_name`` patched into the layers that run, planned
    over them. dtome's thresholds are calibrated on the image folder ``calibrate`` (or options["calibrate"]),
    read with the model's image processor, unless ``options`` carries them (``thresholds``, from a manifest)."""
    from edgetok.vit import methods
    from edgetok.vit.reduction import plan, reduce_vit

    options = {k: v for k, v in options.items() if v is not None}
    calibrate = calibrate or options.get("calibrate")
    methods.check_options(method_name, options)
    check_folder(llava.source, method_name)  # several feature layers, ATS: one line each
    tower = tower_vit(llava)
    if method_name != "none" and tower.depth == 0:
        raise EdgetokError(f"{llava.source}: vision_feature_layer {llava.feature_layer} reads the embeddings, before "
                           f"any layer, so there is nothing for --method {method_name} to reduce; use --method none")
    method = methods.make_method(method_name, tower.depth, tokens=tower.num_tokens, **options)
    reduced = reduce_vit(tower, method)
    if getattr(method, "data_dependent", False):
        tower.module.counts = True
        tower.output_names = ["image_embeds", "visual_tokens"]
    if method_name == "dtome" and options.get("thresholds") is None:
        if not calibrate:
            raise EdgetokError("--method dtome needs --calibrate DIR: an image folder (one subfolder per class) on "
                               "which its per-block thresholds are calibrated (not the images you evaluate on)")
        _calibrate_dtome(llava, tower, method, calibrate)
        reduced = plan(tower, method)  # the thresholds and the measured merges
    return tower, reduced


def _calibrate_dtome(llava: Llava, tower, method, folder: str, batch: int = CALIBRATION_BATCH) -> None:
    """dtome's thresholds from the images of ``folder`` (an ImageFolder), preprocessed by the model's own image
    processor, as `export vit` calibrates on its folder."""
    import sys

    import numpy as np
    import torch

    from edgetok.images import walk
    from edgetok.vit.methods.dtome_torch import calibrate_batches
    from edgetok.vlm.preprocess import image_processor, pixel_values

    if not any(r > 0 for r in method.r):
        raise EdgetokError("dtome calibration needs r > 0 in some block: give --r N (mean tokens merged per block)")
    paths = [p for p, _ in walk(folder, "--calibrate").samples]
    processor = image_processor(llava.source)
    passes, total = iter(["calibrating thresholds", "measuring merges"]), -(-len(paths) // batch)

    def batches():
        what = next(passes, "pass")
        for i, start in enumerate(range(0, len(paths), batch), 1):
            chunk = paths[start:start + batch]
            yield torch.from_numpy(np.concatenate([pixel_values(processor, p) for p in chunk]))
            print(f"· dtome {what}: batch {i}/{total} ({start + len(chunk)}/{len(paths)} images)", file=sys.stderr,
                  flush=True)

    calibrate_batches(tower, method, batches)
    method.calibration = {"images": str(Path(folder).resolve()), "samples": len(paths), "batch": batch,
                          **(method.calibration or {})}


def patched_llava(folder, method_name: str, **options):
    """The folder's LlavaForConditionalGeneration with its tower's layers patched as :func:`reduce_tower` patches
    them (dtome: calibrated again on ``calibrate``, deterministically, unless ``thresholds`` is given): the PyTorch
    reference a reduced export must equal (``get_image_features``, ``generate``)."""
    llava = load_llava(folder)
    reduce_tower(llava, method_name, options)
    return llava.model
