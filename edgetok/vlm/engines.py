"""`edgetok build-engine DIR` for an exported VLM folder (`edgetok export vlm`): its vision tower (vision.onnx, and
vision_dense.onnx when the method reduces), its embedding table and its language decoders (decoder/model.onnx and
the tree variant) as engines, recorded in the folder's manifest under ``engines``; and those engines opened again
for `profile DIR --vlm --backend tensorrt` (a CUDA GPU).

The decoders get the KV-cache profiles `build-engine PAIR` gives a pair's target (edgetok.llm.engines), with the
token input being ``inputs_embeds`` [batch, query, hidden] instead of ``input_ids``: the decoder's OPT query is 1
(a decoding step; a VLM has no draft, so no k + 1 verify call), the tree variant's a lookahead tree. The
embedding engine is called with the tokens of every decoder call, so it takes the decoder's query range. The
vision engines take one batch of images at the manifest's image size; edgetok plugin nodes in them (a method's
plugin steps) are built the way `build-engine MODEL.onnx` builds them (edgetok.engine.build).

Everything is published as one set under the folder's lock (the one `export vlm` publishes it under), the
manifest last, as for pairs: a failed build leaves the old engines and manifest whole. The engines are not
added to the manifest's ``files`` (the export's SHA-256 list): each engine's ``.build.json`` records its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from edgetok import atomic, sidecar
from edgetok.engine.options import BuildOptions, parse_batch, parse_shapes
from edgetok.errors import EdgetokError
from edgetok.llm.engines import DEFAULT_MAX_LENGTH, decoder_shapes
from edgetok.llm.pair import inside
from edgetok.llm.trt_decoder import TrtDecoder
from edgetok.vlm.export import MANIFEST, read_manifest
from edgetok.vlm.prompt import splice
from edgetok.vlm.runtime import Vlm

# role in manifest["engines"] -> what it is, for messages and the summary
ROLES = {"vision": "vision tower", "vision_dense": "unreduced vision tower", "embedding": "embedding table",
         "decoder": "language decoder", "decoder_tree": "tree-verify decoder"}


def _spec(name: str, low: list[int], opt: list[int], high: list[int]) -> str:
    return f"{name}:" + ":".join("x".join(map(str, dims)) for dims in (low, opt, high))


def _vision_input(path: Path) -> str:
    """The vision graph's image input (``pixel_values`` as exported; read, not assumed)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in weights]
    if len(names) != 1:
        raise EdgetokError(f"{path.name} takes {len(names)} inputs ({', '.join(names)}), not one image batch: the "
                           "folder's vision tower is not what `edgetok export vlm` writes; export the VLM again")
    return names[0]


def vision_shapes(path: Path, image_size: int, batch: tuple[int, int, int]) -> list[str]:
    return [_spec(_vision_input(path), *([b, 3, image_size, image_size] for b in batch))]


def embedding_shapes(entry: dict, max_length: int, batch: tuple[int, int, int]) -> list[str]:
    """input_ids [batch, query]: the query range of the decoder calls it embeds, OPT one token."""
    return decoder_shapes(entry, max_length, 1, batch)[:1]


def embeds_decoder_shapes(entry: dict, max_length: int, query_opt: int, batch: tuple[int, int, int],
                          tree: bool = False) -> list[str]:
    """A pair target's profiles (edgetok.llm.engines.decoder_shapes) with ``inputs_embeds`` [batch, query, hidden]
    over the same batch and query range in place of ``input_ids``."""
    shapes = decoder_shapes(entry, max_length, query_opt, batch, tree)
    ids = parse_shapes(shapes[0])
    if ids.name != "input_ids":
        raise AssertionError(f"decoder_shapes put {ids.name} first")
    hidden = entry["hidden_size"]
    return [_spec("inputs_embeds", [*ids.min, hidden], [*ids.opt, hidden], [*ids.max, hidden]), *shapes[1:]]


def _graphs(manifest: dict, max_length: int, batch: tuple[int, int, int], tree_tokens: int, folder: str):
    """(role, ONNX path relative to the folder, shapes) of every engine to build."""
    vision, decoder = manifest["vision"], manifest["decoder"]
    found = [("vision", vision["file"])] + ([("vision_dense", vision["dense_file"])] if vision.get("dense_file") else [])
    graphs = [(role, relative, vision_shapes(inside(folder, relative, f"{MANIFEST} {role} file"),
                                             vision["image_size"], batch)) for role, relative in found]
    graphs.append(("embedding", manifest["embedding"]["file"], embedding_shapes(decoder, max_length, batch)))
    graphs.append(("decoder", decoder["file"], embeds_decoder_shapes(decoder, max_length, 1, batch)))
    graphs.append(("decoder_tree", decoder["tree"]["file"],
                   embeds_decoder_shapes(decoder, max_length, tree_tokens + 1, batch, tree=True)))
    return graphs


def check_request(opts: BuildOptions, tree_tokens: int) -> None:
    """What `build-engine DIR` refuses before reading any model."""
    if opts.output or opts.shapes:
        raise EdgetokError("build-engine DIR (a VLM folder) names its engines and shapes from the folder's manifest; "
                           "drop -o/--shapes")
    if opts.precision != "fp32":
        raise EdgetokError(f"--precision {opts.precision}: build-engine on a VLM folder builds fp32 engines only (the "
                           "fp16 conversion of its decoders is a graph ONNX Runtime will not load); drop --precision")
    if tree_tokens < 1:
        raise EdgetokError(f"--tokens {tree_tokens} must be >= 1 (the lookahead tree the tree decoder's profile "
                           "favours)")


def build_vlm(folder: str, opts: BuildOptions, tree_tokens: int = 16,
              say: Callable[[str], None] = lambda s: None) -> dict:
    """Build every graph of the VLM folder ``folder`` with ``opts``' backend; returns the manifest with its
    ``engines`` (and ``path``)."""
    from edgetok.engine.build import build_engine

    check_request(opts, tree_tokens)
    manifest = read_manifest(folder)  # fields, paths inside the folder, every file's SHA-256
    max_length = manifest.get("max_length") or DEFAULT_MAX_LENGTH
    batch = parse_batch(opts.batch or "1")
    engines = {}
    with contextlib.ExitStack() as stack:
        staged = []
        for role, relative, shapes in _graphs(manifest, max_length, batch, tree_tokens, folder):
            onnx_path = inside(folder, relative, f"{MANIFEST} {role} file")
            out = onnx_path.with_name(f"{onnx_path.stem}.{opts.precision}.engine")
            stage = stack.enter_context(atomic.staging_dir(out))
            say(f"building the {ROLES[role]} ({relative})")
            report = build_engine(dataclasses.replace(opts, onnx=str(onnx_path), output=str(stage / out.name),
                                                      shapes=shapes, batch=None), say)
            staged.append((stage, out.parent))
            plugins = report.get("edgetok_plugins")
            engines[role] = {"file": str(Path(relative).with_name(out.name)), "backend": report["backend"],
                             "precision": report["precision"], "profiles": report["profiles"],
                             "build_seconds": report["build_seconds"],
                             "plugins": [p["name"] for p in plugins["plugins"]] if plugins else []}
        manifest["engines"] = {"max_length": max_length, "batch": list(batch), **engines}
        stage = stack.enter_context(atomic.staging_dir(Path(folder) / MANIFEST))
        sidecar.write(stage / MANIFEST, manifest)
        atomic.publish_sets([*staged, (stage, Path(folder))], lock=Path(folder))
    manifest["path"] = str(folder)
    return manifest


def summary(manifest: dict) -> str:
    engines = manifest["engines"]
    built = {role: e for role, e in engines.items() if isinstance(e, dict)}
    lines = [f"built {len(built)} engines in {manifest['path']} (recorded in {MANIFEST}), max length "
             f"{engines['max_length']}, batch {':'.join(map(str, engines['batch']))}"]
    for role, e in built.items():
        plugins = f", plugins {', '.join(e['plugins'])}" if e.get("plugins") else ""
        lines.append(f"  {role:12s} {e['file']} ({e['backend']['name']} {e['backend']['version']}, {e['precision']}, "
                     f"{e['build_seconds']} s{plugins})")
    return "\n".join(lines)


# --- running them (a CUDA GPU) --------------------------------------------------------------------------------------

def engine_path(folder: str, manifest: dict, role: str) -> tuple[Path, str]:
    """The engine of ``role`` and the module that built it (tensorrt or tensorrt_rtx); one line when missing."""
    engines = manifest.get("engines")
    if not isinstance(engines, dict) or not isinstance(engines.get(role), dict):
        what = f"no {ROLES.get(role, role)} engine" if isinstance(engines, dict) else "no engines"
        raise EdgetokError(f"{folder} has {what}; build them with `edgetok build-engine {folder}`")
    built = engines[role]
    return inside(folder, built.get("file"), f"{MANIFEST} engines.{role}.file"), built["backend"]["name"].replace("-", "_")


@dataclasses.dataclass
class _Input:
    name: str


class EngineSession:
    """A vision or embedding engine behind the part of ONNX Runtime's session interface the runtime uses
    (``get_inputs``, ``run(None, feed)`` -> the graph's outputs in order), so edgetok.vlm.runtime's code runs it
    unchanged. The token-count outputs build-engine adds to plugin graphs are left out."""

    def __init__(self, path: Path, module: str):
        from edgetok.runtime.runners import TensorRTEngineRunner

        self.runner = TensorRTEngineRunner(str(path), module, 1, cuda_graphs=False, data_transfers=True)
        added = {*self.runner.count_outputs.values(), *self.runner.kept_outputs.values()}
        self.outputs = [n for n in self.runner.io.outputs if n not in added]

    def get_inputs(self) -> list[_Input]:
        return [_Input(name) for name in self.runner.inputs]

    def run(self, names, feed: dict) -> list[np.ndarray]:
        out = self.runner.run(feed)
        return [out[n] for n in (names or self.outputs)]


class EngineDecoder(TrtDecoder):
    """The decoder engine fed embeddings, spliced as edgetok.vlm.runtime.VlmDecoder splices them."""

    def __init__(self, path: Path, entry: dict, library: str, embedding: EngineSession):
        super().__init__(path, entry, library)
        self.embedding = embedding
        self.rows_at = np.zeros(0, np.int64)
        self.visual = np.zeros((0, entry["hidden_size"]), np.float32)

    def show(self, rows_at: np.ndarray, visual: np.ndarray) -> None:
        self.rows_at, self.visual = rows_at, visual

    def _tokens_in(self, tokens: list[int], positions: np.ndarray) -> dict:
        embeds = self.embedding.run(None, {"input_ids": np.array([tokens], np.int64)})[0]
        return {"inputs_embeds": splice(embeds, positions, self.rows_at, self.visual)}


class EngineVlm(Vlm):
    """The folder's engines in the places of Vlm's sessions (``see`` and the decoder's calls unchanged). Every
    engine the mode needs is checked to be recorded before the GPU is asked for; TrtDecoder refuses a machine
    without CUDA in one line."""

    def __init__(self, folder: str, mode: str = "target", manifest: dict | None = None):
        self.folder = folder
        self.manifest = manifest or read_manifest(folder)
        decoder = "decoder_tree" if mode == "lookahead" else "decoder"
        paths = {role: engine_path(folder, self.manifest, role) for role in ("vision", "embedding", decoder)}
        self.embedding = EngineSession(*paths["embedding"])
        self.vision = EngineSession(*paths["vision"])
        path, module = paths[decoder]
        self.decoder = EngineDecoder(path, self.manifest["decoder"], module, self.embedding)

    def dense_vision(self) -> EngineSession:
        return EngineSession(*engine_path(self.folder, self.manifest, "vision_dense"))
