"""What `edgetok tune` writes: tune.json (every trial), pareto.md and pareto.png (the front Optuna's study
finds over latency and accuracy loss), best.yaml (the fastest trial within the budget, as a recipe that
`edgetok export --recipe` and `build-engine --recipe` reproduce), and the live progress line.

Everything is read back from the study's storage, so a rerun's reports cover the trials of every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from edgetok import atomic, sidecar

STATES = {"COMPLETE": "profiled", "PRUNED": "not profiled", "FAIL": "failed", "RUNNING": "running"}


def trials(study) -> list[dict]:
    """Every trial asked so far, as tune.json records it (queued ones are left out)."""
    from optuna.trial import TrialState

    front = {t.number for t in study.best_trials} if _any_complete(study) else set()
    found = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        a = t.user_attrs
        found.append({
            "number": t.number,
            "state": STATES.get(t.state.name, t.state.name.lower()),
            "reason": a.get("reason"),
            "run": a.get("run"),
            "label": a.get("label"),
            "config": a.get("config"),
            "seeded": a.get("seeded"),
            "retry_of": a.get("retry_of"),
            "artifact": a.get("artifact"),
            "artifacts": a.get("artifacts"),
            "accuracy": a.get("accuracy"),
            "loss_points": a.get("loss"),
            "flops": a.get("flops"),
            "quantization": a.get("quantization"),
            "latency_ms": a.get("latency_ms"),
            "throughput": a.get("throughput"),
            "device": a.get("device"),
            "nodes": {"prepare": (a.get("prepare_node") or {}).get("node_id"),
                      "profile": (a.get("profile_node") or {}).get("node_id")},
            "hosts": {"prepare": (a.get("prepare_node") or {}).get("host"),
                      "profile": (a.get("profile_node") or {}).get("host")},
            "build": a.get("build"),
            "runner": a.get("runner"),
            "seconds": {"prepare": a.get("prepare_seconds"), "profile": a.get("profile_seconds")},
            "on_front": t.number in front,
            "dominated_by": a.get("dominated_by"),
            "duplicate_of": a.get("duplicate_of"),
        })
    return found


def _any_complete(study) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def front(records: list[dict]) -> list[dict]:
    """The front, fastest first."""
    return sorted((r for r in records if r["on_front"]), key=lambda r: (r["latency_ms"]["median"], r["loss_points"]))


def best(records: list[dict]) -> dict | None:
    """The fastest trial on the front (all profiled trials are within the budget)."""
    found = front(records)
    return found[0] if found else None


def progress_line(records: list[dict], budget: int | None, running: int, max_drop: float) -> str:
    done = sum(r["state"] in ("profiled", "not profiled") for r in records)
    failed = sum(r["state"] == "failed" and r["reason"] and not r["reason"].startswith("interrupted") for r in records)
    top = best(records)
    line = f"tune: {done}{'/' + str(budget) if budget else ''} done, {running} running, {failed} failed"
    if top:
        line += (f"; best {top['latency_ms']['median']:.3f} ms at {top['loss_points']:+.2f} pts "
                 f"(trial {top['number']}: {top['label']})")
    else:
        line += f"; no trial within --max-drop {max_drop:g} profiled yet"
    return line


def write(out: Path, study, records: list[dict], opts, dense_gmacs: float, final: bool) -> list[Path]:
    """tune.json always; with ``final``, the table, the plot and best.yaml too."""
    top = best(records)
    data = sidecar.stamp({
        "kind": "tune",
        "settings": opts.settings(),
        "run": {"address": opts.address or "local Ray instance", "workers": opts.workers,
                "duration_s": opts.duration_s, "runs": study.user_attrs.get("runs")},
        "dense": {"top1": study.user_attrs.get("dense_top1"), "gmacs": round(dense_gmacs, 4)},
        "storage": str((out / "study.db").resolve()),
        "front": [r["number"] for r in front(records)],
        "best": top["number"] if top else None,
        "trials": records,
    })
    paths = [out / "tune.json"]
    atomic.write_text(paths[0], json.dumps(data, indent=2, default=str) + "\n")
    if not final:
        return paths
    paths.append(out / "pareto.md")
    atomic.write_text(paths[-1], markdown(records, opts))
    paths.append(out / "pareto.png")
    with atomic.staging_dir(paths[-1]) as stage:
        plot(records, opts, stage / "pareto.png")
        atomic.publish(stage, out)
    if top:
        paths.append(out / "best.yaml")
        atomic.write_text(paths[-1], recipe(top, opts, out))
    return paths


def markdown(records: list[dict], opts) -> str:
    rows = front(records)
    lines = [f"# edgetok tune: {opts.model} on {opts.target}, batch {opts.batch}", "",
             f"Accuracy loss: {opts.metric} against the dense export, in points (budget {opts.max_drop:g}). "
             f"{len(records)} trials: {sum(r['state'] == 'profiled' for r in records)} profiled, "
             f"{sum(r['state'] == 'not profiled' for r in records)} not profiled (over budget, or beaten before "
             f"profiling), {sum(r['state'] == 'failed' for r in records)} failed.", "",
             "| trial | configuration | median ms | p90 ms | top-1 | loss (pts) | GMACs | device |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat, acc = r["latency_ms"], r["accuracy"]
        lines.append(f"| {r['number']} | {r['label']} | {lat['median']:.3f} | {lat['p90']:.3f} | {acc['top1']:.2%} | "
                     f"{r['loss_points']:.2f} | {(r['flops'] or {}).get('reduced_gmacs', float('nan')):.4f} | "
                     f"{r['device']} |")
    if not rows:
        lines.append("| – | no trial within the budget was profiled | | | | | | |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], opts, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r["state"] == "profiled"]
    rows = front(records)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([r["latency_ms"]["median"] for r in done], [r["loss_points"] for r in done], color="0.6",
               label="profiled trials", zorder=2)
    if rows:
        ax.step([r["latency_ms"]["median"] for r in rows], [r["loss_points"] for r in rows], where="post",
                color="tab:blue", zorder=3)
        ax.scatter([r["latency_ms"]["median"] for r in rows], [r["loss_points"] for r in rows], color="tab:blue",
                   label="front", zorder=4)
        for r in rows:
            ax.annotate(f"{r['number']}: {r['label']}", (r["latency_ms"]["median"], r["loss_points"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.axhline(opts.max_drop, color="tab:red", linestyle="--", linewidth=1, label=f"--max-drop {opts.max_drop:g}")
    ax.set_xlabel(f"median latency (ms), batch {opts.batch}, {opts.target}")
    ax.set_ylabel(f"accuracy loss ({opts.metric}, points)")
    ax.set_title(f"edgetok tune: {opts.model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def recipe(top: dict, opts, out: Path) -> str:
    """best.yaml: the best trial's export (and quantize, and build for an engine target) sections."""
    config = top["config"]
    best_dir = (out / "best").resolve()
    export = {"model": opts.model}
    if opts.checkpoint:
        export["checkpoint"] = str(Path(opts.checkpoint).resolve())
    export["method"] = config["method"]
    export.update(config["options"])
    if config["method"] == "dtome":
        export["calibrate"] = str(Path(opts.calibrate).resolve())
    if config.get("plugins"):
        export["plugins"] = True
    if config.get("attention") == "sparse":
        export.update(attention="sparse", attention_block=config["attention_block"],
                      attention_mass=config["attention_mass"])
    export["output"] = str(best_dir / "model.onnx")
    data = {"export": export}
    if config["precision"] in ("int8", "fp8"):
        data["quantize"] = {"mode": config["precision"], "calibrate": str(Path(opts.calibrate).resolve()),
                            "samples": opts.samples, "output": str(best_dir / f"model_{config['precision']}.onnx")}
        if opts.target != "cpu":
            data["quantize"]["targets"] = [opts.target]
    if opts.target != "cpu":
        data["build"] = {"precision": "fp16" if config["precision"] == "fp16" else "fp32",
                         "batch": f"{opts.batch}:{opts.batch}:{opts.batch}"}
    lat, acc = top["latency_ms"], top["accuracy"]
    head = (f"# edgetok tune: the fastest configuration within --max-drop {opts.max_drop:g} ({opts.metric}) found in "
            f"{out}\n# trial {top['number']}: {top['label']}; top-1 {acc['top1']:.4%} (loss {top['loss_points']:.2f} "
            f"points), median {lat['median']:.3f} ms at batch {opts.batch} on {top['device']}\n"
            f"# reproduce: edgetok export --recipe {out / 'best.yaml'}"
            + (f"\n#            edgetok build-engine --recipe {out / 'best.yaml'}" if opts.target != "cpu" else "")
            + "\n")
    return head + yaml.safe_dump(data, sort_keys=False)
