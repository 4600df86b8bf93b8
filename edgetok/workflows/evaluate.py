"""`edgetok eval`: top-1/top-5 on an ImageFolder with the model's own preprocessing, and agreement with a
reference model (top-1 agreement, mean KL of the predicted distributions)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgetok import sidecar
from edgetok.errors import EdgetokError
from edgetok.images import image_folder
from edgetok.plugins.token_counts import attention_kept_outputs, per_image, sizes_outputs
from edgetok.runtime.runners import ENGINE_SUFFIXES


def export_record(model: str) -> dict:
    """What eval needs from an exported file's export (preprocessing, model and head), read once: the
    export sidecar for an ONNX file, the copy in the build report for an engine."""
    path = Path(model)
    if path.suffix == ".onnx":
        return sidecar.read(model)
    if path.suffix in ENGINE_SUFFIXES:
        report = Path(f"{model}.build.json")
        export = (json.loads(report.read_text()).get("export") or {}) if report.is_file() else {}
        if not export.get("preprocessing"):
            raise EdgetokError(f"{model} has no build report with the export's preprocessing; rebuild it with "
                               "`edgetok build-engine` from an edgetok export")
        return export
    raise EdgetokError(f"{model} is not an exported file; timm names get their data config from timm")


def require_class_logits(model: str, outputs: list[str], head: str | None = None) -> None:
    """eval compares class scores with labels; an encoder's features are not scores."""
    if outputs and outputs[0] == "logits":
        return
    what = head or f"its outputs are {', '.join(outputs) or 'none'}"
    raise EdgetokError(
        f"{model} has no class logits ({what}); eval needs a classifier: export one with a head "
        "(a timm model with num_classes > 0, or a Hugging Face folder whose config.json names "
        "ViTForImageClassification in architectures or sets num_labels)"
    )


class Predictor:
    """Logits for a batch of preprocessed images, from ONNX Runtime, PyTorch or an engine."""

    def __init__(self, model: str, batch: int, checkpoint: str | None = None):
        path = Path(model)
        if checkpoint and path.suffix in (".onnx", *ENGINE_SUFFIXES):
            raise EdgetokError("--checkpoint applies to a timm model name, not to an exported file")
        self.kind = "onnx" if path.suffix == ".onnx" else "engine" if path.suffix in ENGINE_SUFFIXES else "torch"
        if self.kind == "onnx":
            from edgetok.onnx.validate import ort_session

            if not path.is_file():
                raise EdgetokError(f"{model} does not exist")
            self.sha256 = sidecar.cached_sha256(path)  # once per file version: the sidecar check reuses it
            import onnx

            graph = onnx.load(model, load_external_data=False)  # read once for both lookups
            self.count_outputs = sizes_outputs(graph)  # data-dependent steps: count what each image keeps
            self.kept_outputs = attention_kept_outputs(graph)  # block-sparse attention: the block pairs it computed
            self.tokens_kept = {block: [] for block in self.count_outputs}
            self.attention_kept = {block: [] for block in self.kept_outputs}
            self.session = ort_session(model, extra_outputs=(*self.count_outputs.values(), *self.kept_outputs.values()))
            if sidecar.cached_sha256(path) != self.sha256:  # a new version of the file is hashed afresh
                raise EdgetokError(f"{model} changed while it was being loaded; run eval again when its export is done")
            self.input = self.session.get_inputs()[0].name
            record = export_record(model)
            self.preprocessing = record["preprocessing"]
            require_class_logits(model, [o.name for o in self.session.get_outputs()], record["model"].get("head"))
        elif self.kind == "engine":
            from edgetok.runtime.runners import TensorRTEngineRunner, engine_backend

            record = export_record(model)
            self.preprocessing = record["preprocessing"]
            exported = record.get("model") or {}
            require_class_logits(model, ["logits"] if exported.get("num_classes") else [], exported.get("head"))
            self.runner = TensorRTEngineRunner(model, engine_backend(model).replace("-", "_"), batch, False, True)
            self.sha256 = sidecar.file_sha256(model)
            self.tokens_kept = {block: [] for block in self.runner.count_outputs}
            self.kept_outputs = self.runner.kept_outputs
            self.attention_kept = {block: [] for block in self.kept_outputs}
        else:
            from edgetok.vit.loading import load_vit

            vit = load_vit(model, checkpoint)
            require_class_logits(model, vit.output_names, vit.head)
            self.module, self.preprocessing = vit.module, vit.preprocessing

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.kind == "onnx":
            logits, *extra = self.session.run(None, {self.input: images})[:1 + len(self.count_outputs) + len(self.kept_outputs)]
            for block, size in zip(self.count_outputs, extra):
                self.tokens_kept[block] += per_image(size)
            for block, kept in zip(self.kept_outputs, extra[len(self.count_outputs):]):
                self.attention_kept[block] += kept.tolist()
            return logits
        if self.kind == "engine":
            outputs = self.runner.run({self.runner.inputs[0]: images})
            for block, name in self.runner.count_outputs.items():
                self.tokens_kept[block] += [int(n) for n in outputs.pop(name)]
            for block, name in self.kept_outputs.items():
                self.attention_kept[block] += outputs.pop(name).tolist()
            return next(iter(outputs.values()))
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(images)).numpy()


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Top-1 agreement, and mean KL(reference ‖ model) of the softmax distributions, in nats."""
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return {"top1_agreement": float((logits.argmax(1) == reference.argmax(1)).mean()), "mean_kl": float(kl.mean())}


@dataclass
class EvalOptions:
    model: str
    data: str
    batch: int = 64
    reference: str | None = None
    write_sidecar: bool = True
    checkpoint: str | None = None  # weights for a timm name


def evaluate(opts: EvalOptions, progress: Callable[[int, int], None] | None = None) -> dict:
    import torch

    if opts.batch < 1:
        raise EdgetokError(f"--batch {opts.batch} must be >= 1")
    predictor = Predictor(opts.model, opts.batch, opts.checkpoint)
    dataset = image_folder(opts.data, predictor.preprocessing)
    if len(dataset) == 0:
        raise EdgetokError(f"--data {opts.data} has class folders but no images")
    reference = Predictor(opts.reference, opts.batch) if opts.reference else None
    logits, ref_logits, labels = [], [], []
    done = 0
    for start in range(0, len(dataset), opts.batch):
        items = [dataset[i] for i in range(start, min(start + opts.batch, len(dataset)))]  # a broken image: one line
        images = torch.stack([x for x, _ in items]).numpy()
        labels += [y for _, y in items]
        logits.append(predictor(images))
        if reference:
            ref_logits.append(reference(images))
        done += len(items)
        if progress:
            progress(done, len(dataset))
    logits = np.concatenate(logits)
    labels = np.array(labels)
    if logits.shape[1] < len(dataset.classes):
        raise EdgetokError(f"the model has {logits.shape[1]} outputs but --data has {len(dataset.classes)} classes")
    top5 = np.argsort(-logits, axis=1)[:, :5]
    result = {
        "dataset": str(Path(opts.data).resolve()),
        "samples": int(len(labels)),
        "classes": len(dataset.classes),
        **({"skipped": len(dataset.skipped)} if dataset.skipped else {}),  # links to images already counted, ...
        "top1": float((logits.argmax(1) == labels).mean()),
        "top5": float((top5 == labels[:, None]).any(axis=1).mean()) if logits.shape[1] >= 5 else None,
    }
    if reference:  # named by path and hash: a profile table showing this agreement later says what it is against
        result["reference"] = {"model": opts.reference, "sha256": getattr(reference, "sha256", None),
                               **agreement(logits, np.concatenate(ref_logits))}
    if getattr(predictor, "tokens_kept", None):  # data-dependent reduction: what the images kept, per block
        result["tokens_kept"] = {str(block): {"mean": round(float(np.mean(v)), 2), "min": int(min(v)), "max": int(max(v))}
                                 for block, v in sorted(predictor.tokens_kept.items())}
    if getattr(predictor, "attention_kept", None):  # block-sparse attention: the share of block pairs computed
        result["attention_kept"] = {str(block): {"mean": round(float(np.mean(v)), 4), "min": round(float(min(v)), 4),
                                                 "max": round(float(max(v)), 4)}
                                    for block, v in sorted(predictor.attention_kept.items())}
    gmacs = _gmacs_per_image(opts.model, predictor, len(labels)) if predictor.kind != "torch" else None
    if gmacs:
        result["gmacs"] = {"mean": round(float(np.mean(gmacs)), 4), "min": round(min(gmacs), 4),
                           "max": round(max(gmacs), 4)}
    if opts.write_sidecar and predictor.kind == "onnx":
        why = record_accuracy(opts.model, predictor.sha256, result)
        if why:
            result["not_recorded"] = why
    return result


def _gmacs_per_image(model: str, predictor, images: int) -> list[float] | None:
    """Each image's GMACs from what it kept (tokens, attention blocks), for models where that varies."""
    tokens, kept = getattr(predictor, "tokens_kept", {}), getattr(predictor, "attention_kept", {})
    if not tokens and not kept:
        return None
    from edgetok.vit.flops import record_gmacs

    return record_gmacs(export_record(model), tokens, kept, images)


def record_accuracy(model: str, evaluated_sha256: str, result: dict) -> str | None:
    """Add ``result`` to the ONNX's sidecar, under the sidecar lock, and only if both the file and its
    sidecar are still the ones evaluated (an export may have replaced them meanwhile). Returns why it
    was not recorded, or None."""
    def change(side: dict) -> str | None:
        if not Path(model).is_file() or sidecar.file_sha256(model) != evaluated_sha256:
            return f"{model} was replaced during the evaluation; accuracy not recorded"
        recorded = (side.get("onnx") or {}).get("sha256")
        if recorded is not None and recorded != evaluated_sha256:
            return f"{sidecar.sidecar_path(model).name} belongs to another ONNX; accuracy not recorded"
        side["accuracy"] = result
        return None

    return sidecar.update(model, change)
