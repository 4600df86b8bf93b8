"""Generation with an exported VLM folder on ONNX Runtime: the image through vision.onnx, its visual tokens
spliced into the prompt, then the language decoder as any target: greedy or sampled target decoding, lookahead
or prompt lookup (edgetok.llm.runtime's loops, unchanged).

The decoder is edgetok.llm.runtime's OrtDecoder whose token feed is embeddings: every token fed is embedded
through embedding.onnx, and rows at the image's positions are replaced by its visual embeddings. Positions are
explicit in every call, so prefill, decode and tree verification splice alike, and proposals past the prompt
never take a visual row.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.llm.runtime import OrtDecoder, _check_draft_free, _check_request, _tokenizer
from edgetok.vlm.export import MANIFEST, inside, read_manifest
from edgetok.vlm.prompt import expand, splice

MODES = ("target", "lookahead", "prompt-lookup")


def session(path: Path, threads: int = 0):
    """A CPU session; a graph with edgetok plugin nodes (a reduction step) runs their ONNX Runtime references."""
    import onnxruntime as ort

    from edgetok.runtime.plugins import prepare_ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # three sessions take turns
    prepare_ort(options, path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class VlmDecoder(OrtDecoder):
    """The language decoder (inputs_embeds variant) with the image's rows spliced in at its positions."""

    def __init__(self, path: Path, entry: dict, embedding, threads: int = 0):
        super().__init__(path, entry, "cpu", threads)
        self.embedding = embedding
        self.rows_at = np.zeros(0, np.int64)
        self.visual = np.zeros((0, entry["hidden_size"]), np.float32)
        _check_session(self.session, entry, path.name)

    def show(self, rows_at: np.ndarray, visual: np.ndarray) -> None:
        """The image for the next generation: ``visual`` rows at the positions ``rows_at`` gives (prompt.expand)."""
        self.rows_at, self.visual = rows_at, visual

    def _tokens_in(self, tokens: list[int], positions: np.ndarray) -> dict:
        embeds = self.embedding.run(None, {"input_ids": np.array([tokens], np.int64)})[0]
        return {"inputs_embeds": splice(embeds, positions, self.rows_at, self.visual)}


def _check_session(session, entry: dict, name: str) -> None:
    """The decoder file against the manifest's entry (layers, KV heads, head size, hidden size, vocabulary): a
    manifest describing another model would feed wrong caches."""
    dims = {v.name: list(v.shape) for v in [*session.get_inputs(), *session.get_outputs()]}
    layers = sum(1 for n in dims if n.startswith("past_key_values.") and n.endswith(".key"))
    kv = dims.get("past_key_values.0.key", [None] * 4)
    found = {"num_hidden_layers": layers, "num_key_value_heads": kv[1], "head_size": kv[3],
             "hidden_size": dims.get("inputs_embeds", [None] * 3)[-1], "vocab_size": dims.get("logits", [None])[-1]}
    for key, actual in found.items():
        if isinstance(actual, int) and actual != entry[key]:
            raise EdgetokError(f"{MANIFEST} decoder.{key} is {entry[key]} but {name} has {actual}: the manifest does not "
                               "describe its model; export the VLM again")


def encode(manifest: dict, folder: str, text: str | None, ids: list[int] | None) -> list[int]:
    if (text is None) == (ids is None):
        raise EdgetokError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if ids is not None:
        bad = [t for t in ids if not 0 <= t < manifest["vocab_size"]]
        if bad:
            raise EdgetokError(f"--prompt-ids {bad[0]} is outside the vocabulary 0..{manifest['vocab_size'] - 1}")
        return ids
    if manifest["tokenizer"] is None:
        raise EdgetokError(f"{folder} has no tokenizer (the model folder had none); give --prompt-ids")
    return _tokenizer(folder, manifest)(text, add_special_tokens=False)["input_ids"]


class Vlm:
    """An exported VLM folder's three sessions and its manifest."""

    def __init__(self, folder: str, mode: str = "target", threads: int = 0, manifest: dict | None = None):
        self.folder = folder
        self.manifest = manifest or read_manifest(folder)
        m = self.manifest
        self.vision = session(inside(folder, m["vision"]["file"], "vision file"), threads)
        self.embedding = session(inside(folder, m["embedding"]["file"], "embedding file"), threads)
        relative = m["decoder"]["tree"]["file"] if mode == "lookahead" else m["decoder"]["file"]
        self.decoder = VlmDecoder(inside(folder, relative, "decoder file"), m["decoder"], self.embedding, threads)

    def see(self, pixels: np.ndarray) -> np.ndarray:
        """The image's visual embeddings [tokens, hidden] (a data-dependent method's padding rows dropped)."""
        out = self.vision.run(None, {self.vision.get_inputs()[0].name: pixels})
        count = int(out[1][0]) if len(out) > 1 else out[0].shape[1]
        return out[0][0, :count]


def generate(folder: str, image: str, prompt: str | None = None, prompt_ids: list[int] | None = None,
             max_new_tokens: int = 64, mode: str = "target", temperature: float = 0.0, seed: int = 0,
             ngram: int = 4, branches: int = 4, tokens: int = 16, threads: int = 0) -> dict:
    """One generation for one image, as `edgetok generate DIR --image` reports it (JSON-ready): the keys of
    edgetok.llm.runtime.generate plus ``visual_tokens`` and ``vision_s``."""
    from edgetok.llm.runtime import generate_draft_free, generate_target
    from edgetok.vlm.prompt import check_prompt

    if mode not in MODES:
        raise EdgetokError(f"--mode {mode!r} is not for a VLM folder; choose {', '.join(MODES)}")
    _check_draft_free(ngram, branches, tokens)
    if not temperature >= 0 or temperature == float("inf"):
        raise EdgetokError(f"--temperature {temperature} must be a finite number >= 0 (0 is greedy)")
    manifest = read_manifest(folder)
    ids = encode(manifest, folder, prompt, prompt_ids)
    image_token = manifest["image_token_id"]
    check_prompt(ids, image_token, 1)
    _check_request(ids, max_new_tokens, 1, None, manifest["vocab_size"])
    from edgetok.vlm.preprocess import image_processor, pixel_values

    pixels = pixel_values(image_processor(folder), image)  # an undecodable image: one line naming the file
    vlm = Vlm(folder, mode, threads, manifest)
    start = time.perf_counter()
    visual = vlm.see(pixels)
    vision_s = time.perf_counter() - start
    expanded, rows_at = expand(ids, image_token, [len(visual)])
    max_length = manifest.get("max_length")
    if max_length and len(expanded) + max_new_tokens > max_length:
        raise EdgetokError(f"the prompt ({len(ids)} tokens, {len(expanded)} with the image's {len(visual)} visual tokens) "
                           f"plus --max-new-tokens {max_new_tokens} exceeds the folder's max length {max_length}; "
                           "shorten the prompt or generate fewer tokens")
    vlm.decoder.show(rows_at, visual)
    eos = manifest["special_tokens"].get("eos_token_id") if manifest["special_tokens"] else None
    eos = eos[0] if isinstance(eos, list) else eos
    if mode == "target":
        gen = generate_target(vlm.decoder, expanded, max_new_tokens, temperature, seed, eos, max_length)
    else:
        gen = generate_draft_free(vlm.decoder, expanded, max_new_tokens, mode, ngram, branches, tokens, temperature,
                                  seed, eos, max_length)
    result = {"mode": mode, "backend": "onnxruntime", "temperature": temperature, "seed": seed, "image": str(image),
              "prompt_ids": ids, "visual_tokens": len(visual), "vision_s": vision_s, **gen.as_dict(),
              "calls": {"target": vlm.decoder.calls}}
    if mode != "target":
        result["draft_free"] = {"ngram": ngram, "branches": branches if mode == "lookahead" else 1, "tokens": tokens}
    if manifest["tokenizer"] is not None:
        result["text"] = _tokenizer(folder, manifest).decode(gen.tokens)
    return result
