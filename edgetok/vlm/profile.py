"""`edgetok profile DIR --vlm --image IMG`: what the visual tokens cost, dense against reduced in one run.

For each vision tower of the folder (vision.onnx, and vision_dense.onnx when the method reduces) the same image
and prompt go through the whole pipeline with greedy target decoding; the runs alternate between the towers, so
a busy machine slows both alike. Per tower: the vision time, the prefill (the expanded prompt but its last
token), the time to first token (vision + prefill + the first decoding step, what a user waits for), the decode
rate, and the KV cache: measured on the decoder's cache after the generation, and per token
(2 · layers · KV heads · head size · 4 bytes), from which the prompt's share follows. Generation runs to the
full length asked (no end-of-sequence stop), as `profile --pair` does, so both towers decode as many tokens.
"""

from __future__ import annotations

import copy
import resource
import time
from pathlib import Path

import numpy as np

from edgetok import sidecar
from edgetok.errors import EdgetokError
from edgetok.llm.pair import inside
from edgetok.llm.runtime import generate_target
from edgetok.profile.environment import environment
from edgetok.vlm.export import read_manifest
from edgetok.vlm.prompt import check_prompt, expand

BACKENDS = ("onnxruntime", "tensorrt")
PROMPT_TEXT = 15  # text tokens after the image token in the default prompt
FLOAT32 = 4


def default_prompt(manifest: dict) -> list[int]:
    """The image token, then seeded text ids (none of them the image token): the timing does not depend on
    which tokens they are, and a folder without a tokenizer gets the same prompt."""
    image = manifest["image_token_id"]
    ids = np.random.default_rng(0).integers(0, manifest["vocab_size"] - 1, PROMPT_TEXT)
    return [image] + [int(t + (t >= image)) for t in ids]


def kv_bytes_per_token(entry: dict) -> int:
    """A key and a value per layer, float32."""
    return 2 * entry["num_hidden_layers"] * entry["num_key_value_heads"] * entry["head_size"] * FLOAT32


def cache_bytes(cache: list) -> int:
    """Bytes the decoder's cache holds (numpy arrays on ONNX Runtime, torch tensors on an engine)."""
    return int(sum(c.nbytes for c in cache))


def check_request(image: str | None, max_new_tokens: int, repeats: int, backend: str) -> None:
    """What needs no model: refused before any session opens."""
    if not image:
        raise EdgetokError("--vlm needs --image IMG: the image the profiled generations see")
    if not Path(image).is_file():
        raise EdgetokError(f"--image {image} is not a file; give an image (PNG, JPEG, ...)")
    if max_new_tokens < 1:
        raise EdgetokError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    if repeats < 1:
        raise EdgetokError(f"--iterations {repeats} must be >= 1 (generations per vision tower)")
    if backend not in BACKENDS:
        raise EdgetokError(f"--backend {backend!r} for a VLM folder is unknown; choose {', '.join(BACKENDS)}")


def _open(folder: str, manifest: dict, backend: str, threads: int):
    """(the folder's Vlm, {tower label: vision session}): 'reduced' is vision.onnx when the method reduces, and
    'dense' the unreduced tower (vision.onnx itself for method none)."""
    method = manifest["vision"]["method"]
    if backend == "tensorrt":
        from edgetok.vlm.engines import EngineVlm

        vlm = EngineVlm(folder, "target", manifest)
        dense = vlm.dense_vision() if manifest["vision"].get("dense_file") else None
    else:
        from edgetok.vlm.runtime import Vlm, session

        vlm = Vlm(folder, "target", threads, manifest)
        dense_file = manifest["vision"].get("dense_file")
        dense = session(inside(folder, dense_file, "vision.dense_file"), threads) if dense_file else None
    if method == "none":
        return vlm, {"dense": vlm.vision}
    return vlm, {**({"dense": dense} if dense is not None else {}), "reduced": vlm.vision}


def _generate(vlm, vision, pixels: np.ndarray, ids: list[int], max_new: int, max_length: int | None) -> dict:
    """One generation through ``vision``: its times, tokens and cache."""
    decoder = vlm.decoder
    start = time.perf_counter()
    visual = _see(vlm, vision, pixels)
    vision_s = time.perf_counter() - start
    expanded, rows_at = expand(ids, vlm.manifest["image_token_id"], [len(visual)])
    if max_length and len(expanded) + max_new > max_length:
        raise EdgetokError(f"the prompt ({len(expanded)} tokens with the image's {len(visual)} visual tokens) plus "
                           f"--max-new-tokens {max_new} exceeds the folder's max length {max_length}; give fewer "
                           "--max-new-tokens")
    decoder.show(rows_at, visual)
    mark = len(decoder.history)
    gen = generate_target(decoder, expanded, max_new, 0.0, 0, None, max_length)
    calls = decoder.history[mark:]
    first_step = calls[1 if len(expanded) > 1 else 0][1]  # after the prefill call (none for a 1-token prompt)
    return {"visual_tokens": len(visual), "prompt_tokens": len(expanded), "tokens": gen.tokens,
            "vision_s": vision_s, "prefill_s": gen.prefill_s, "first_step_s": first_step,
            "ttft_s": vision_s + gen.prefill_s + first_step, "decode_s": gen.decode_s,
            "cache_tokens": decoder.length, "cache_bytes": cache_bytes(decoder.cache)}


def _see(vlm, vision, pixels: np.ndarray) -> np.ndarray:
    """The folder's ``see`` through the given tower (the runtime's own, so padding rows are dropped alike)."""
    if vision is vlm.vision:
        return vlm.see(pixels)
    other = copy.copy(vlm)
    other.vision = vision
    return other.see(pixels)


def profile_vlm(folder: str, image: str, max_new_tokens: int = 32, repeats: int = 3, threads: int = 0,
                backend: str = "onnxruntime", prompt: str | None = None, prompt_ids: list[int] | None = None) -> dict:
    """Dense against reduced for one image and prompt (text, ids, or by default the image token and seeded text
    ids); medians over ``repeats`` generations per tower after one warm-up each."""
    check_request(image, max_new_tokens, repeats, backend)
    manifest = read_manifest(folder)
    if prompt is None and prompt_ids is None:
        ids = default_prompt(manifest)
    else:
        from edgetok.vlm.runtime import encode

        ids = encode(manifest, folder, prompt, prompt_ids)
    check_prompt(ids, manifest["image_token_id"], 1)
    tokens, max_length = manifest["vision"]["tokens"], manifest.get("max_length")
    longest = len(ids) - ids.count(manifest["image_token_id"]) + max(tokens["dense"], tokens["max"])
    if max_length and longest + max_new_tokens > max_length:
        raise EdgetokError(f"the prompt ({longest} tokens with the dense tower's {tokens['dense']} visual tokens) plus "
                           f"--max-new-tokens {max_new_tokens} exceeds the folder's max length {max_length}; give at "
                           f"most --max-new-tokens {max_length - longest}")
    from edgetok.vlm.preprocess import image_processor, pixel_values

    pixels = pixel_values(image_processor(folder), image)  # an undecodable image: one line naming the file
    vlm, towers = _open(folder, manifest, backend, threads)
    for vision in towers.values():  # warm-up every session
        _generate(vlm, vision, pixels, ids, min(4, max_new_tokens), max_length)
    runs = {label: [] for label in towers}
    for _ in range(repeats):
        for label, vision in towers.items():
            runs[label].append(_generate(vlm, vision, pixels, ids, max_new_tokens, max_length))
    per_token = kv_bytes_per_token(manifest["decoder"])
    rows = {}
    for label, gens in runs.items():
        first = gens[0]

        def median(key, gens=gens):
            return float(np.median([g[key] for g in gens]))

        rows[label] = {
            "vision_file": manifest["vision"]["dense_file" if label == "dense" and manifest["vision"]["method"] != "none"
                                              else "file"],
            "visual_tokens": first["visual_tokens"], "prompt_tokens": first["prompt_tokens"],
            "vision_ms": median("vision_s") * 1e3, "prefill_ms": median("prefill_s") * 1e3,
            "time_to_first_token_ms": median("ttft_s") * 1e3,
            "decode_tokens_per_s": float(np.median([len(g["tokens"]) / g["decode_s"] for g in gens])),
            "new_tokens": len(first["tokens"]),
            "kv_cache": {"bytes_per_token": per_token, "prompt_bytes": per_token * first["prompt_tokens"],
                         "visual_bytes": per_token * first["visual_tokens"], "end_tokens": first["cache_tokens"],
                         "end_bytes": first["cache_bytes"]},
            "tokens": first["tokens"],
            "deterministic": all(g["tokens"] == first["tokens"] for g in gens),
        }
    if "dense" in rows and "reduced" in rows:
        dense, reduced = rows["dense"], rows["reduced"]
        same = next((i for i, (a, b) in enumerate(zip(dense["tokens"], reduced["tokens"])) if a != b), None)
        reduced["vs_dense"] = {
            "visual_tokens": reduced["visual_tokens"] / dense["visual_tokens"],
            "time_to_first_token": reduced["time_to_first_token_ms"] / dense["time_to_first_token_ms"],
            "prefill": reduced["prefill_ms"] / dense["prefill_ms"],
            "kv_cache_prompt": reduced["kv_cache"]["prompt_bytes"] / dense["kv_cache"]["prompt_bytes"],
            "decode_tokens_per_s": reduced["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            "tokens_equal_dense": same is None, "first_different_token": same,
        }
    v = manifest["vision"]
    return sidecar.stamp({
        "kind": "vlm-profile",
        "folder": str(folder),
        "image": str(image),
        "method": {"name": v["method"], "options": v.get("options") or {}, "data_dependent": v["data_dependent"]},
        "settings": {"backend": backend, "threads": threads or "all", "max_new_tokens": max_new_tokens,
                     "repeats": repeats, "prompt_ids": ids, "decoding": "greedy target, no end-of-sequence stop",
                     "statistic": "median"},
        "towers": rows,
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        "environment": environment(),
    })


def markdown(report: dict) -> str:
    lines = ["| tower | visual tokens | vision ms | prefill ms | time to first token ms | decode tok/s | "
             "KV cache at first token | KV cache at end |", "|---|---|---|---|---|---|---|---|"]
    for label, r in report["towers"].items():
        name = "dense" if label == "dense" else f"{report['method']['name']} (reduced)"
        kv = r["kv_cache"]
        lines.append(f"| {name} | {r['visual_tokens']} | {r['vision_ms']:.2f} | {r['prefill_ms']:.2f} | "
                     f"{r['time_to_first_token_ms']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{kv['prompt_bytes'] / 2**10:.1f} KiB | {kv['end_bytes'] / 2**10:.1f} KiB |")
    reduced = report["towers"].get("reduced", {}).get("vs_dense")
    if reduced:
        lines += ["", f"reduced / dense: visual tokens {reduced['visual_tokens']:.2f}, time to first token "
                      f"{reduced['time_to_first_token']:.2f}, prefill {reduced['prefill']:.2f}, KV cache of the prompt "
                      f"{reduced['kv_cache_prompt']:.2f}; greedy tokens equal dense: {reduced['tokens_equal_dense']}"]
    s = report["settings"]
    lines.append(f"{s['backend']}, {s['repeats']} generations of {s['max_new_tokens']} tokens per tower (medians), "
                 f"{len(s['prompt_ids'])} prompt tokens before the image's expansion")
    return "\n".join(lines)
