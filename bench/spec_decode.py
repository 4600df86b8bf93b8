"""The shipped byte-level pair on ONNX Runtime CPU, k = 1..8, then draft-free (lookahead, prompt lookup) on its
target alone: acceptance, tokens per target call, tokens/s, speedup over target-only (all measured in this one
run) and the round model's estimate from the measured acceptance and per-call costs.

    .venv/bin/python bench/spec_decode.py [--max-new-tokens 96] [--ks 1,2,3,4,5,6,7,8] [--rounds 3]

For each setting, target-only and the mode alternate over several rounds and the speedup is the median of the
per-round ratios, so drift on a shared machine hits both sides alike. The prompts are code openings: code
repeats its own identifiers and the model's greedy output repeats itself, which is where draft-free proposals
(n-grams already seen) are accepted; prose with little repetition gains less.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from edgetok.llm.pair import export_pair
from edgetok.llm.profile import DEFAULT_PROMPTS, call_costs, estimate_speedup, fitted_alpha
from edgetok.llm.runtime import (
    encode_prompt,
    generate_draft_free,
    generate_speculative,
    generate_target,
    open_decoder,
    open_pair,
)

SHIPPED = Path(__file__).parents[1] / "edgetok" / "assets" / "spec_pair"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target-threads", type=int, default=0, help="0: all cores (the draft always gets 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "pair")
        export_pair(str(SHIPPED / "target"), str(SHIPPED / "draft"), folder)
        manifest, target, draft = open_pair(folder, target_threads=args.target_threads)
        prompts = [encode_prompt(manifest, folder, p, None) for p in DEFAULT_PROMPTS]
        generate_target(target, prompts[0], 16)  # warm-up
        generate_speculative(target, draft, prompts[0], 16, 4)

        def rate(gens):
            return sum(len(g.tokens) for g in gens) / sum(g.decode_s for g in gens)

        base = [generate_target(target, p, args.max_new_tokens) for p in prompts]
        base_rate = rate(base)
        print(f"shipped pair (target {manifest['target']['num_hidden_layers']} layers x {manifest['target']['hidden_size']}, "
              f"draft {manifest['draft']['num_hidden_layers']} x {manifest['draft']['hidden_size']}), ONNX Runtime CPU, "
              f"spinning off, target threads {args.target_threads or 'all'}, draft 1, greedy, {len(prompts)} prompts x "
              f"{args.max_new_tokens} new tokens")
        print(f"target only: {base_rate:.1f} tok/s")
        print("| k | acceptance | accepted/round | tok/s | speedup | estimate | measured / estimate | lossless |")
        print("|---|---|---|---|---|---|---|---|")
        best = (0.0, None)
        for k in map(int, args.ks.split(",")):
            ratios, rates = [], []
            calls = {"decode": [], "verify": [], "draft": []}
            for _ in range(args.rounds):
                mark = len(target.history)
                plain = rate([generate_target(target, p, args.max_new_tokens) for p in prompts])
                calls["decode"] += target.history[mark:]
                mark, draft_mark = len(target.history), len(draft.history)
                gens = [generate_speculative(target, draft, p, args.max_new_tokens, k) for p in prompts]
                calls["verify"] += target.history[mark:]
                calls["draft"] += draft.history[draft_mark:]
                rates.append(rate(gens))
                ratios.append(rates[-1] / plain)
            accepted = sum(g.accepted for g in gens)
            rounds = sum(g.rounds for g in gens)
            acceptance = accepted / sum(g.proposed for g in gens)
            full = [a for g in gens for a, n in zip(g.accepted_per_round, g.k_per_round) if n == k]
            alpha = fitted_alpha(sum(full) / len(full), k)
            estimate = estimate_speedup(alpha, k, call_costs(calls["decode"], calls["verify"], calls["draft"], k))
            speedup = statistics.median(ratios)
            same = all(g.tokens == b.tokens for g, b in zip(gens, base))
            best = max(best, (speedup, k))
            print(f"| {k} | {acceptance:.2f} | {accepted / rounds:.2f} | {statistics.median(rates):.1f} | {speedup:.2f}x | "
                  f"{estimate:.2f}x | {speedup / estimate:.2f} | {same} |")
        print(f"best: k={best[1]} at {best[0]:.2f}x (target >= 1.5x)")
        draft_free(folder, manifest, target, prompts, base, args)


DRAFT_FREE = [("lookahead", 4, 4, 16), ("lookahead", 4, 2, 8), ("lookahead", 3, 8, 24), ("prompt-lookup", 4, 1, 8),
              ("prompt-lookup", 2, 1, 4)]  # (mode, n-gram, branches, tokens)


def draft_free(folder, manifest, target, prompts, base, args) -> None:
    """Lookahead on the target's tree variant and prompt lookup on the target itself; the round model's estimate is
    tokens per target call × (a decode call's time / a draft-free call's time), both medians of the calls made."""
    tree = open_decoder(folder, manifest, "target_tree", threads=args.target_threads) \
        if manifest["target"].get("tree") else None
    print("\ndraft-free, the target alone (no draft model)")
    print("| mode | n-gram | branches | tokens | acceptance | tokens/target call | tok/s | target-only tok/s | speedup | "
          "estimate | measured / estimate | lossless |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, ngram, branches, tokens in DRAFT_FREE:
        decoder = tree if mode == "lookahead" else target
        if decoder is None:
            continue
        generate_draft_free(decoder, prompts[0], 16, mode, ngram, branches, tokens)  # warm-up
        ratios, rates, plain_rates, decode_calls, mode_calls = [], [], [], [], []
        for _ in range(args.rounds):
            mark = len(target.history)
            plain = [generate_target(target, p, args.max_new_tokens) for p in prompts]
            decode_calls += target.history[mark:]
            mark = len(decoder.history)
            gens = [generate_draft_free(decoder, p, args.max_new_tokens, mode, ngram, branches, tokens) for p in prompts]
            mode_calls += decoder.history[mark:]
            rates.append(sum(len(g.tokens) for g in gens) / sum(g.decode_s for g in gens))
            plain_rates.append(sum(len(g.tokens) for g in plain) / sum(g.decode_s for g in plain))
            ratios.append(rates[-1] / plain_rates[-1])
        new, rounds = sum(len(g.tokens) for g in gens), sum(g.rounds for g in gens)
        proposed, accepted = sum(g.proposed for g in gens), sum(g.accepted for g in gens)
        per_call = new / rounds
        t_decode = statistics.median(s for n, s in decode_calls if n == 1)
        t_call = statistics.median(s for n, s in mode_calls[-rounds:])
        estimate = per_call * t_decode / t_call
        speedup = statistics.median(ratios)
        same = all(g.tokens == b.tokens for g, b in zip(gens, base))
        print(f"| {mode} | {ngram} | {branches if mode == 'lookahead' else 1} | {tokens} | "
              f"{accepted / proposed if proposed else 0:.2f} | {per_call:.2f} | {statistics.median(rates):.1f} | "
              f"{statistics.median(plain_rates):.1f} | "
              f"{speedup:.2f}x | {estimate:.2f}x | {speedup / estimate:.2f} | {same} |")
    print("target: lookahead >= 1.3x target-only")


if __name__ == "__main__":
    main()
