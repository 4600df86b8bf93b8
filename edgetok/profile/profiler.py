"""`edgetok profile`: open every model's runner first (bad input fails before any timing), warm each
up, time them (optionally in interleaved rounds), and assemble one report with the comparison."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgetok import atomic, sidecar
from edgetok.errors import EdgetokError
from edgetok.profile import compare
from edgetok.profile.environment import environment
from edgetok.profile.measure import Measurement, timed_round, warm_up
from edgetok.profile.memory import check_batch_fits
from edgetok.runtime.runners import ENGINE_SUFFIXES, load_inputs, open_runner, random_inputs

DEVICES = ("cpu", "cuda", "jetson")


@dataclass
class ProfileOptions:
    models: list[str]
    backend: str = "auto"
    device: str = "cpu"
    ep: str | None = None
    batch: int | None = None
    inputs: str | None = None
    warmup_ms: float = 200.0
    duration_s: float = 3.0
    iterations: int = 10
    rounds: int = 1
    threads: int = 0
    cuda_graphs: bool | None = None
    data_transfers: bool | None = None
    seed: int = 0
    tegrastats_interval_ms: int = 100
    labels: list[str] = field(default_factory=list)


def _check(opts: ProfileOptions) -> None:
    if not opts.models:
        raise EdgetokError("give at least one model to profile (.onnx, engine, or a timm name with --backend torch)")
    if opts.device not in DEVICES:
        raise EdgetokError(f"--device {opts.device!r} is unknown; choose {', '.join(DEVICES)}")
    if not (0 <= opts.duration_s < math.inf and 0 <= opts.warmup_ms < math.inf):
        raise EdgetokError(f"--duration {opts.duration_s} and --warmup {opts.warmup_ms} must be finite and >= 0")
    if opts.iterations < 1 or opts.rounds < 1 or opts.threads < 0:
        raise EdgetokError(f"--iterations {opts.iterations} and --rounds {opts.rounds} must be >= 1, "
                           f"--threads {opts.threads} >= 0 (0: all cores)")
    if opts.batch is not None and opts.batch < 1:
        raise EdgetokError(f"--batch {opts.batch} must be >= 1")
    if opts.device == "jetson":
        from edgetok.profile import jetson

        if not jetson.is_jetson():
            raise EdgetokError(
                "--device jetson: this machine is not a Jetson (no /etc/nv_tegra_release); "
                "run on the Jetson or use --host user@jetson"
            )


def _precision(model: str) -> str:
    """fp32/fp16 as built, with the quantization mode of a Q/DQ model in front (int8+fp16: int8 layers, fp16 rest)."""
    path = Path(model)
    quantized = (_export_sidecar(model).get("quantization") or {}).get("mode")
    built = "fp32"
    if path.suffix in ENGINE_SUFFIXES and Path(f"{model}.build.json").is_file():
        built = json.loads(Path(f"{model}.build.json").read_text())["precision"]
    if quantized:
        return quantized if built == "fp32" else f"{quantized}+{built}"
    return built


def _export_sidecar(model: str) -> dict:
    """The export's record: the ONNX sidecar, or the copy an engine's build report carries."""
    path = Path(model)
    if path.suffix in ENGINE_SUFFIXES:
        report = Path(f"{model}.build.json")
        return (json.loads(report.read_text()).get("export") or {}) if report.is_file() else {}
    if path.suffix == ".onnx" and sidecar.sidecar_path(model).is_file():
        return sidecar.read(model)
    return {}


def _sidecar_facts(model: str) -> dict:
    side = _export_sidecar(model)
    return {k: side.get(k) for k in ("flops", "reduction", "accuracy")}


def image_inputs(folder: str, model: str, specs: dict, batch: int) -> tuple[dict[str, np.ndarray], int]:
    """The first ``batch`` images of an ImageFolder, preprocessed as the model's export records: with
    data-dependent reduction the latency depends on the images, so profile real ones."""
    from edgetok.images import image_folder
    from edgetok.workflows.evaluate import export_record

    if len(specs) != 1:
        raise EdgetokError(f"--inputs {folder}: an image folder feeds a one-input model; {model} has {len(specs)} inputs")
    dataset = image_folder(folder, export_record(model)["preprocessing"], "--inputs")
    if len(dataset) < batch:
        raise EdgetokError(f"--inputs {folder} has {len(dataset)} images, fewer than --batch {batch}")
    images = np.stack([dataset[i][0].numpy() for i in range(batch)])
    return {next(iter(specs)): images.astype(next(iter(specs.values()))[1])}, batch


def tokens_kept(model: str, feed: dict, runner) -> dict:
    """What each image keeps for these inputs, from one run: ``tokens_kept`` after each data-dependent block,
    ``attention_kept`` (the share of block pairs) in each block-sparse attention. An ONNX model runs in ONNX
    Runtime with the plugin nodes' outputs exposed, an engine gives the outputs build-engine added; {} for
    models without such steps."""
    from edgetok.plugins.token_counts import attention_kept_outputs, per_image, sizes_outputs

    counts, fractions = getattr(runner, "count_outputs", None) or {}, getattr(runner, "kept_outputs", None) or {}
    if counts or fractions:  # an engine
        outputs = runner.run(feed)
        found = {"tokens_kept": [{"block": b, "per_image": [int(n) for n in outputs[name]]} for b, name in counts.items()],
                 "attention_kept": [{"block": b, "per_image": [round(float(f), 4) for f in outputs[name]]}
                                    for b, name in fractions.items()]}
        return {k: v for k, v in found.items() if v}
    if Path(model).suffix != ".onnx":
        return {}
    import onnx

    from edgetok.onnx.validate import ort_session

    graph = onnx.load(model, load_external_data=False)
    sizes, kept = sizes_outputs(graph), attention_kept_outputs(graph)
    if not sizes and not kept:
        return {}
    extra = ort_session(model, extra_outputs=(*sizes.values(), *kept.values())).run(None, feed)[-len(sizes) - len(kept):]
    found = {"tokens_kept": [{"block": b, "per_image": per_image(x)} for b, x in zip(sizes, extra)],
             "attention_kept": [{"block": b, "per_image": [round(float(f), 4) for f in x]}
                                for b, x in zip(kept, extra[len(sizes):])]}
    return {k: v for k, v in found.items() if v}


def _kept_gmacs(model: str, kept: dict, batch: int) -> list[float] | None:
    if not kept:
        return None
    from edgetok.workflows.evaluate import export_record
    from edgetok.vit.flops import record_gmacs

    tokens = {k["block"]: k["per_image"] for k in kept.get("tokens_kept", [])}
    pairs = {k["block"]: k["per_image"] for k in kept.get("attention_kept", [])}
    return record_gmacs(export_record(model), tokens, pairs, batch)


def profile(opts: ProfileOptions, progress: Callable[[str, float], None] | None = None) -> dict:
    """Profile every model; ``progress(label, seconds_done)`` is called as time passes."""
    _check(opts)
    rounds = 1 if opts.device == "jetson" else opts.rounds  # one contiguous tegrastats window per model
    labels = opts.labels or [Path(m).stem if Path(m).suffix else m for m in opts.models]
    entries = []
    for model, label in zip(opts.models, labels):
        runner, batch = open_runner(model, opts.backend, opts.device, opts.batch, opts.threads, opts.ep,
                                    opts.cuda_graphs, opts.data_transfers)
        specs = runner.input_specs()
        if opts.inputs and Path(opts.inputs).is_dir():
            feed, batch = image_inputs(opts.inputs, model, specs, batch)
        elif opts.inputs:
            feed, batch = load_inputs(opts.inputs, specs)
        else:
            check_batch_fits(model, batch, specs, _export_sidecar(model), opts.device)
            feed = random_inputs(specs, batch, opts.seed)
        kept = tokens_kept(model, feed, runner)  # before set_inputs: an engine's run sets its own
        runner.set_inputs(feed)
        entries.append({"model": model, "label": label, "runner": runner, "batch": batch, "m": Measurement(),
                        "kept": kept})

    sampler = None
    if opts.device == "jetson":
        from edgetok.profile import jetson
        from edgetok.profile.tegrastats import TegrastatsSampler

        power_mode, clocks = jetson.power_mode(), jetson.clocks()
        sampler = TegrastatsSampler(interval_ms=opts.tegrastats_interval_ms)
        sampler.start()
    try:
        for e in entries:
            warm_up(e["runner"], opts.warmup_ms / 1e3)
        per_round = opts.duration_s / rounds
        for _ in range(rounds):
            for e in entries:
                tick = (lambda s, label=e["label"]: progress(label, s)) if progress else None
                timed_round(e["runner"], e["m"], per_round, math.ceil(opts.iterations / rounds), tick)
    finally:
        samples = sampler.stop() if sampler else []
        for e in entries:
            e["runner"].close()

    models = []
    for e in entries:
        report = {"name": e["label"], "model": e["model"], "runner": e["runner"].info(), "batch": e["batch"],
                  "precision": _precision(e["model"]), **e["m"].report(e["batch"]), **_sidecar_facts(e["model"]),
                  **e["kept"]}
        measured = _kept_gmacs(e["model"], e["kept"], e["batch"])
        if measured and report.get("flops"):  # the compare table's GMACs: what these inputs really cost
            mean = sum(measured) / len(measured)
            report["flops"] = {**report["flops"], "reduced_gmacs": round(mean, 4),
                               "speedup_bound": round(report["flops"]["dense_gmacs"] / mean, 4),
                               "reduced_gmacs_from": f"the {len(measured)} profiled inputs (what each kept)"}
        if "Python reference ops" in report["runner"].get("plugins", ""):
            report["warnings"] = [*report["warnings"], report["runner"]["plugins"]]
        if sampler:
            from edgetok.profile.tegrastats import summarize

            (start, end), = e["m"].windows
            report["jetson"] = summarize(samples, start, end, len(e["m"].records))  # per forward call
        models.append(report)
    result = sidecar.stamp({
        "kind": "profile",
        "environment": environment(),
        "settings": {"device": opts.device, "warmup_ms": opts.warmup_ms, "duration_s": opts.duration_s,
                     "iterations": opts.iterations, "rounds": rounds, "seed": opts.seed,
                     "inputs": opts.inputs or "random (seeded)"},
        "models": models,
        "comparison": compare.rows(models),
    })
    if sampler:
        from edgetok.profile import jetson

        result["jetson"] = {"power_mode": power_mode, "clocks": clocks, "warning": jetson.lock_warning(clocks)}
    return result


def write_reports(result: dict, out_dir: Path) -> list[Path]:
    """profile.json, profile.md and profile.png in ``out_dir``, each written whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = result["comparison"]
    title = (f"{result['settings']['device']}, batch {table[0]['batch']}, "
             f"{result['models'][0]['runner']['backend']} — {result['environment']['cpu']}")
    paths = [out_dir / "profile.json", out_dir / "profile.md", out_dir / "profile.png"]
    sidecar.write(paths[0], result)
    atomic.write_text(paths[1], f"# edgetok profile\n\n{title}\n\n{compare.markdown(table)}\n\n{compare.notes(table)}\n")
    with atomic.staging_dir(paths[2]) as stage:
        compare.plot(table, stage / "profile.png", title)
        atomic.publish(stage, out_dir)
    return paths


def summary(result: dict) -> str:
    lines = [compare.markdown(result["comparison"]), "", compare.notes(result["comparison"]), ""]
    for m in result["models"]:
        lat = m["timings_ms"]["latency"]
        legs = ", ".join(f"{leg} median {m['timings_ms'][leg]['median']:.3f} ms"
                         for leg in ("h2d", "compute", "d2h", "enqueue") if leg in m["timings_ms"])
        lines.append(
            f"{m['name']}: {m['iterations']} iterations in {m['wall_s']:.2f} s, latency min {lat['min']:.2f} / mean "
            f"{lat['mean']:.2f} / median {lat['median']:.2f} / p90 {lat['p90']:.2f} / p95 {lat['p95']:.2f} / p99 "
            f"{lat['p99']:.2f} / max {lat['max']:.2f} ms (CV {lat['cv']:.1%}), {m['throughput']['qps']:.1f} qps "
            "(iterations / wall time)"
            + (f"; {legs}" if legs else "")
        )
        for kept in m.get("tokens_kept") or []:
            lines.append(f"  tokens kept after block {kept['block']}: {', '.join(map(str, kept['per_image']))} (per image)")
        for kept in m.get("attention_kept") or []:
            lines.append(f"  attention block pairs kept in block {kept['block']}: "
                         f"{', '.join(f'{f:.0%}' for f in kept['per_image'])} (per image)")
        for w in m["warnings"]:
            lines.append(f"  warning: {w}")
    if result.get("jetson", {}).get("warning"):
        lines.append(f"warning: {result['jetson']['warning']}")
    return "\n".join(lines)
