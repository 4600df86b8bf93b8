"""Dense vs reduced side by side: one table (speedup vs the first model, the FLOPs bound from the
sidecars, their ratio), as JSON rows, Markdown and a PNG plot of latency against GMACs."""

from __future__ import annotations

from pathlib import Path


def rows(models: list[dict]) -> list[dict]:
    base = models[0]
    base_ms = base["timings_ms"]["latency"]["median"]
    base_gmacs = (base.get("flops") or {}).get("reduced_gmacs")
    table = []
    for m in models:
        median = m["timings_ms"]["latency"]["median"]
        gmacs = (m.get("flops") or {}).get("reduced_gmacs")
        bound = base_gmacs / gmacs if base_gmacs and gmacs else None
        # Same batch: ratio of median latencies; different batches: ratio of images per second.
        speedup = base_ms / median if m["batch"] == base["batch"] else (
            m["throughput"]["items_per_s"] / base["throughput"]["items_per_s"])
        table.append({
            "name": m["name"],
            "backend": m["runner"]["backend"],
            "batch": m["batch"],
            "precision": m["precision"],
            "median_ms": median,
            "p99_ms": m["timings_ms"]["latency"]["p99"],
            "items_per_s": m["throughput"]["items_per_s"],
            "gmacs": gmacs,
            "speedup": speedup,
            "flops_bound": bound,
            "speedup_over_bound": speedup / bound if bound else None,
            "top1": (m.get("accuracy") or {}).get("top1"),
            "agreement": ((m.get("accuracy") or {}).get("reference") or {}).get("top1_agreement"),
            "kl": ((m.get("accuracy") or {}).get("reference") or {}).get("mean_kl"),
            "energy_mj": (m.get("jetson") or {}).get("energy_per_inference_mj"),
        })
    return table


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(table: list[dict]) -> str:
    show_top1 = any(r["top1"] is not None for r in table)
    show_reference = any(r.get("agreement") is not None for r in table)
    show_energy = any(r["energy_mj"] is not None for r in table)
    head = ["model", "backend", "batch", "precision", "median ms", "p99 ms", "items/s", "GMACs", "speedup",
            "FLOPs bound", "speedup / bound"] + (["top-1"] if show_top1 else []) + (
        ["agreement", "KL"] if show_reference else []) + (["mJ/inference"] if show_energy else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["name"], r["backend"], str(r["batch"]), r["precision"], _fmt(r["median_ms"], ".2f"),
                 _fmt(r["p99_ms"], ".2f"), _fmt(r["items_per_s"], ".1f"), _fmt(r["gmacs"], ".3g"),
                 _fmt(r["speedup"], ".2f", "x"), _fmt(r["flops_bound"], ".2f", "x"),
                 _fmt(r["speedup_over_bound"], ".2f")]
        if show_top1:
            cells.append(_fmt(r["top1"], ".2%"))
        if show_reference:
            cells += [_fmt(r.get("agreement"), ".2%"), _fmt(r.get("kl"), ".4f")]
        if show_energy:
            cells.append(_fmt(r["energy_mj"], ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path, title: str) -> None:
    """Latency against GMACs (models without a sidecar are placed at x=0), with top-1 beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_top1 = any(r["top1"] is not None for r in table)
    fig, axes = plt.subplots(1, 2 if with_top1 else 1, figsize=(11 if with_top1 else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    xs = [r["gmacs"] or 0.0 for r in table]
    ys = [r["median_ms"] for r in table]
    ax.scatter(xs, ys)
    for r, x, y in zip(table, xs, ys):
        ax.annotate(f"{r['name']} ({r['speedup']:.2f}x)", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.grid(alpha=0.3)
    if with_top1:
        ax2 = axes[0][1]
        pts = [(r["median_ms"], r["top1"] * 100, r["name"]) for r in table if r["top1"] is not None]
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:green")
        for x, y, name in pts:
            ax2.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax2.set_xlabel("median latency (ms)")
        ax2.set_ylabel("top-1 (%)")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
