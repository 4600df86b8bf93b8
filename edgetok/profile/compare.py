"""Dense vs reduced side by side: one table (speedup vs the first model, the FLOPs bound from the
sidecars, their ratio), as JSON rows, Markdown and a PNG plot of latency against GMACs.

Every rate in the table comes from one statistic, the median latency: items/s is batch / median, and the
speedup is the ratio of those items/s (the ratio of medians at equal batches). The loop's wall-clock
throughput (iterations / timed wall time, trtexec's "Throughput") stays in each model's report."""

from __future__ import annotations

import math
from pathlib import Path

MIN_TOP1_SPAN = 5.0  # percentage points: the top-1 axis never zooms in further, so a 0.2-point gap looks like one
TOP1_PAD = 0.15  # of the shown span, above and below the points


def _method(m: dict) -> str:
    """The legend group: the sidecar's reduction method (dense for none), else the row's name."""
    method = (m.get("reduction") or {}).get("method")
    return "dense" if method == "none" else method or m["name"]


def reference_label(accuracy: dict | None) -> str | None:
    """Which model a recorded agreement/KL is against: its file name and the start of its sha256 (from the
    `edgetok eval --reference` that recorded it; older sidecars carry no hash)."""
    ref = (accuracy or {}).get("reference") or {}
    if not ref.get("model"):
        return None
    sha = ref.get("sha256")
    return f"{Path(ref['model']).name} ({sha[:12]})" if sha else f"{Path(ref['model']).name} (hash not recorded)"


def rows(models: list[dict]) -> list[dict]:
    base = models[0]
    base_items = base["batch"] * 1e3 / base["timings_ms"]["latency"]["median"]
    base_gmacs = (base.get("flops") or {}).get("reduced_gmacs")
    table = []
    for m in models:
        median = m["timings_ms"]["latency"]["median"]
        items = m["batch"] * 1e3 / median  # images per second at the median latency
        gmacs = (m.get("flops") or {}).get("reduced_gmacs")
        bound = base_gmacs / gmacs if base_gmacs and gmacs else None
        exact = [(x.get("flops") or {}) for x in (base, m)]
        if bound and all(f.get("speedup_bound") for f in exact) and exact[0].get("dense_gmacs") == \
                exact[1].get("dense_gmacs"):  # the same model: the unrounded bounds the export computed
            bound = exact[1]["speedup_bound"] / exact[0]["speedup_bound"]
        speedup = items / base_items  # at equal batches: exactly the ratio of median latencies
        accuracy = m.get("accuracy") or {}
        table.append({
            "name": m["name"],
            "method": _method(m),
            "backend": m["runner"]["backend"],
            "batch": m["batch"],
            "precision": m["precision"],
            "median_ms": median,
            "p99_ms": m["timings_ms"]["latency"]["p99"],
            "items_per_s": items,
            "gmacs": gmacs,
            "speedup": speedup,
            "flops_bound": bound,
            "speedup_over_bound": speedup / bound if bound else None,
            "top1": accuracy.get("top1"),
            "agreement": (accuracy.get("reference") or {}).get("top1_agreement"),
            "kl": (accuracy.get("reference") or {}).get("mean_kl"),
            "reference": reference_label(accuracy),
            "energy_mj": (m.get("jetson") or {}).get("energy_per_inference_mj"),
        })
    return table


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(table: list[dict]) -> str:
    show_top1 = any(r["top1"] is not None for r in table)
    show_reference = any(r.get("agreement") is not None for r in table)
    show_energy = any(r["energy_mj"] is not None for r in table)
    head = ["model", "backend", "batch", "precision", "median ms", "p99 ms", "items/s at median", "GMACs", "speedup",
            "FLOPs bound", "speedup / bound"] + (["top-1"] if show_top1 else []) + (
        ["agreement", "KL", "vs (eval --reference)"] if show_reference else []) + (["mJ/inference"] if show_energy else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["name"], r["backend"], str(r["batch"]), r["precision"], _fmt(r["median_ms"], ".2f"),
                 _fmt(r["p99_ms"], ".2f"), _fmt(r["items_per_s"], ".1f"), _fmt(r["gmacs"], ".3g"),
                 _fmt(r["speedup"], ".2f", "x"), _fmt(r["flops_bound"], ".2f", "x"),
                 _fmt(r["speedup_over_bound"], ".2f")]
        if show_top1:
            cells.append(_fmt(r["top1"], ".2%"))
        if show_reference:
            cells += [_fmt(r.get("agreement"), ".2%"), _fmt(r.get("kl"), ".4f"), r.get("reference") or "–"]
        if show_energy:
            cells.append(_fmt(r["energy_mj"], ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(table: list[dict]) -> str:
    """What the table's derived columns are computed from, for the reader of profile.md."""
    lines = ["items/s at median = batch / median latency; speedup = its ratio to the first row's (at equal batches the "
             "ratio of median latencies); the loop's wall-clock throughput is in profile.json."]
    if any(r.get("agreement") is not None for r in table):
        lines.append("top-1, agreement and KL: recorded in each ONNX sidecar by an earlier `edgetok eval`; agreement "
                     "and KL are against the model named in the last column (file, sha256 prefix), not measured here.")
    return "\n".join(lines)


def top1_limits(values: list[float]) -> tuple[float, float]:
    """The top-1 axis (percent): at least MIN_TOP1_SPAN points wide, padded, never above 100 or below 0."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, MIN_TOP1_SPAN)
    mid = (lo + hi) / 2
    bottom, top = mid - span / 2 - TOP1_PAD * span, mid + span / 2 + TOP1_PAD * span
    if top > 100:
        bottom, top = bottom - (top - 100), 100.0
    if bottom < 0:
        bottom, top = 0.0, min(100.0, top - bottom)
    return bottom, top


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _candidates():
    """Label offsets in points, nearest first: 8 directions at growing radii, 16 once the ring is wide."""
    for radius in (5, 12, 20, 30, 42, 56, 72, 90, 110, 135):
        steps = 8 if radius < 30 else 16
        for k in range(steps):
            angle = 2 * math.pi * k / steps + math.pi / 4  # up-right first
            yield radius, radius * math.cos(angle), radius * math.sin(angle)


def place_labels(ax, points: list[tuple[float, float]], texts: list[str], colors: list) -> list:
    """Annotate each point without overlap, greedily: every label takes the nearest offset where its box
    stays inside the axes and clear of the labels placed before it and of every point; one moved off its
    point gets a thin leader line. Where none is clear, the least-overlapping offset is kept. The axes'
    limits and the figure's layout must be final: boxes are measured in display space."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = [Bbox.from_bounds(px - 4, py - 4, 8, 8) for px, py in (ax.transData.transform(p) for p in points)]
    placed, annotations = [], []
    for i, ((x, y), text, color) in enumerate(zip(points, texts, colors)):
        ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 0), fontsize=8, color=color)
        best = None
        for radius, dx, dy in _candidates():
            ann.set_position((dx, dy))
            ann.set_ha("left" if dx > 1e-6 else "right" if dx < -1e-6 else "center")
            ann.set_va("bottom" if dy > 1e-6 else "top" if dy < -1e-6 else "center")
            box = ann.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            padded = box.padded(2)
            cost = sum(_overlap(padded, b) for b in placed) + sum(_overlap(padded, m) for j, m in enumerate(marks)
                                                                 if j != i)
            cost += 0 if inside else 1e9
            if best is None or cost < best[0]:
                best = (cost, radius, dx, dy, ann.get_ha(), ann.get_va(), box)
            if cost == 0:
                break
        _, radius, dx, dy, ha, va, box = best
        ann.set_position((dx, dy))
        ann.set_ha(ha)
        ann.set_va(va)
        placed.append(box)
        if radius > 12:  # far from its point: a leader line to the box's nearest edge says which point it names
            px, py = ax.transData.transform((x, y))
            end = ax.transData.inverted().transform((min(max(px, box.x0), box.x1), min(max(py, box.y0), box.y1)))
            ax.plot([x, end[0]], [y, end[1]], color=color, lw=0.6, alpha=0.7, zorder=1)
        annotations.append(ann)
    return annotations


def figure(table: list[dict], title: str):
    """The plot as a matplotlib figure (Agg): latency against GMACs, and top-1 against latency when the
    sidecars carry accuracy; one colour per method, a legend, labels placed without overlap, latency and
    GMACs from 0, top-1 at most 100 % and never zoomed to less than MIN_TOP1_SPAN points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [r.get("method") or r["name"] for r in table]  # a report from an older edgetok has no method
    methods = list(dict.fromkeys(groups))
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    color = {m: palette(i % palette.N) for i, m in enumerate(methods)}
    with_top1 = any(r["top1"] is not None for r in table)
    fig, axes = plt.subplots(1, 2 if with_top1 else 1, figsize=(12 if with_top1 else 7, 5.5), squeeze=False, dpi=110)
    ax = axes[0][0]
    xs = [r["gmacs"] or 0.0 for r in table]
    ys = [r["median_ms"] for r in table]
    for method in methods:
        mine = [(x, y) for g, x, y in zip(groups, xs, ys) if g == method]
        ax.scatter([p[0] for p in mine], [p[1] for p in mine], color=color[method], label=method, zorder=3)
    ax.set_xlim(0, max(xs) * 1.25 or 1.0)
    ax.set_ylim(0, max(ys) * 1.3)
    ax.set_xlabel("GMACs per image (models without a sidecar at 0)")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    panels = [(ax, list(zip(xs, ys)), [f"{r['name']} ({r['speedup']:.2f}x)" for r in table], [color[g] for g in groups])]
    if with_top1:
        ax2 = axes[0][1]
        rated = [(r, g) for r, g in zip(table, groups) if r["top1"] is not None]
        pts = [(r["median_ms"], r["top1"] * 100) for r, _ in rated]
        for method in methods:
            mine = [p for (_, g), p in zip(rated, pts) if g == method]
            if mine:
                ax2.scatter([p[0] for p in mine], [p[1] for p in mine], color=color[method], zorder=3)
        ax2.set_ylim(*top1_limits([p[1] for p in pts]))
        ax2.set_xlim(0, max(p[0] for p in pts) * 1.3)
        spread = max(p[1] for p in pts) - min(p[1] for p in pts)
        ax2.set_title(f"top-1 spread {spread:.2f} points; the axis shows at least {MIN_TOP1_SPAN:g}", fontsize=9)
        ax2.set_xlabel("median latency (ms)")
        ax2.set_ylabel("top-1 (%)")
        ax2.grid(alpha=0.3)
        panels.append((ax2, pts, [r["name"] for r, _ in rated], [color[g] for _, g in rated]))
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=min(len(methods), 8), fontsize=8,
               frameon=False, title="method", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # before the labels: they are placed in the final layout
    for panel, points, texts, colors in panels:
        place_labels(panel, points, texts, colors)
    return fig


def plot(table: list[dict], path: Path, title: str) -> None:
    """``figure`` written as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(table, title)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
