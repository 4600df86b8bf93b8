"""`edgetok export vlm`: a LLaVA folder as vision.onnx (the tower with the chosen token reduction, then the
projector), embedding.onnx, the language model as a KV-cache decoder taking embeddings (and its tree-verify
variant), the tokenizer, the image processor and a manifest; the pipeline (vision -> splice -> decoder) is checked
against the PyTorch model before anything is published, as one folder.

Reading a folder (``read_manifest``) imports neither torch nor ONNX Runtime: `generate` refuses a damaged or
edited folder in a second, one line naming the field or file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetok import atomic, sidecar
from edgetok.errors import EdgetokError
from edgetok.vit import methods
from edgetok.vlm.prompt import SPLICE

MANIFEST = "edgetok_vlm.json"
TOWERS = ("clip", "siglip")
PIPELINE_TOLERANCE = 1e-3  # float32 through a vision tower, a projector and a decoder: as the ViT exports' 1e-3


@dataclass
class VlmExportOptions:
    model: str
    output: str
    method: str = "none"
    method_options: dict = field(default_factory=dict)  # the names the method's declaration gives (edgetok.vit.methods)
    max_length: int | None = None  # prompt (visual tokens included) plus generated tokens; default: the LM's positions
    opset: int = 17


def _check_request(opts: VlmExportOptions) -> None:
    """What needs no model: refused before torch is imported."""
    out = Path(opts.output)
    atomic.check_target(out, "folder")
    if out.is_dir() and any(out.iterdir()):  # checked again when publishing: another export may get there first
        raise EdgetokError(f"-o {opts.output} exists and is not empty; choose a new folder")
    methods.check_options(opts.method, opts.method_options)
    if opts.method == "dtome" and not opts.method_options.get("calibrate"):
        raise EdgetokError("--method dtome needs --calibrate DIR: an image folder (one subfolder per class) on which "
                           "its per-block thresholds are calibrated (not the images you evaluate on)")
    if opts.max_length is not None and opts.max_length < 2:
        raise EdgetokError(f"--max-length {opts.max_length} must be >= 2 (the visual tokens, the text and the answer "
                           "share it), e.g. 2048")
    if opts.opset < 14:
        raise EdgetokError(f"--opset {opts.opset} is too old for the decoder's attention; give 14 or later (default 17)")


def _visual_counts(llava, tower, reduced_plan, data_dependent: bool, calibrate: str | None) -> dict:
    """Visual tokens per image after the feature-layer selection: dense, and after the method (planned for a
    fixed count). A count that follows the image is measured on the calibration images (min, mean, max per
    image; vision.onnx's ``visual_tokens`` gives each image's at run time)."""
    grid = (llava.image_size // llava.patch_size) ** 2
    prefix = 1 if llava.tower == "clip" else 0
    dense = grid + prefix - llava.dropped  # SigLIP with "default" drops its first patch row, as transformers does
    if reduced_plan is None:
        return {"dense": dense, "planned": dense, "min": dense, "max": dense}
    if data_dependent:
        counts = _measured_counts(llava, tower, calibrate) if calibrate else []
        if not counts:
            return {"dense": dense, "planned": None, "min": None, "max": dense}
        return {"dense": dense, "planned": None, "min": min(counts), "max": max(counts),
                "mean": round(sum(counts) / len(counts), 2), "measured_on": {"images": str(Path(calibrate).resolve()),
                                                                            "count": len(counts)}}
    after = reduced_plan.tokens[-1][1] - llava.dropped
    return {"dense": dense, "planned": after, "min": after, "max": after}


def _measured_counts(llava, tower, images: str, batch: int = 32) -> list[int]:
    """Each calibration image's visual tokens through the reduced tower (its ``visual_tokens`` output), the
    images read by the model's own image processor, as calibration reads them."""
    import numpy as np
    import torch

    from edgetok.images import walk
    from edgetok.vlm.preprocess import image_processor, pixel_values

    paths = [p for p, _ in walk(images, "--calibrate").samples]
    processor = image_processor(llava.source)
    counts: list[int] = []
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            pixels = torch.from_numpy(np.concatenate([pixel_values(processor, p) for p in paths[start:start + batch]]))
            counts += [int(n) for n in tower.module(pixels)[tower.output_names.index("visual_tokens")]]
    return counts


def export_vlm(opts: VlmExportOptions, say: Callable[[str], None] = lambda s: None) -> dict:
    """Run the whole export; returns the manifest. Nothing is written unless every check passes."""
    _check_request(opts)
    from edgetok.vlm.llava import check_folder

    check_folder(opts.model, opts.method)  # architecture, tower, feature layer: one line each, before torch
    from edgetok.vlm.language import export_embedding, export_language, language_lm
    from edgetok.vlm.llava import load_llava, reduce_tower, tower_vit
    from edgetok.vlm.preprocess import image_processor
    from edgetok.vlm.vision import export_vision

    say(f"loading {opts.model}")
    llava = load_llava(opts.model)
    reduces = opts.method != "none"
    if reduces:
        say(f"reducing the vision tower's tokens with {opts.method}")
        tower, reduced_plan = reduce_tower(llava, opts.method, dict(opts.method_options),
                                           opts.method_options.get("calibrate"))
    else:
        tower, reduced_plan = tower_vit(llava), None
    data_dependent = "visual_tokens" in tower.output_names  # the count follows the image (dtome)
    tokens = _visual_counts(llava, tower, reduced_plan, data_dependent, opts.method_options.get("calibrate"))
    text = llava.config.text_config
    positions = getattr(text, "max_position_embeddings", None)
    max_length = opts.max_length or positions
    if positions and max_length > positions:
        raise EdgetokError(f"--max-length {max_length} exceeds the language model's {positions} positions; give at most "
                           f"{positions}")
    if max_length is not None and max_length <= tokens["max"]:
        raise EdgetokError(f"--max-length {max_length} leaves no room for text: one image takes {tokens['max']} visual "
                           f"tokens of it (then the prompt's text and the answer); give more than {tokens['max']}, or "
                           "reduce further")
    lm = language_lm(llava.model)
    processor = image_processor(opts.model)
    out = Path(opts.output)
    with atomic.staging_dir(out) as stage:
        say(f"exporting vision.onnx ({llava.tower} tower, feature layer {llava.feature_layer}, "
            f"{llava.select} selection, {opts.method})")
        vision = {"file": "vision.onnx", "dense_file": None, "tower": llava.tower, "image_size": llava.image_size,
                  "patch_size": llava.patch_size, "feature_layer": llava.feature_layer,
                  "select_strategy": llava.select, "method": opts.method,
                  "options": json.loads(json.dumps(reduced_plan.params if reduced_plan else {}, default=str)),
                  "tokens": tokens, "data_dependent": data_dependent,
                  "validation": export_vision(tower, stage / "vision.onnx", opts.opset)}
        if reduces:
            say("exporting vision_dense.onnx (the same tower unreduced, for side-by-side profiles)")
            vision["dense_file"] = "vision_dense.onnx"
            vision["dense_validation"] = export_vision(load_llava(opts.model), stage / "vision_dense.onnx", opts.opset)
        say("exporting embedding.onnx (the language model's embedding table)")
        embedding = {"file": "embedding.onnx", "validation": export_embedding(lm, stage / "embedding.onnx", opts.opset)}
        decoder = export_language(lm, stage, opts.opset, say)
        tok_info, tok = _copy_tokenizer(opts.model, stage)
        (stage / "preprocessor").mkdir()
        processor.save_pretrained(stage / "preprocessor")
        from edgetok.llm.pair import _special_tokens

        manifest = {
            "kind": "vlm",
            "source": str(Path(opts.model).resolve()),
            "weights": llava.weights,
            "vision": vision,
            "embedding": embedding,
            "decoder": decoder,
            "image_token_id": llava.image_token_id,
            "splice": SPLICE,
            "vocab_size": text.vocab_size,
            "max_length": max_length,
            "tokenizer": tok_info,
            "special_tokens": _special_tokens(tok, text),
            "preprocessing": {"folder": "preprocessor", **tower.preprocessing},
        }
        say("checking the pipeline (vision -> splice -> decoder prefill, ONNX Runtime) against the PyTorch "
            + ("model patched with " + opts.method if reduces else "model"))
        # reduce_tower patched the LLaVA's own tower layers: its model is what patched_llava(MODEL, method) returns
        manifest["validation"] = check_pipeline(stage, manifest, llava.model, processor)
        manifest["files"] = {str(p.relative_to(stage)): sidecar.file_sha256(p)
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        manifest["versions"] = sidecar.versions("torch", "transformers", "onnx", "onnxruntime")
        manifest = sidecar.stamp(manifest)
        sidecar.write(stage / MANIFEST, manifest)
        atomic.publish_folder(stage, out)  # one rename, onto nothing or an empty folder only
    manifest["path"] = str(out)
    return manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _copy_tokenizer(model: str, stage: Path):
    """The folder's tokenizer files (and the tokenizer, for the special tokens), or (None, None) without one."""
    from edgetok.llm.pair import _tokenizer, tokenizer_hash

    tok = _tokenizer(model)
    if tok is None:
        return None, None
    (stage / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (Path(model) / name).is_file():
            shutil.copy2(Path(model) / name, stage / "tokenizer" / name)
    return {"folder": "tokenizer", "sha256": tokenizer_hash(tok), "size": len(tok)}, tok


def check_pipeline(folder: Path, manifest: dict, reference, processor, images: int = 2) -> dict:
    """The exported pipeline's prefill logits (ONNX Runtime: vision -> splice -> decoder) against ``reference``
    (the LlavaForConditionalGeneration, patched with the method when it reduces) given the same pixels and the
    prompt expanded to the image's visual tokens, on images the export never saw."""
    import numpy as np
    import torch

    from edgetok.onnx.validate import ort_session
    from edgetok.vlm.prompt import expand, splice

    vision = ort_session(str(folder / manifest["vision"]["file"]))
    embedding = ort_session(str(folder / manifest["embedding"]["file"]))
    decoder = ort_session(str(folder / manifest["decoder"]["file"]))
    entry, image_token = manifest["decoder"], manifest["image_token_id"]
    size = manifest["vision"]["image_size"]
    gen = torch.Generator().manual_seed(123)
    worst, counts = 0.0, []
    for i in range(images):
        pixels = torch.randn(1, 3, size, size, generator=gen)
        out = vision.run(None, {vision.get_inputs()[0].name: pixels.numpy()})
        count = int(out[1][0]) if len(out) > 1 else out[0].shape[1]
        counts.append(count)
        text = torch.randint(0, manifest["vocab_size"], (6,), generator=gen).tolist()
        text = [t if t != image_token else 0 for t in text]
        ids, rows_at = expand(text[:2] + [image_token] + text[2:], image_token, [count])
        positions = np.arange(len(ids), dtype=np.int64)
        embeds = embedding.run(None, {"input_ids": np.array([ids], np.int64)})[0]
        feed = {"inputs_embeds": splice(embeds, positions, rows_at, out[0][0, :count]),
                "attention_mask": np.ones((1, len(ids)), np.int64), "position_ids": positions[None]}
        for layer in range(entry["num_hidden_layers"]):
            for kind in ("key", "value"):
                feed[f"past_key_values.{layer}.{kind}"] = np.zeros(
                    (1, entry["num_key_value_heads"], 0, entry["head_size"]), np.float32)
        got = decoder.run(["logits"], feed)[0]
        try:
            with torch.no_grad():
                want = reference(input_ids=torch.tensor([ids]), pixel_values=pixels).logits.numpy()
        except ValueError as exc:  # transformers: "Image features and image tokens do not match"
            raise EdgetokError(f"the exported pipeline gives {count} visual tokens but PyTorch another count "
                               f"({' '.join(str(exc).split())[:120]}); please report this model and method") from None
        worst = max(worst, float(np.abs(want - got).max()))
    if worst > PIPELINE_TOLERANCE:
        raise EdgetokError(f"the exported pipeline's logits differ from PyTorch's by {worst:.3g} (> {PIPELINE_TOLERANCE}):"
                           " the export is wrong, please report it with the model and method")
    return {"backend": "onnxruntime-cpu", "reference": "patched PyTorch model" if manifest["vision"]["method"] != "none"
            else "PyTorch model", "images": images, "visual_tokens": counts, "max_abs_diff": worst,
            "tolerance": PIPELINE_TOLERANCE, "passed": True}


# --- reading ------------------------------------------------------------------------------------------------------

_MISSING = object()


def _damaged(path: Path, name: str, value, want: str) -> EdgetokError:
    shown = "missing" if value is _MISSING else json.dumps(value)[:40]
    return EdgetokError(f"{path}: {name} is {shown}, {want}: the manifest was edited or damaged; export the VLM again")


def _check_fields(manifest, path: Path) -> None:
    """Every field the runtime (and build-engine, profile, eval) read, present and of its type: a tampered or
    damaged manifest is one line naming the field, not a KeyError deep in a session."""
    if not isinstance(manifest, dict):
        raise _damaged(path, "the manifest", manifest, "not a JSON object")

    def get(where: dict, dotted: str):
        value = where
        for part in dotted.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        return value

    def whole(dotted: str, optional: bool = False, low: int = 1) -> None:
        value = get(manifest, dotted)
        if optional and value in (None, _MISSING):
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _damaged(path, dotted, value, "not a " + ("positive" if low else "non-negative") + " integer")

    def obj(dotted: str, optional: bool = False) -> None:
        value = get(manifest, dotted)
        if optional and value is None:
            return
        if not isinstance(value, dict):
            raise _damaged(path, dotted, value, "not an object" + (" (or null)" if optional else ""))

    def text(dotted: str, optional: bool = False, choices=None) -> None:
        value = get(manifest, dotted)
        if optional and value is None:
            return
        if not isinstance(value, str) or not value or (choices and value not in choices):
            raise _damaged(path, dotted, value, f"not one of {', '.join(choices)}" if choices else "not a file name")

    if manifest.get("kind") != "vlm":
        raise _damaged(path, "kind", manifest.get("kind", _MISSING), 'not "vlm"')
    for key in ("vision", "embedding", "decoder", "decoder.tree", "vision.tokens", "files"):
        obj(key)
    for key in ("tokenizer", "special_tokens"):
        obj(key, optional=True)
    for key in ("vision.file", "embedding.file", "decoder.file", "decoder.tree.file"):
        text(key)
    text("vision.dense_file", optional=True)
    text("vision.tower", choices=TOWERS)
    text("decoder.inputs", choices=("inputs_embeds",))
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size", "hidden_size",
                "vocab_size"):
        whole(f"decoder.{key}")
    whole("vocab_size")
    whole("vision.image_size")
    whole("vision.patch_size")
    whole("vision.tokens.dense")
    whole("vision.tokens.max")
    whole("max_length", optional=True)
    whole("image_token_id", low=0)
    entry = manifest["decoder"]
    if entry["num_attention_heads"] % entry["num_key_value_heads"]:
        raise _damaged(path, "decoder.num_key_value_heads", entry["num_key_value_heads"],
                       f"not a divisor of its {entry['num_attention_heads']} attention heads")
    if entry["vocab_size"] != manifest["vocab_size"]:
        raise _damaged(path, "decoder.vocab_size", entry["vocab_size"], f"not the VLM's vocab_size {manifest['vocab_size']}")
    if manifest["image_token_id"] >= manifest["vocab_size"]:
        raise _damaged(path, "image_token_id", manifest["image_token_id"], f"outside the vocabulary 0..{manifest['vocab_size'] - 1}")
    if manifest.get("max_length") is not None and manifest["max_length"] <= manifest["vision"]["tokens"]["max"]:
        raise _damaged(path, "max_length", manifest["max_length"], "not above the visual tokens")
    for key, value in (manifest.get("special_tokens") or {}).items():
        if key.endswith("_id") and value is not None and not (
                isinstance(value, int) and not isinstance(value, bool)
                or isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise _damaged(path, f"special_tokens.{key}", value, "not a token id (or null)")
    if not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in manifest["files"].items()):
        raise _damaged(path, "files", manifest["files"], "not {relative path: SHA-256}")


def inside(folder: str, relative, what: str) -> Path:
    """A path the manifest names, refused unless it stays inside the VLM folder (no .., no absolute, no link out)."""
    root = Path(folder).resolve()
    if not isinstance(relative, str) or not relative:
        raise EdgetokError(f"{what} is {relative!r}; give a path inside {folder} (export the VLM again)")
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root) or path == root:
        raise EdgetokError(f"{what} {relative!r} points outside the VLM folder {folder}; a VLM folder only uses its "
                           "own files: export it again")
    return path


def read_manifest(folder: str, verify: bool = True) -> dict:
    """The manifest of an exported VLM folder: fields checked, every path it names inside the folder, and (with
    ``verify``) every file's SHA-256 as recorded (once per file version: ``sidecar.cached_sha256``)."""
    root = Path(folder)
    if root.is_file():
        raise EdgetokError(f"{folder} is a file; give the folder `edgetok export vlm` wrote")
    if not root.is_dir():
        raise EdgetokError(f"{folder} does not exist; export a VLM with `edgetok export vlm MODEL -o {folder}`")
    path = root / MANIFEST
    if not path.is_file():
        raise EdgetokError(f"{folder} has no {MANIFEST}; export it with `edgetok export vlm`")
    manifest = sidecar.load(path, "export the VLM again")
    _check_fields(manifest, path)
    named = [("vision.file", manifest["vision"]["file"]), ("embedding.file", manifest["embedding"]["file"]),
             ("decoder.file", manifest["decoder"]["file"]), ("decoder.tree.file", manifest["decoder"]["tree"]["file"])]
    if manifest["vision"].get("dense_file"):
        named.append(("vision.dense_file", manifest["vision"]["dense_file"]))
    for key, relative in named:
        inside(folder, relative, f"{MANIFEST} {key}")
        if relative not in manifest["files"]:
            raise _damaged(path, f"files[{relative!r}]", _MISSING, f"the SHA-256 of {key}")
    for key in ("tokenizer", "preprocessing"):
        if isinstance(manifest.get(key), dict) and "folder" in manifest[key]:
            inside(folder, manifest[key]["folder"], f"{MANIFEST} {key}.folder")
    if verify:
        for relative, want in manifest["files"].items():
            file = inside(folder, relative, f"{MANIFEST} files")
            if not file.is_file():
                raise EdgetokError(f"{folder} lacks {relative}, which {MANIFEST} lists; export the VLM again")
            if sidecar.cached_sha256(file) != want:
                raise EdgetokError(f"{file} is not the file {MANIFEST} records (SHA-256 {want[:12]}...): it changed "
                                   "after the export, or files of two exports were mixed; export the VLM again")
    return manifest


def is_vlm(folder: str) -> bool:
    """Whether ``folder`` is an exported VLM (the commands that take a pair or a VLM folder ask this first)."""
    return (Path(folder) / MANIFEST).is_file()


def summary(manifest: dict) -> str:
    v, d, val = manifest["vision"], manifest["decoder"], manifest["validation"]
    t = v["tokens"]
    count = (f"{t['dense']} dense, then each image's own count (vision.onnx's visual_tokens)" if v["data_dependent"] else
             f"{t['dense']}" + (f" -> {t['planned']}" if t["planned"] != t["dense"] else ""))
    worst = max(*d["validation"]["max_abs_diff"].values(), *d["tree"]["validation"]["max_abs_diff"].values())
    files = "vision.onnx" + (", vision_dense.onnx" if v["dense_file"] else "") + \
        ", embedding.onnx, decoder/model.onnx, decoder/tree.onnx"
    tok = manifest["tokenizer"]
    return "\n".join([
        f"wrote {manifest['path']} ({MANIFEST}, {files})",
        f"  vision    {v['tower']} {v['image_size']}px/{v['patch_size']}, feature layer {v['feature_layer']} "
        f"({v['select_strategy']}), {v['method']}: visual tokens per image {count}",
        f"  language  {d['model_type']}, {d['num_hidden_layers']} layers, hidden {d['hidden_size']}, vocab "
        f"{manifest['vocab_size']}; decoder vs PyTorch max |diff| {worst:.1e} over prefill/decode/verify/crop/other shapes",
        f"  pipeline  vision -> splice -> prefill vs the {val['reference']}: max |diff| {val['max_abs_diff']:.1e} on "
        f"{val['images']} images (visual tokens {', '.join(map(str, val['visual_tokens']))})",
        f"  tokenizer {'none (use --prompt-ids)' if tok is None else tok['sha256'][:12]}, image token "
        f"{manifest['image_token_id']}, max length {manifest['max_length']}",
    ])
