"""Visual-token reduction on the reference VLM (edgetok/assets/digits_vlm), ONNX Runtime CPU: answer accuracy,
visual tokens, time to first token, KV cache and decode rate, dense against every fixed-count method at 50 % and
25 % of the visual tokens, and dtome.

    .venv/bin/python bench/vlm.py [--questions 400] [--repeats 10] [--threads 1] [--methods tome,pitome,...]

Each configuration is exported (`export vlm`, whose pipeline check against the patched PyTorch model must pass),
then evaluated (`eval`'s answer accuracy on the first --questions held-out questions, greedy) and profiled
(`profile --vlm` on the first question's image and prompt). A method's setting is the one whose planned visual
token count is closest to the fraction asked. Time to first token is compared inside each profile run: the
folder's reduced tower against its own unreduced tower (vision_dense.onnx), alternating, so drift on a shared
machine hits both alike; the table's "TTFT / dense" is that ratio, not a ratio across runs.

The target (issue 26): at 25 % of the visual tokens, time to first token <= 0.5 x dense with accuracy within
2 points of dense.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edgetok.errors import EdgetokError
from edgetok.vit import methods
from edgetok.vlm.digits import ASSET, write_data
from edgetok.vlm.evaluate import QUESTIONS_FILE, evaluate, read_data
from edgetok.vlm.export import VlmExportOptions, export_vlm
from edgetok.vlm.profile import profile_vlm

FRACTIONS = (0.5, 0.25)
DTOME_R = 8  # as recipes/digits_dtome.yaml for the digits ViT this tower comes from


def say(message: str) -> None:
    print(f"· {message}", file=sys.stderr, flush=True)


def closest_settings(model: Path, method: str) -> list[tuple[float, dict, int]]:
    """(fraction, setting, planned visual tokens) of ``method`` for each fraction of the dense visual tokens:
    the setting of its knob whose planned count is closest (None where no setting fits the tower)."""
    from edgetok.vit.reduction import plan
    from edgetok.vlm.llava import load_llava, tower_vit

    llava = load_llava(str(model))
    tower = tower_vit(llava)
    dense = tower.num_tokens - llava.dropped
    counts = []
    for setting in methods.get(method).knob(tower.depth):
        try:
            reduced = plan(tower, methods.make_method(method, tower.depth, tokens=tower.num_tokens, **setting))
        except EdgetokError:  # more than the tower can reduce
            continue
        counts.append((setting, reduced.tokens[-1][1] - llava.dropped))
    chosen = []
    for fraction in FRACTIONS:
        if counts:
            setting, count = min(counts, key=lambda sc: abs(sc[1] - fraction * dense))
            chosen.append((fraction, setting, count))
    return chosen


def subset(data: Path, n: int, out: Path) -> Path:
    """The first ``n`` questions of ``data`` as a data folder of their own (its images linked, not copied)."""
    rows = read_data(str(data))[:n]
    out.mkdir(parents=True)
    (out / "images").symlink_to((data / "images").resolve())
    (out / QUESTIONS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=400, help="held-out questions per configuration")
    parser.add_argument("--repeats", type=int, default=10, help="profiled generations per tower")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="decoded tokens per profiled generation")
    parser.add_argument("--methods", default=",".join(methods.comparable()), help="fixed-count methods")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: all cores; one by "
                        "default: milliseconds-long calls on a shared machine vary less on one)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if not (ASSET / "config.json").is_file():
        raise SystemExit(f"{ASSET} is missing: train it with tools/train_digits_vlm.py")

    with tempfile.TemporaryDirectory(prefix="edgetok-bench-vlm-") as tmp:
        root = Path(tmp)
        say("writing the held-out questions and the calibration grids")
        write_data(root / "heldout", "heldout")
        write_data(root / "train", "train")
        data = subset(root / "heldout", args.questions, root / "questions")
        first = read_data(str(data))[0]
        image = str(data / first["image"])
        configs = [("dense", "none", {}, None)]
        for method in args.methods.split(","):
            for fraction, setting, count in closest_settings(ASSET, method):
                configs.append((f"{methods.setting_label(method, setting)}", method, setting, fraction))
        configs.append((f"dtome r={DTOME_R}", "dtome", {"r": DTOME_R, "calibrate": str(root / "train")}, None))
        rows = []
        for label, method, options, fraction in configs:
            folder = root / f"vlm{len(rows)}"
            say(f"{label}: export")
            try:
                export_vlm(VlmExportOptions(model=str(ASSET), output=str(folder), method=method,
                                            method_options=dict(options)))
            except EdgetokError as exc:
                rows.append({"config": label, "method": method, "fraction": fraction, "refused": str(exc)})
                say(f"{label}: refused: {exc}")
                continue
            say(f"{label}: accuracy on {args.questions} questions")
            quality = evaluate(str(folder), str(data))
            say(f"{label}: profile")
            report = profile_vlm(str(folder), image, args.max_new_tokens, args.repeats, args.threads,
                                 prompt=first["prompt"])
            tower = report["towers"]["reduced" if method != "none" else "dense"]
            rows.append({"config": label, "method": method, "fraction": fraction, "accuracy": quality["accuracy"],
                         "visual_tokens": quality["visual_tokens"], "profiled_visual_tokens": tower["visual_tokens"],
                         "vision_ms": tower["vision_ms"], "prefill_ms": tower["prefill_ms"],
                         "ttft_ms": tower["time_to_first_token_ms"],
                         "ttft_vs_dense": (tower.get("vs_dense") or {}).get("time_to_first_token", 1.0),
                         "kv_cache_prompt_bytes": tower["kv_cache"]["prompt_bytes"],
                         "decode_tokens_per_s": tower["decode_tokens_per_s"],
                         "dense_ttft_ms_same_run": report["towers"]["dense"]["time_to_first_token_ms"]})
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def table(rows: list[dict], args) -> str:
    dense = next(r for r in rows if r["method"] == "none")
    lines = [f"digits_vlm, ONNX Runtime CPU ({args.threads or 'all'} threads): accuracy on {args.questions} held-out "
             f"questions; TTFT, KV cache and decode rate on one image, median of {args.repeats} generations of "
             f"{args.max_new_tokens} tokens", "",
             "| config | of dense | visual tokens | accuracy | Δ accuracy | vision ms | prefill ms | TTFT ms | "
             "TTFT / dense (same run) | KV cache at first token | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['config']} | {r['fraction'] or ''} | refused: {r['refused'][:80]} |||||||||")
            continue
        v = r["visual_tokens"]
        tokens = f"{v['mean']:g}" if v["min"] == v["max"] else f"{v['mean']:g} ({v['min']}–{v['max']})"
        share = f"{r['fraction']:.0%}" if r["fraction"] else ("100%" if r["method"] == "none" else "follows image")
        lines.append(f"| {r['config']} | {share} | {tokens} | {r['accuracy']:.1%} | "
                     f"{(r['accuracy'] - dense['accuracy']) * 100:+.1f} | {r['vision_ms']:.2f} | {r['prefill_ms']:.2f} | "
                     f"{r['ttft_ms']:.2f} | {r['ttft_vs_dense']:.2f} | {r['kv_cache_prompt_bytes'] / 1024:.1f} KiB | "
                     f"{r['decode_tokens_per_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
