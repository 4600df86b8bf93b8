"""`edgetok compare`: every fixed-count method on one model at matched GMACs, through the same path as a user's
own run — export, eval against the dense export (top-1, top-1 agreement, KL), profile interleaved — in one
table and one plot.

Each method's setting is the one whose planned GMACs come closest to each target (a fraction of the dense
model's): ToMe, PiToMe and Zero-TPrune by r, GTP by P (tokens per block, constant), EViT by its keep rate (0.01 steps).
ATS and dtome keep a number of tokens that follows the image, so they cannot be matched in advance; run them
with `edgetok eval`, which reports their GMACs per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgetok.errors import EdgetokError


def __getattr__(name: str):
    if name == "METHODS":  # every registered method with a knob (edgetok.vit.methods), entry points included
        from edgetok.vit import methods

        return methods.comparable()
    raise AttributeError(name)


@dataclass
class CompareOptions:
    model: str
    data: str
    checkpoint: str | None = None
    methods: list[str] = field(default_factory=lambda: list(__getattr__("METHODS")))
    fractions: list[float] = field(default_factory=lambda: [0.65, 0.5])  # of dense GMACs: DeiT-S 4.6 -> 3.0, 2.3
    batch: int = 8
    duration_s: float = 2.0
    rounds: int = 3
    output_dir: str = "edgetok-out/compare"


def _settings(method: str, depth: int) -> list[dict]:
    """Every setting of a method's one knob, constant across blocks (its declaration's ``knob``)."""
    from edgetok.vit import methods

    return methods.get(method).knob(depth)


def match(vit, method: str, target: float) -> tuple[dict, float] | None:
    """The setting of ``method`` whose planned GMACs are closest to ``target`` (None if none fits the model)."""
    from edgetok.vit.flops import vit_macs
    from edgetok.vit.methods import make_method
    from edgetok.vit.reduction import plan

    best = None
    for setting in _settings(method, vit.depth):
        try:
            reduced = plan(vit, make_method(method, vit.depth, **setting))
        except EdgetokError:  # more than the model can reduce
            continue
        gmacs = vit_macs(vit, reduced.tokens) / 1e9
        if best is None or abs(gmacs - target) < abs(best[1] - target):
            best = (setting, gmacs)
    return best


def _label(method: str, setting: dict) -> str:
    from edgetok.vit import methods

    return methods.setting_label(method, setting)


def compare(opts: CompareOptions, say: Callable[[str], None] = lambda s: None) -> dict:
    from edgetok.profile.profiler import ProfileOptions, profile, write_reports
    from edgetok.workflows.evaluate import EvalOptions, evaluate
    from edgetok.vit.export import ViTExportOptions, export_vit
    from edgetok.vit.flops import vit_macs
    from edgetok.vit.loading import load_vit
    from edgetok.vit.reduction import plan

    METHODS = __getattr__("METHODS")
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise EdgetokError(f"--methods {','.join(unknown)}: compare matches {', '.join(METHODS)} (ATS and dtome keep a "
                           "count that follows the image: evaluate them with edgetok eval)")
    bad = [f for f in opts.fractions if not 0 < f < 1]
    if bad:
        raise EdgetokError(f"--fractions {bad[0]} must be in (0, 1): a share of the dense model's GMACs, e.g. 0.65")
    if not Path(opts.data).is_dir():
        raise EdgetokError(f"--data {opts.data} is not a folder; give an image folder (one subfolder per class)")
    vit = load_vit(opts.model, opts.checkpoint)
    dense_gmacs = vit_macs(vit, plan(vit, None).tokens) / 1e9
    out = Path(opts.output_dir)
    variants = [("dense", {"method": "none"})]
    for fraction in opts.fractions:
        for method in opts.methods:
            found = match(vit, method, fraction * dense_gmacs)
            if found is None:
                say(f"{method}: no setting fits {opts.model}; left out")
                continue
            setting, gmacs = found
            variants.append((f"{_label(method, setting)} ({gmacs / dense_gmacs:.0%})", {"method": method, **setting}))
    models, labels = [], []
    for label, args in variants:
        path = out / "models" / f"{label.split(' (')[0].replace(' ', '_').replace('=', '')}.onnx"
        if str(path) in models:  # two targets matched the same setting
            continue
        say(f"exporting {label}")
        export_vit(ViTExportOptions(model=opts.model, checkpoint=opts.checkpoint, output=str(path), **args))
        models.append(str(path))
        labels.append(label)
    for path, label in zip(models, labels):
        say(f"evaluating {label}")
        evaluate(EvalOptions(model=path, data=opts.data, batch=64, reference=None if path == models[0] else models[0]))
    say(f"profiling {len(models)} models, interleaved")
    result = profile(ProfileOptions(models=models, labels=labels, batch=opts.batch, duration_s=opts.duration_s,
                                    rounds=opts.rounds))
    result["compare"] = {"model": opts.model, "data": str(Path(opts.data).resolve()), "fractions": opts.fractions,
                         "dense_gmacs": round(dense_gmacs, 4)}
    result["report_files"] = [str(p) for p in write_reports(result, out)]
    return result
