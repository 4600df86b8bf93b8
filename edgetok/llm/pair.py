"""`edgetok export spec-pair`: a draft and a target decoder in one folder, with a genai-style manifest
recording shapes, I/O name templates, the shared tokenizer and its hash, special tokens and max length."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgetok import atomic, hf, sidecar
from edgetok.errors import EdgetokError

if TYPE_CHECKING:
    from edgetok.llm.decoder import CausalLM

MANIFEST = "edgetok_pair.json"
TREE_MASK = "bool [batch, 1, sequence, past_sequence + sequence]: True where a token may attend (the cache, itself, " \
            "its ancestors)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    if not any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder, **hf.LOCAL)
    except Exception as exc:
        raise hf.load_error(folder, "the tokenizer", exc) from None


def tokenizer_hash(tok) -> str:
    """Identity of a tokenizer by what it does: its vocabulary and special tokens, not its file bytes."""
    data = {"vocab": sorted(tok.get_vocab().items()), "special": tok.special_tokens_map}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _check_compatible(target: CausalLM, draft: CausalLM, t_tok, d_tok, draft_spec: str) -> None:
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise EdgetokError(f"the draft {draft_spec} has vocab_size {dv} but the target has {tv}: a draft must share "
                           "the target's vocabulary")
    if t_tok is not None and d_tok is not None and tokenizer_hash(t_tok) != tokenizer_hash(d_tok):
        raise EdgetokError(f"the draft {draft_spec} and the target use different tokenizers (same size, other tokens); "
                           "pick a draft trained with the target's tokenizer")


def _special_tokens(tok, config) -> dict:
    ids = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if tok is not None:
        ids.update({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                    "pad_token_id": tok.pad_token_id})
        ids["tokens"] = {k: v for k, v in tok.special_tokens_map.items()}
    return ids


def export_pair(target: str, draft: str, out: str, say: Callable[[str], None] = lambda s: None) -> dict:
    # torch only here: reading a pair (generate, build-engine PAIR) refuses bad input before torch is imported
    from edgetok.llm.decoder import (
        PAST_KEY,
        PAST_VALUE,
        PRESENT_KEY,
        PRESENT_VALUE,
        check_decoder,
        export_decoder,
        layer_skip,
        load_causal_lm,
    )

    out_dir = Path(out)
    say(f"loading target {target}")
    t_lm = load_causal_lm(target)
    t_tok = _tokenizer(target)
    if draft == "none":  # a target alone: draft-free modes only (lookahead, prompt lookup)
        d_lm, d_tok = None, t_tok
    elif draft.startswith("layer-skip:"):
        try:
            n = int(draft.split(":", 1)[1])
        except ValueError:
            raise EdgetokError(f"--draft {draft}: give layer-skip:N with N the number of target layers to keep") from None
        d_lm, d_tok = layer_skip(t_lm, n), t_tok
    else:
        say(f"loading draft {draft}")
        d_lm, d_tok = load_causal_lm(draft), _tokenizer(draft)
    if d_lm is not None:
        _check_compatible(t_lm, d_lm, t_tok, d_tok, draft)
    atomic.check_target(out_dir, "folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):  # checked again when publishing: another export may get there first
        raise EdgetokError(f"-o {out} exists and is not empty; choose a new folder")

    with atomic.staging_dir(out_dir) as stage:
        entries = {"draft": None}
        for role, lm in (("target", t_lm), ("draft", d_lm)):
            if lm is None:
                continue
            (stage / role).mkdir()
            path = stage / role / "model.onnx"
            say(f"exporting the {role} decoder ({lm.layers} layers)")
            export_decoder(lm, path)
            say(f"checking the {role} against PyTorch: prefill, decode, verify, crop-and-continue, other shapes")
            validation = check_decoder(lm, path)
            entries[role] = {"file": f"{role}/model.onnx", "source": lm.source, "weights": lm.weights,
                             **lm.shapes(), "validation": validation}
        say("exporting the target's tree-verify variant (boolean [batch, 1, q, past + q] mask, explicit positions)")
        export_decoder(t_lm, stage / "target" / "tree.onnx", tree=True)
        entries["target"]["tree"] = {"file": "target/tree.onnx", "attention_mask": TREE_MASK,
                                     "validation": check_decoder(t_lm, stage / "target" / "tree.onnx", tree=True)}
        tok_info = None
        if t_tok is not None:
            (stage / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                if (Path(target) / name).is_file():
                    shutil.copy2(Path(target) / name, stage / "tokenizer" / name)
            tok_info = {"folder": "tokenizer", "sha256": tokenizer_hash(t_tok), "size": len(t_tok)}
        lengths = [e["max_position_embeddings"] for e in (entries["target"], entries["draft"]) if e]
        max_length = min((x for x in lengths if x), default=None)
        manifest = sidecar.stamp({
            "kind": "spec-pair",
            "target": entries["target"],
            "draft": entries["draft"],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
            "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            "kv_layout": ["batch", "kv_heads", "sequence", "head_size"],
            "vocab_size": t_lm.config.vocab_size,
            "tokenizer": tok_info,
            "special_tokens": _special_tokens(t_tok, t_lm.config),
            "max_length": max_length,
            "versions": sidecar.versions("torch", "transformers", "onnx", "onnxruntime"),
        })
        sidecar.write(stage / MANIFEST, manifest)
        atomic.publish_folder(stage, out_dir)  # one rename, onto nothing or an empty folder only
    manifest["path"] = str(out_dir)
    return manifest


def read_manifest(folder: str) -> dict:
    path = Path(folder) / MANIFEST
    if Path(folder).is_file():
        raise EdgetokError(f"{folder} is a file; give the folder `edgetok export spec-pair` wrote")
    if not Path(folder).is_dir():
        raise EdgetokError(f"{folder} does not exist; export a pair with `edgetok export spec-pair`")
    if not path.is_file():
        raise EdgetokError(f"{folder} has no {MANIFEST}; export it with `edgetok export spec-pair`")
    manifest = sidecar.load(path, "export the pair again")
    _check_fields(manifest, path)
    for key in ("target", "draft", "tokenizer"):
        entry = manifest.get(key)
        if isinstance(entry, dict):
            for field in ("file", "folder"):
                if field in entry:
                    inside(folder, entry[field], f"{MANIFEST} {key}.{field}")
            if isinstance(entry.get("tree"), dict):
                inside(folder, entry["tree"].get("file"), f"{MANIFEST} {key}.tree.file")
    return manifest


DECODER_INTS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size", "hidden_size",
                "vocab_size")


def _damaged(path: Path, field: str, value, want: str) -> EdgetokError:
    shown = "missing" if value is _MISSING else f"{json.dumps(value)[:40]}"
    return EdgetokError(f"{path}: {field} is {shown}, {want}: the manifest was edited or damaged; export the pair "
                        "again")


_MISSING = object()


def _check_fields(manifest, path: Path) -> None:
    """Every manifest field the runtime and build-engine read, present and of its type: a tampered or damaged
    manifest is one line naming the field, not a KeyError deep in a decoder."""
    if not isinstance(manifest, dict):
        raise _damaged(path, "the manifest", manifest, "not a JSON object")

    def whole(where: dict, key: str, label: str, optional: bool = False) -> None:
        value = where.get(key, _MISSING)
        if optional and value in (None, _MISSING):
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _damaged(path, label, value, "not a positive integer")

    for role in ("target", "draft"):
        entry = manifest.get(role, _MISSING)
        if role == "draft" and entry is None:
            continue  # a target exported alone (--draft none)
        if not isinstance(entry, dict):
            raise _damaged(path, role, entry, "not an object" + (" (or null)" if role == "draft" else ""))
        for key in DECODER_INTS:
            whole(entry, key, f"{role}.{key}")
        if entry["num_attention_heads"] % entry["num_key_value_heads"]:
            raise _damaged(path, f"{role}.num_key_value_heads", entry["num_key_value_heads"],
                           f"not a divisor of its {entry['num_attention_heads']} attention heads")
        if entry.get("tree") is not None and not isinstance(entry["tree"], dict):
            raise _damaged(path, f"{role}.tree", entry["tree"], "not an object")
    whole(manifest, "vocab_size", "vocab_size")
    whole(manifest, "max_length", "max_length", optional=True)
    for role in ("target", "draft"):
        entry = manifest.get(role)
        if entry and entry["vocab_size"] != manifest["vocab_size"]:
            raise _damaged(path, f"{role}.vocab_size", entry["vocab_size"],
                           f"not the pair's vocab_size {manifest['vocab_size']}")
    for key in ("tokenizer", "special_tokens"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise _damaged(path, key, manifest[key], "not an object (or null)")
    for key, value in (manifest.get("special_tokens") or {}).items():
        if key.endswith("_id") and value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise _damaged(path, f"special_tokens.{key}", value, "not a token id (or null)")


def check_decoder(model, entry: dict, role: str) -> None:
    """The decoder ``model`` (an ONNX path, or an ONNX Runtime session already open) against the manifest's
    ``entry`` for it: its KV-cache inputs (layers, KV heads, head size) and its logits (vocabulary). A manifest
    edited to describe another model would otherwise feed wrong caches or decode against a wrong vocabulary."""
    import re

    if isinstance(model, (str, Path)):
        import onnx

        graph = onnx.load(str(model), load_external_data=False).graph
        dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in [*graph.input, *graph.output]}
        name = Path(model).name
    else:
        dims = {v.name: [d if isinstance(d, int) else None for d in v.shape]
                for v in [*model.get_inputs(), *model.get_outputs()]}
        name = f"the {role} decoder"
    field = role.split("_")[0]  # target_tree: the target's entry
    keys = {int(m.group(1)): shape for n, shape in dims.items() if (m := re.fullmatch(r"past_key_values\.(\d+)\.key", n))}

    def refuse(key: str, actual) -> None:
        raise EdgetokError(f"{MANIFEST} {field}.{key} is {entry[key]} but {name} has {actual}: the manifest does not "
                           "describe its model (edited, or files mixed from two pairs); export the pair again")

    if len(keys) != entry["num_hidden_layers"]:
        refuse("num_hidden_layers", f"{len(keys)} layers of KV cache")
    for shape in keys.values():
        if len(shape) == 4 and shape[1] is not None and shape[1] != entry["num_key_value_heads"]:
            refuse("num_key_value_heads", f"{shape[1]} KV heads")
        if len(shape) == 4 and shape[3] is not None and shape[3] != entry["head_size"]:
            refuse("head_size", f"a head size of {shape[3]}")
    logits = dims.get("logits") or []
    if logits and logits[-1] is not None and logits[-1] != entry["vocab_size"]:
        refuse("vocab_size", f"{logits[-1]} logits per token")


def default_mode(manifest: dict) -> str:
    """`generate`'s mode when none is given: speculative with the pair's draft; a target exported alone
    (``--draft none``) has none, so lookahead, the draft-free mode that proposes the most per call."""
    return "speculative" if manifest.get("draft") else "lookahead"


def inside(folder: str, relative, what: str) -> Path:
    """A path a manifest names, refused unless it stays inside the pair folder (no .., no absolute, no link out)."""
    root = Path(folder).resolve()
    if not isinstance(relative, str) or not relative:
        raise EdgetokError(f"{what} is {relative!r}; give a path inside {folder} (export the pair again)")
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root) or path == root:
        raise EdgetokError(f"{what} {relative!r} points outside the pair folder {folder}; a pair only uses its own "
                           "files: export it again")
    return path


def summary(manifest: dict) -> str:
    files = "target/model.onnx, target/tree.onnx" + (", draft/model.onnx" if manifest["draft"] else ", no draft")
    lines = [f"wrote {manifest['path']} ({MANIFEST}, {files})"]
    for role in ("target", "draft"):
        e = manifest[role]
        if e is None:
            continue
        worst = max(e["validation"]["max_abs_diff"].values())
        if e.get("tree"):
            worst = max(worst, *e["tree"]["validation"]["max_abs_diff"].values())
        layers = f"{e['num_hidden_layers']} layer" + ("s" if e["num_hidden_layers"] != 1 else "")
        lines.append(f"  {role:7s} {e['source']} ({e['model_type']}, {layers}, hidden "
                     f"{e['hidden_size']}, weights: {e['weights']}); ONNX Runtime vs PyTorch max |diff| {worst:.1e} "
                     "over prefill/decode/verify/crop/other shapes")
    tok = manifest["tokenizer"]
    lines.append(f"  tokenizer {'none (use --prompt-ids)' if tok is None else tok['sha256'][:12]}, vocab "
                 f"{manifest['vocab_size']}, max length {manifest['max_length']}")
    return "\n".join(lines)
