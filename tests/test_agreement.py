"""edgetok.plugins.agreement, the comparison every GPU check makes, held to both sides on a CPU: a decision
flipped at a near tie and values from inputs x30 pass (both sides are right there); a decision flipped where
the reference's margin is clear and a real error in a value fail."""

import numpy as np
import pytest

from edgetok.plugins import agreement as ag
from edgetok.plugins import spec as plugin_spec
from edgetok.plugins.token_merge import token_merge_margin


def test_a_near_tie_flip_is_accepted_and_a_clear_wrong_decision_refused():
    scores = np.array([[0.5, 0.5 - 3e-7, 0.1],  # best and second best 3e-7 apart: within float32 noise of 1
                       [0.9, 0.2, 0.1]])
    want = scores.argmax(-1)
    margin = ag.argmax_margin(scores)
    assert margin[0] == pytest.approx(3e-7) and margin[1] == pytest.approx(0.7)
    flipped = ag.compare_decisions(np.array([1, 0]), want, margin, ag.noise(1.0))
    assert (flipped.differ, flipped.near_ties, flipped.agree) == (1, 1, True)
    wrong = ag.compare_decisions(np.array([0, 1]), want, margin, ag.noise(1.0))
    assert (wrong.differ, wrong.wrong, wrong.agree) == (1, 1, False)
    # the same 3e-7 gap between scores summed from magnitudes 1e-3 is no tie: clearly decided
    assert not ag.compare_decisions(np.array([1, 0]), want, margin, ag.noise(1e-3)).agree


def test_kept_sets_and_ranks_flip_only_at_their_boundary():
    scores = np.array([0.9, 0.7, 0.6 + 1e-7, 0.6, 0.2])
    kept = np.zeros(5, bool)
    kept[:3] = True  # the 3 best
    boundary = ag.boundary_margin(scores, 3)
    swapped = kept.copy()
    swapped[[2, 3]] = [False, True]  # the 3rd and 4th, 1e-7 apart, swapped: a near tie
    assert ag.compare_decisions(swapped, kept, boundary, ag.noise(1.0)).agree
    wrong = kept.copy()
    wrong[[0, 3]] = [False, True]  # the best dropped: clearly wrong
    result = ag.compare_decisions(wrong, kept, boundary, ag.noise(1.0))
    assert (result.differ, result.near_ties) == (2, 1) and not result.agree
    ranks = np.argsort(np.argsort(-scores))
    near = ag.order_margin(scores)
    assert near == pytest.approx([0.2, 0.1, 1e-7, 1e-7, 0.4])
    assert ag.compare_decisions(ranks[[0, 1, 3, 2, 4]], ranks, near, ag.noise(1.0)).agree
    assert not ag.compare_decisions(ranks[[1, 0, 2, 3, 4]], ranks, near, ag.noise(1.0)).agree


def test_values_from_inputs_x30_are_accepted_and_a_real_error_refused():
    """SizeBiasedAttention in float32 numpy (another summation order) against float64: at inputs x30 (logits
    x900) both are right, yet a tolerance fixed for unit-sized inputs fails it."""
    spec = plugin_spec.get("SizeBiasedAttention")
    inputs, _ = {label: (x, f) for label, x, f in spec.cases(np.random.default_rng(0))}["deit-s N=197 H=6 D=64"]
    for times in (1, 30):
        big = [x * np.float32(times) for x in inputs[:3]] + [inputs[3]]
        want = plugin_spec.run_reference("SizeBiasedAttention", [x.astype(np.float64) for x in big], {"scale": 0.0},
                                         any_float=True)[0]
        got = plugin_spec.run_reference("SizeBiasedAttention", big, {"scale": 0.0})[0]
        magnitude = ag.dot_magnitude(big[0], big[1], big[0].shape[3] ** -0.5)
        assert (ag.value_error(got, want) > ag.TOLERANCE) == (times == 30)
        assert ag.values_agree(got, want, magnitude)
        wrong = got.copy()
        wrong[0, 1, 5] += 0.01 * np.abs(want).max()  # one row off by 1 % of the largest value: a real error
        assert not ag.values_agree(wrong, want, magnitude)
    assert ag.value_tolerance(0.0) == ag.TOLERANCE and ag.value_error(got[:, :1], want) == float("inf")


def test_token_merge_margin_finds_the_near_tie_a_sample_rests_on():
    rng = np.random.default_rng(0)
    metric = rng.standard_normal((2, 17, 8))
    a = metric[1, 2] / np.linalg.norm(metric[1, 2])  # sample 1: A token 2's two best matches (B 3 and 5) tie
    metric[1, 3] = a * 2.0
    metric[1, 5] = a * 3.0 + 1e-9 * rng.standard_normal(8)
    margin = token_merge_margin(metric, 8, 1, 1)
    assert margin[0] > 1e-4 and margin[1] <= ag.noise(1.0)
    assert (token_merge_margin(metric, 0, 1, 1) == np.inf).all()


# ---- `plugins check --device cuda`: each spec's margins hook, through check's compare ----------------------
def _near_tie_metric():
    """Two samples of 17 tokens; in sample 1, A token 0 (position 2) has two best matches, B tokens 1 and 2
    (positions 3 and 5), whose cosines differ by ~1e-7: within float32 noise of 1, yet not an exact tie."""
    rng = np.random.default_rng(0)
    metric = rng.standard_normal((2, 17, 8))
    a = metric[1, 2] / np.linalg.norm(metric[1, 2])
    other = metric[1, 7] - (metric[1, 7] @ a) * a
    metric[1, 3] = a * 2.0
    metric[1, 5] = (a + 4.5e-4 * other / np.linalg.norm(other)) * 3.0
    x = rng.standard_normal((2, 17, 8)).astype(np.float32)
    return [x, metric.astype(np.float32), np.ones((2, 17, 1), np.float32)]


def test_check_accepts_a_near_tie_flip_on_a_gpu_only_and_a_wrong_index_nowhere():
    from edgetok.plugins import check

    spec = plugin_spec.get("TokenMerge")
    inputs, fields = _near_tie_metric(), spec.resolve({"r": 4, "prefix": 1, "class_token": 1})
    want = np.concatenate(spec.intermediates(inputs, fields)["match"])
    margins = spec.margins(inputs, fields)
    gpu = check._allowance(margins, "match")  # what run_checks passes on --device cuda; {} on the interpreter
    assert 0 < gpu["margin"][8] <= gpu["tie"] and margins.settled.tolist() == [True, False]
    near = want.copy()
    near[8] = 3 - want[8]  # sample 1's A token 0 takes the other of its two near-equal best matches
    assert check.compare(near, want, True, **gpu) == (0.0, 1, True)
    assert check.compare(near, want, True, **check._allowance(None, "match")) == (1.0, 0, False)
    wrong = want.copy()
    wrong[3] = (want[3] + 1) % 8  # sample 0's A token 3 matched elsewhere, its margin clear of noise
    assert gpu["margin"][3] > 100 * gpu["tie"]
    assert check.compare(wrong, want, True, **gpu) == (1.0, 0, False)
    assert check.compare(wrong, want, True) == (1.0, 0, False)
    # values: a GPU's tolerance follows the magnitude the spec's hook names; a real error still fails
    attention = plugin_spec.get("SizeBiasedAttention")
    q, k, v, size = {label: x for label, x, _ in attention.cases(np.random.default_rng(0))}["N=17 D=64 (N below a tile)"]
    big = [q * np.float32(30), k * np.float32(30), v, size]
    magnitude = attention.margins(big, {"scale": 0.0}).magnitude
    out = plugin_spec.run_reference("SizeBiasedAttention", big, {"scale": 0.0})[0]
    off = out + np.float32(3e-5) * np.abs(out).max()
    assert check.compare(off, out, False, magnitude=magnitude)[2] and not check.compare(off, out, False)[2]
    assert not check.compare(out + 0.01 * np.abs(out).max(), out, False, magnitude=magnitude)[2]


def test_an_exact_tie_is_held_to_the_tie_rule_on_a_gpu_too():
    """Keys along three axes: cosines exactly 0 or 1 in any order of summation; the lower index wins on both
    sides, so a flip there is wrong, not a near tie."""
    from edgetok.plugins import check

    spec = plugin_spec.get("TokenMerge")
    label, inputs, fields = next(c for c in spec.cases(np.random.default_rng(0)) if c[0].startswith("ties") and "r=4" in c[0])
    fields = spec.resolve(fields)
    want = np.concatenate(spec.intermediates(inputs, fields)["match"])
    gpu = check._allowance(spec.margins(inputs, fields), "match")
    tied = np.flatnonzero(gpu["margin"] == 0)
    assert len(tied)
    flipped = want.copy()
    flipped[tied[0]] = (want[tied[0]] + 1) % 8
    assert not check.compare(flipped, want, True, **gpu)[2]


@pytest.mark.parametrize("name", ["BlockSparseAttention", "SizeBiasedAttention", "TokenMerge", "TokenPrune"])
def test_margins_hooks_fit_the_results_they_qualify(name):
    """Every decision the spec's hook gives margins for is laid out as its result (an output, or a scratch
    region per sample); no spec case rests on a near tie, so a GPU check compares all of every case.
    TokenPrune has no hook: its decisions are IEEE comparisons of its inputs, exact on any device."""
    spec = plugin_spec.get(name)
    assert (spec.margins is None) == (name == "TokenPrune")
    if spec.margins is None:
        return
    for label, inputs, fields in spec.cases(np.random.default_rng(0)):
        fields = spec.resolve(fields)
        margins, steps = spec.margins(inputs, fields), spec.intermediates(inputs, fields)
        for result, (margin, tie) in margins.decisions.items():
            assert [m.size for m in margin] == [np.asarray(s).size for s in steps[result]], (label, result)
            assert np.issubdtype(steps[result][0].dtype, np.integer) and tie > 0
        assert margins.settled is None or (margins.settled.shape == (len(inputs[0]),) and margins.settled.all()), label
