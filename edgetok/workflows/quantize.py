"""`edgetok quantize`: INT8 Q/DQ for an edgetok ViT export that leaves every reduction step in float.

Only the model's own layers are quantized, chosen by where a node sits in the module tree (the exporter names
nodes by module path): the patch embedding, qkv and proj, the two attention MatMuls, fc1/fc2 and the head. A
reduction method's similarity, ranking and merge nodes sit in the block's own scope, our plugin nodes in their
own domain, so they stay float with no per-method exclusion list; and where a quantized layer's input is also
read by such a node (the attention's softmax, read by Zero-TPrune and GTP), that node is given the float tensor
back, so nothing outside the allow-list reads a dequantized value.

INT8 runs through ONNX Runtime's static quantizer with the settings TensorRT's parser accepts (measured on the
digits reference): QDQ, int8 weights per channel and int8 activations, both symmetric (zero point 0), biases
left in float (an int32 bias DequantizeLinear is refused by the parser). FP8 (E4M3) runs through NVIDIA Model
Optimizer (the ``fp8`` extra) in a child process on a copy — it rewrites its input, writes files beside it and
patches ONNX Runtime's quantizer classes — given the same allow-list; FP8 needs SM 8.9 or newer (Ada, Hopper,
Blackwell, Thor; not Ampere, not Orin).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.version_converter

from edgetok import atomic, sidecar
from edgetok.errors import EdgetokError
from edgetok.onnx.qdq import check_fp8_targets

MODES = ("int8", "fp8")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# The model's own layers, by module path (timm VisionTransformer; Hugging Face ViT).
ALLOW = [re.compile(p) for p in (
    r"^/patch_embed/proj/",
    r"^/blocks/blocks\.\d+/attn/(qkv|proj)/",
    r"^/blocks/blocks\.\d+/(qkv|proj)/",  # the same layers, called by the attention plugin op's wrapper
    r"^/blocks/blocks\.\d+/attn/MatMul(_1)?$",  # q·kᵀ and softmax·v
    r"^/blocks/blocks\.\d+/mlp/fc[12]/",
    r"^/head/",
    r"/embeddings/patch_embeddings/projection/",
    r"/layer\.\d+/attention/attention/(query|key|value)/",
    r"/layer\.\d+/attention/attention/MatMul(_1)?$",
    r"/layer\.\d+/attention/output/dense/",
    r"/layer\.\d+/(intermediate|output)/dense/",
    r"^/classifier/",
)]
SETTINGS = {"quant_format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8", "per_channel": True,
            "calibrate_method": "MinMax", "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True,
                                                            "QuantizeBias": False}}


@dataclass
class QuantizeOptions:
    model: str
    calibrate: str
    mode: str = "int8"
    samples: int = 256
    output: str | None = None
    batch: int = 16
    targets: list[str] | None = None  # the GPUs the model is for (fp8 needs sm89+)


RECIPE_KEYS = {"mode", "calibrate", "samples", "output", "targets"}


def default_output(opts: QuantizeOptions) -> Path:
    source = Path(opts.model)
    return source.with_name(f"{source.stem}_{opts.mode}.onnx")


def stale_reason(opts: QuantizeOptions) -> str | None:
    """Why the quantized file ``opts`` names is not what quantizing ``opts.model`` now would give (None: reuse it)."""
    out = Path(opts.output) if opts.output else default_output(opts)
    if not out.is_file() or not sidecar.sidecar_path(out).is_file():
        return "missing"
    try:
        q = sidecar.read(out).get("quantization") or {}
    except EdgetokError as exc:  # a damaged sidecar, or one describing another file: quantize again
        return str(exc)
    if (q.get("source_onnx") or {}).get("sha256") != sidecar.file_sha256(opts.model):
        return "its float model changed"
    calibration = q.get("calibration") or {}
    if (q.get("mode"), calibration.get("folder"), calibration.get("samples_asked")) != (
            opts.mode, str(Path(opts.calibrate).resolve()), opts.samples):
        return "quantized with other settings"
    return None


def allowed(model: onnx.ModelProto) -> list[str]:
    """The nodes to quantize: the model's own layers (see ALLOW), never a reduction or plugin node."""
    return [n.name for n in model.graph.node
            if n.domain in ("", "ai.onnx") and n.op_type in QUANTIZED_OPS and any(p.search(n.name) for p in ALLOW)]


def float_readers(model: onnx.ModelProto, quantized: set[str]) -> int:
    """Give every node outside the allow-list its float input back where the quantizer put a shared
    QuantizeLinear → DequantizeLinear pair in between; returns how many inputs were rewired."""
    produced = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = produced.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = produced.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    return rewired


def dequantized_readers(model: onnx.ModelProto, quantized: set[str]) -> list[str]:
    """Nodes outside the allow-list that read a DequantizeLinear output (must be none)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.name not in quantized and n.op_type not in ("QuantizeLinear",
            "DequantizeLinear") and any(i in dq_outputs for i in n.input)]


class _Images:
    """ONNX Runtime's calibration reader over preprocessed images, ``batch`` at a time."""

    def __init__(self, dataset, indices: list[int], input_name: str, batch: int):
        self.dataset, self.indices, self.input_name, self.batch = dataset, indices, input_name, batch
        self.at = 0

    def get_next(self):
        if self.at >= len(self.indices):
            return None
        chunk = self.indices[self.at:self.at + self.batch]
        self.at += len(chunk)
        return {self.input_name: np.stack([self.dataset[i][0].numpy() for i in chunk]).astype(np.float32)}

    def rewind(self):
        self.at = 0


def _calibration_set(opts: QuantizeOptions, side: dict):
    from edgetok.images import image_folder

    dataset = image_folder(opts.calibrate, side["preprocessing"], "--calibrate")
    if len(dataset) == 0:
        raise EdgetokError(f"--calibrate {opts.calibrate} holds no images; give an ImageFolder of training-style "
                           "images, e.g. edgetok-out/digits-train from `edgetok data digits --split train`")
    count = min(opts.samples, len(dataset))
    # An even spread over the folder, so every class is seen (ImageFolder lists classes one after another).
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, count)})
    return dataset, indices


def quantize(opts: QuantizeOptions, say: Callable[[str], None] = lambda s: None) -> dict:
    """Write the Q/DQ model and its sidecar; returns the sidecar."""
    if opts.mode not in MODES:
        raise EdgetokError(f"--mode {opts.mode!r} is not supported; choose {', '.join(MODES)}")
    if opts.samples < 1:
        raise EdgetokError(f"--samples {opts.samples} must be >= 1")
    if opts.mode == "fp8":
        check_fp8_targets(opts.targets or [], "--mode fp8")
        import importlib.util

        if importlib.util.find_spec("modelopt") is None:
            raise EdgetokError("--mode fp8 needs NVIDIA Model Optimizer: pip install -e '.[fp8]' (tools/setup.sh installs "
                               "it)")
    source = Path(opts.model)
    if source.suffix != ".onnx" or not source.is_file():
        raise EdgetokError(f"{opts.model} is not an .onnx file; quantize an `edgetok export vit` output")
    if not sidecar.sidecar_path(source).is_file():
        raise EdgetokError(f"{opts.model} has no sidecar {sidecar.sidecar_path(source).name}: quantize needs the "
                           "export's preprocessing; export it with `edgetok export vit`")
    side = sidecar.read(source)
    if side.get("quantization"):
        raise EdgetokError(f"{opts.model} is already quantized ({side['quantization']['mode']}); quantize its float "
                           "export")
    model = onnx.load(str(source))
    plugins = any(n.domain not in ("", "ai.onnx") for n in model.graph.node)
    if plugins and opts.mode == "fp8":
        raise EdgetokError(f"{opts.model} has edgetok plugin nodes, which Model Optimizer's calibration cannot run; "
                           "quantize it with --mode int8, or the standard-op export (without --plugins) to fp8")
    nodes = allowed(model)
    if not nodes:
        raise EdgetokError(f"{opts.model}: none of its nodes is a layer edgetok knows how to quantize (patch "
                           "embedding, qkv/proj, attention MatMuls, fc1/fc2, head)")
    out = Path(opts.output) if opts.output else default_output(opts)
    if out.resolve() == source.resolve():
        raise EdgetokError(f"-o {out} is the model itself; choose another file")
    atomic.check_target(out, "file")  # a device, FIFO or link there: refused before calibrating
    dataset, indices = _calibration_set(opts, side)
    input_name = side["onnx"]["inputs"][0]["name"]
    say(f"calibrating on {len(indices)} images from {opts.calibrate}; quantizing {len(nodes)} layers")
    with atomic.staging_dir(out) as stage, atomic.scratch_dir("quantize") as work:  # both swept if we are killed
        raw, float19 = Path(work) / "qdq.onnx", Path(work) / "float.onnx"
        # Opset 19 first: its DequantizeLinear may output float16, so build-engine --precision fp16 can convert the
        # float rest of the graph (at opset 17 the fp16 conversion leaves a float32 scale feeding float16 math).
        onnx.save(onnx.version_converter.convert_version(model, 19), str(float19))
        if opts.mode == "fp8":
            _modelopt_fp8(float19, raw, dataset, indices, nodes, Path(work))
        else:
            with _plugin_ops(plugins):
                _onnxruntime_int8(float19, raw, dataset, indices, input_name, nodes, opts.batch)
        qmodel = onnx.load(str(raw))
        rewired = float_readers(qmodel, set(nodes))
        left = dequantized_readers(qmodel, set(nodes))
        if left:
            raise EdgetokError(f"internal: {left[0]} still reads a dequantized tensor; please report this model")
        from edgetok.onnx.lint import lint

        findings = lint(qmodel)
        if findings:
            raise EdgetokError(f"the quantized graph has {len(findings)} node(s) TensorRT rejects: {findings[0]}")
        staged = stage / out.name
        onnx.save(qmodel, str(staged))
        from edgetok.plugins.cubins import bundle_path

        if bundle_path(source).is_file():  # the plugin kernels travel with the model, as export leaves them
            shutil.copy(bundle_path(source), bundle_path(staged))
        say("validating the quantized model against the float one in ONNX Runtime")
        validation = _compare(source, staged, dataset, indices[:64], input_name)
        import onnxruntime

        record = dict(side)
        record.update(sidecar.stamp({}))
        record["onnx"] = {**{k: v for k, v in side["onnx"].items() if k != "data_sha256"}, "file": out.name,
                          **sidecar.model_hashes(staged),
                          "opset": next(o.version for o in qmodel.opset_import if o.domain in ("", "ai.onnx"))}
        record["quantization"] = {
            "mode": opts.mode, **_library(opts.mode, onnxruntime.__version__), "targets": opts.targets or None,
            "calibration": {"folder": str(Path(opts.calibrate).resolve()), "images": len(indices),
                            "samples_asked": opts.samples, "folder_images": len(dataset)},
            "quantized_nodes": len(nodes), "float_nodes": _float_layers(model, set(nodes)),
            "float_readers_rewired": rewired,
            "source_onnx": {"file": str(source.resolve()), "sha256": sidecar.file_sha256(source)},
            "validation": validation,
        }
        record["lint"] = {"findings": []}
        sidecar.write(stage / sidecar.sidecar_path(out).name, record)
        atomic.publish(stage, out.parent)  # all or nothing, under the lock eval takes to record accuracy
    record["path"] = str(out)
    return record


@contextlib.contextmanager
def _plugin_ops(needed: bool):
    """ONNX Runtime's calibrator opens its own sessions; for a --plugins export each must know our ops (their
    Python references), so, for the length of the call, every new session registers them."""
    if not needed:
        yield
        return
    import onnxruntime

    from edgetok.plugins import ort_ops

    original = onnxruntime.InferenceSession

    class WithEdgetokOps(original):
        def __init__(self, path_or_bytes, sess_options=None, *args, **kwargs):
            sess_options = sess_options or onnxruntime.SessionOptions()
            ort_ops.register(sess_options)
            super().__init__(path_or_bytes, sess_options, *args, **kwargs)

    onnxruntime.InferenceSession = WithEdgetokOps
    try:
        yield
    finally:
        onnxruntime.InferenceSession = original


def _onnxruntime_int8(source: Path, raw: Path, dataset, indices, input_name: str, nodes: list[str], batch: int):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's pre-processing advice, printed on every call
    try:
        quantize_static(str(source), str(raw), _Images(dataset, indices, input_name, batch),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=dict(SETTINGS["extra_options"]))
    finally:
        root.setLevel(level)


def _modelopt_fp8(source: Path, raw: Path, dataset, indices, nodes: list[str], work: Path) -> None:
    """Model Optimizer's FP8 quantizer in a child process, on a copy in ``work``, calibrating on the CPU."""
    import sys

    copy, calibration = work / "fp8_input.onnx", work / "calibration.npy"
    shutil.copy(source, copy)
    np.save(calibration, np.stack([dataset[i][0].numpy() for i in indices]).astype(np.float32))
    command = [sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", str(copy), "--quantize_mode", "fp8",
               "--calibration_data_path", str(calibration), "--calibration_eps", "cpu", "--output_path", str(raw),
               "--high_precision_dtype", "fp32", "--log_level", "ERROR", "--nodes_to_quantize", *nodes]
    done = run_child(command, work)
    if done.returncode != 0 or not raw.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:240]
        raise EdgetokError(f"Model Optimizer's FP8 quantization failed: {tail}")


# The child's first program, which then execs the real command: Linux will send it SIGKILL when its parent
# dies, even by SIGKILL (prctl PR_SET_PDEATHSIG, kept across exec), and a parent gone already means exit at
# once. A shim rather than subprocess's preexec_fn, which is unsafe once torch or ONNX Runtime run threads.
_DIE_WITH_PARENT = ("import ctypes, os, sys\n"
                    "if sys.platform.startswith('linux'):\n"
                    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)\n"
                    "if os.getppid() != int(sys.argv[1]):\n"
                    "    os._exit(137)\n"
                    "os.execv(sys.argv[2], sys.argv[2:])\n")


def run_child(command: list[str], work: Path):
    """Run ``command`` (its first item an executable's path) in ``work`` as a child that dies with edgetok, its
    own temporaries in ``work`` too (TMPDIR): a ``kill -9`` of quantize leaves no process behind, and only the
    scratch folder, which the next run sweeps."""
    import os
    import subprocess
    import sys

    shim = [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(os.getpid())]
    return subprocess.run([*shim, *command], cwd=work, env={**os.environ, "TMPDIR": str(work)},
                          capture_output=True, text=True)


def _float_layers(model: onnx.ModelProto, quantized: set[str]) -> list[str]:
    """The Conv/MatMul/Gemm nodes left in float: the reduction methods' own (similarity, merge) and plugins."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in quantized]


def _compare(reference: Path, quantized: Path, dataset, indices: list[int], input_name: str) -> dict:
    from edgetok.onnx.validate import ort_session

    x = np.stack([dataset[i][0].numpy() for i in indices]).astype(np.float32)
    a = ort_session(str(reference)).run(None, {input_name: x})[0].astype(np.float64)
    b = ort_session(str(quantized)).run(None, {input_name: x})[0].astype(np.float64)
    cosine = float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return {"backend": "onnxruntime-cpu", "images": len(indices), "cosine": cosine,
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()) if a.ndim == 2 else None}


def _library(mode: str, ort_version: str) -> dict:
    if mode == "int8":
        return {"library": f"onnxruntime {ort_version}", "settings": SETTINGS}
    from importlib.metadata import version

    return {"library": f"nvidia-modelopt {version('nvidia-modelopt')}",
            "settings": {"quantize_mode": "fp8", "calibration_eps": "cpu", "high_precision_dtype": "fp32",
                         "nodes_to_quantize": "the allow-list", "requires": "SM 8.9+"}}


def summary(record: dict) -> str:
    q = record["quantization"]
    v = q["validation"]
    agreement = "" if v["top1_agreement"] is None else f", top-1 agreement {v['top1_agreement']:.1%}"
    return "\n".join([
        f"wrote {record['path']} (+ {sidecar.sidecar_path(record['path']).name})",
        f"  mode       {q['mode']} Q/DQ ({q['library']}"
        + (": symmetric, per-channel weights, float biases)" if q["mode"] == "int8" else "; for SM 8.9+ GPUs)"),
        f"  layers     {q['quantized_nodes']} quantized; {len(q['float_nodes'])} MatMul/Gemm/Conv left in float "
        "(reduction steps)",
        f"  calibrated on {q['calibration']['images']} images from {q['calibration']['folder']}",
        f"  validated  against the float model on {v['images']} of them: cosine {v['cosine']:.4f}{agreement}",
    ])
