"""`edgetok build-engine PAIR`: every decoder of a pair (target, the target's tree variant, draft) as an engine, with
the KV-cache shape profile the pair's runs need, taken from its manifest, and the engines recorded in it.

One optimisation profile per decoder serves prefill and every round: batch as asked (1 for generation), query
length 1..max length (prefill feeds the prompt; decode 1; verify k + 1; a tree its size), past 0..max length − 1,
total (past + query) 1..max length. OPT is the query length a round feeds (k + 1, or a lookahead tree).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable

from edgetok import atomic, sidecar
from edgetok.engine.options import BuildOptions, parse_batch
from edgetok.errors import EdgetokError
from edgetok.llm.pair import MANIFEST, check_decoder, inside, read_manifest

DEFAULT_MAX_LENGTH = 2048  # when the model declares no max_position_embeddings
OPT_PAST = 64  # past length the kernels are tuned for


def is_pair(path: str | None) -> bool:
    return bool(path) and (Path(path) / MANIFEST).is_file()


def decoder_shapes(entry: dict, max_length: int, query_opt: int, batch: tuple[int, int, int],
                   tree: bool = False) -> list[str]:
    """trtexec-style ``name:MIN:OPT:MAX`` for every input of one decoder."""
    past_opt = min(OPT_PAST, max_length - query_opt)
    total = (1, past_opt + query_opt, max_length)
    query = (1, min(query_opt, max_length), max_length)
    past = (0, past_opt, max_length - 1)
    heads, size = entry["num_key_value_heads"], entry["head_size"]

    def spec(name, *dims):
        shapes = ["x".join(str(d[i]) if isinstance(d, tuple) else str(d) for d in dims) for i in range(3)]
        return f"{name}:{':'.join(shapes)}"

    b = batch
    shapes = [spec("input_ids", b, query), spec("position_ids", b, query),
              spec("attention_mask", b, 1, query, total) if tree else spec("attention_mask", b, total)]
    for layer in range(entry["num_hidden_layers"]):
        for kind in ("key", "value"):
            shapes.append(spec(f"past_key_values.{layer}.{kind}", b, heads, past, size))
    return shapes


def build_pair(folder: str, opts: BuildOptions, k: int = 4, tree_tokens: int = 16,
               say: Callable[[str], None] = lambda s: None) -> dict:
    """Build every decoder of the pair at ``folder`` with ``opts``' backend and precision; returns the manifest."""
    from edgetok.engine.build import build_engine

    if opts.output or opts.shapes:
        raise EdgetokError("build-engine PAIR names its engines and shapes from the pair manifest; drop -o/--shapes")
    if k < 1 or tree_tokens < 1:
        raise EdgetokError(f"--k {k} and --tokens {tree_tokens} must be >= 1 (the query length the profiles favour)")
    manifest = read_manifest(folder)
    max_length = manifest.get("max_length") or DEFAULT_MAX_LENGTH
    batch = parse_batch(opts.batch or "1")
    decoders = [("target", manifest["target"], manifest["target"]["file"], k + 1, False)]
    if manifest["target"].get("tree"):
        decoders.append(("target_tree", manifest["target"], manifest["target"]["tree"]["file"], tree_tokens + 1, True))
    if manifest.get("draft"):
        decoders.append(("draft", manifest["draft"], manifest["draft"]["file"], 1, False))
    engines = {}
    # All or nothing: every engine is built into a staging folder beside its place, and the engines (target/,
    # draft/) and the manifest that records them are published only when all built, as one set under the pair's
    # lock (the one `export spec-pair` publishes the folder under), the manifest last: a failure on the draft,
    # or a rename failing in draft/ after target/ was done, leaves the old engines and manifest whole.
    with contextlib.ExitStack() as stack:
        staged = []
        for role, entry, relative, query_opt, tree in decoders:
            onnx_path = inside(folder, relative, f"{MANIFEST} {role} file")
            check_decoder(onnx_path, entry, role)
            shapes = decoder_shapes(entry, max_length, query_opt, batch, tree)
            out = onnx_path.with_name(f"{onnx_path.stem}.{opts.precision}.engine")
            stage = stack.enter_context(atomic.staging_dir(out))
            say(f"building the {role} decoder ({relative}): query 1..{max_length}, past 0..{max_length - 1}")
            report = build_engine(dataclasses.replace(opts, onnx=str(onnx_path), output=str(stage / out.name),
                                                      shapes=shapes, batch=None), say)
            staged.append((stage, out.parent))
            engines[role] = {"file": str(Path(relative).with_name(out.name)), "backend": report["backend"],
                             "precision": report["precision"], "profiles": report["profiles"],
                             "build_seconds": report["build_seconds"]}
        manifest["engines"] = {"max_length": max_length, "batch": list(batch), **engines}
        stage = stack.enter_context(atomic.staging_dir(Path(folder) / MANIFEST))
        sidecar.write(stage / MANIFEST, manifest)
        atomic.publish_sets([*staged, (stage, Path(folder))], lock=Path(folder))
    manifest["path"] = str(folder)
    return manifest


def summary(manifest: dict) -> str:
    engines = manifest["engines"]
    lines = [f"built {len(engines) - 2} engines in {manifest['path']} (recorded in {MANIFEST}), max length "
             f"{engines['max_length']}, batch {':'.join(map(str, engines['batch']))}"]
    for role, e in engines.items():
        if isinstance(e, dict):
            lines.append(f"  {role:11s} {e['file']} ({e['backend']['name']} {e['backend']['version']}, {e['precision']}, "
                         f"{e['build_seconds']} s)")
    return "\n".join(lines)
