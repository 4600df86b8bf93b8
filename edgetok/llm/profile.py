"""`edgetok profile PAIR_DIR --pair`: prefill and decode rates, acceptance, speedup over target-only,
memory, and the per-call costs that predict the speedup (round model)."""

from __future__ import annotations

import resource

import numpy as np

from edgetok import sidecar
from edgetok.errors import EdgetokError
from edgetok.llm.pair import inside
from edgetok.llm.runtime import (
    encode_prompt,
    generate_draft_free,
    generate_speculative,
    generate_target,
    open_decoder,
    open_pair,
)
from edgetok.profile.environment import environment

# Code openings: the shipped pair writes Python; any pair gets them through its own tokenizer.
DEFAULT_PROMPTS = ["import os\nimport sys\n\n\ndef main(", "class Config:\n    def __init__(self", "    for i in range(",
                   "def read_file(path):\n    with open(", "        if not isinstance("]


def fitted_alpha(mean_accepted: float, k: int) -> float:
    """Per-token acceptance α of the i.i.d. round model, from the mean accepted per round:
    E[accepted] = α(1 − α^k)/(1 − α); solved by bisection (monotone in α)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        value = k if mid == 1 else mid * (1 - mid**k) / (1 - mid)
        lo, hi = (mid, hi) if value < mean_accepted else (lo, mid)
    return (lo + hi) / 2


def call_costs(decode_calls, verify_calls, draft_calls, k: int) -> dict:
    """Median seconds of the calls the generations really made: a target decode (1 token, target-only
    runs), a target verify (k+1 tokens) and a draft step (1 token), from the decoders' call history."""
    def median_of(calls, n):
        times = [s for m, s in calls if m == n]
        return float(np.median(times)) if times else float("nan")

    return {"target_decode_s": median_of(decode_calls, 1), "target_verify_s": median_of(verify_calls, k + 1),
            "draft_step_s": median_of(draft_calls, 1)}


def estimate_speedup(alpha: float, k: int, costs: dict) -> float:
    """Tokens per round (1 − α^(k+1))/(1 − α) over the round's cost, against one token per decode."""
    per_round = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    round_s = costs["target_verify_s"] + k * costs["draft_step_s"]
    return per_round / round_s * costs["target_decode_s"]


def profile_pair(folder: str, k: int = 4, max_new_tokens: int = 64, prompts: list[str] | None = None,
                 temperature: float = 0.0, adaptive_k: bool = False, draft_device: str = "cpu",
                 target_device: str = "cpu", draft_threads: int = 1, target_threads: int = 0,
                 modes: list[str] | None = None, ngram: int = 4, branches: int = 4, tokens: int = 16,
                 backend: str = "onnxruntime") -> dict:
    """Target-only generation against each mode (default: speculative when the pair has a draft, lookahead when
    its target has the tree variant, prompt lookup), the same prompts, the modes' runs after the target's."""
    manifest, target, draft = open_pair(folder, draft_device, target_device, draft_threads, target_threads,
                                        backend=backend)
    available = (["speculative"] if draft else []) + (["lookahead"] if manifest["target"].get("tree") else []) \
        + ["prompt-lookup"]
    modes = modes or available
    missing = [m for m in modes if m not in available]
    if missing:
        raise EdgetokError(f"--modes {missing[0]}: {folder} offers {', '.join(available)}")
    tree = open_decoder(folder, manifest, "target_tree", backend, target_device, target_threads) \
        if "lookahead" in modes else None
    if manifest["tokenizer"] is not None:
        ids = [encode_prompt(manifest, folder, p, None) for p in (prompts or DEFAULT_PROMPTS)]
    else:
        rng = np.random.default_rng(0)
        ids = [list(map(int, rng.integers(0, manifest["vocab_size"], 16))) for _ in range(len(DEFAULT_PROMPTS))]
    eos, limit = None, manifest.get("max_length")  # measure full-length generations

    def run(mode: str, p: list[int], n: int):
        if mode == "target":
            return generate_target(target, p, n, temperature, 0, eos, limit)
        if mode == "speculative":
            return generate_speculative(target, draft, p, n, k, temperature, 0, eos, limit, adaptive_k)
        return generate_draft_free(tree if mode == "lookahead" else target, p, n, mode, ngram, branches, tokens,
                                   temperature, 0, eos, limit)

    for mode in ["target", *modes]:  # warm-up every session
        run(mode, ids[0], 8)
    runs = {mode: [] for mode in ["target", *modes]}
    calls = {"decode": [], "verify": [], "draft": []}
    for p in ids:
        for mode in runs:
            mark, draft_mark = len(target.history), len(draft.history) if draft else 0
            runs[mode].append(run(mode, p, max_new_tokens))
            if mode == "target":
                calls["decode"] += target.history[mark:]
            elif mode == "speculative":
                calls["verify"] += target.history[mark:]
                calls["draft"] += draft.history[draft_mark:]
    rows = {}
    for mode, gens in runs.items():
        new = sum(len(g.tokens) for g in gens)
        prompt_tokens = sum(g.prompt_tokens - 1 for g in gens)  # the last prompt token is fed by decode
        prefill = sum(g.prefill_s for g in gens)
        decode = sum(g.decode_s for g in gens)
        rows[mode] = {"prefill_ms": prefill / len(gens) * 1e3, "prefill_tokens_per_s": prompt_tokens / prefill,
                      "decode_tokens_per_s": new / decode, "new_tokens": new}
        if mode != "target":
            rounds, proposed = sum(g.rounds for g in gens), sum(g.proposed for g in gens)
            rows[mode].update(acceptance_rate=sum(g.accepted for g in gens) / proposed if proposed else None,
                              mean_accepted_per_round=sum(g.accepted for g in gens) / rounds,
                              mean_tokens_per_round=new / rounds,  # = tokens per target call
                              speedup=new / decode / rows["target"]["decode_tokens_per_s"],
                              greedy_outputs_identical=all(t.tokens == g.tokens for t, g in zip(runs["target"], gens))
                              if temperature == 0 else None)
    costs = call_costs(calls["decode"], calls["verify"], calls["draft"], k) if draft and "speculative" in modes \
        else None
    alpha = None
    if costs:  # the i.i.d. round model needs rounds that proposed exactly k (not budget-cut, not adaptive k)
        full = [a for g in runs["speculative"] for a, n in zip(g.accepted_per_round, g.k_per_round) if n == k]
        alpha = fitted_alpha(sum(full) / len(full), k) if full and not adaptive_k else None
    roles = ["target"] + (["draft"] if draft else [])
    kv_bytes = {role: 2 * manifest[role]["num_hidden_layers"] * manifest[role]["num_key_value_heads"] *
                manifest[role]["head_size"] * 4 * (manifest.get("max_length") or 0) for role in roles}
    return sidecar.stamp({
        "kind": "pair-profile",
        "pair": str(folder),
        "settings": {"k": k, "adaptive_k": adaptive_k, "max_new_tokens": max_new_tokens, "prompts": len(ids),
                     "temperature": temperature, "modes": modes, "backend": backend,
                     "draft_free": {"ngram": ngram, "branches": branches, "tokens": tokens},
                     "devices": {"target": target_device, "draft": draft_device},
                     "threads": {"target": target_threads or "all", "draft": draft_threads or "all"},
                     "allow_spinning": False},
        "target_only": rows["target"],
        "modes": {m: rows[m] for m in modes},
        "speculative": rows.get("speculative"),
        "greedy_outputs_identical": all(rows[m]["greedy_outputs_identical"] for m in modes)
        if temperature == 0 else None,
        "call_costs": costs,
        "round_model": {"alpha": alpha,
                        "estimated_speedup": estimate_speedup(alpha, k, costs) if alpha is not None else None,
                        "note": "not estimated: k adapts" if adaptive_k else None},
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "model_files_mb": {r: inside(folder, manifest[r]["file"], f"{r} file").stat().st_size / 2**20
                                      for r in roles},
                   "kv_cache_mb_at_max_length": {r: b / 2**20 for r, b in kv_bytes.items()}},
        "environment": environment(),
    })


def markdown(report: dict) -> str:
    t = report["target_only"]
    k, free = report["settings"]["k"], report["settings"]["draft_free"]
    names = {"speculative": f"speculative k={k}", "lookahead": f"lookahead ({free['branches']} branches, "
             f"{free['tokens']} tokens, n-gram {free['ngram']})",
             "prompt-lookup": f"prompt lookup ({free['tokens']} tokens, n-gram {free['ngram']})"}
    lines = ["| mode | prefill ms | prefill tok/s | decode tok/s | acceptance | tokens/target call | speedup |",
             "|---|---|---|---|---|---|---|",
             f"| target only | {t['prefill_ms']:.1f} | {t['prefill_tokens_per_s']:.0f} | {t['decode_tokens_per_s']:.1f} "
             "| – | 1.00 | 1.00x |"]
    for mode, s in report["modes"].items():
        acceptance = "–" if s["acceptance_rate"] is None else f"{s['acceptance_rate']:.2f}"
        lines.append(f"| {names[mode]} | {s['prefill_ms']:.1f} | {s['prefill_tokens_per_s']:.0f} | "
                     f"{s['decode_tokens_per_s']:.1f} | {acceptance} | {s['mean_tokens_per_round']:.2f} | "
                     f"{s['speedup']:.2f}x |")
    est = report["round_model"]
    lines.append("")
    if est["estimated_speedup"] is not None:
        measured = report["modes"]["speculative"]["speedup"]
        lines.append(f"round model: alpha {est['alpha']:.2f}, estimated speedup {est['estimated_speedup']:.2f}x; "
                     f"measured / estimate {measured / est['estimated_speedup']:.2f}")
    lines.append(f"peak RSS {report['memory']['peak_rss_mb']:.0f} MB")
    if report["greedy_outputs_identical"] is not None:
        lines.append(f"greedy outputs identical to target-only: {report['greedy_outputs_identical']}")
    return "\n".join(lines)
