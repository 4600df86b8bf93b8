"""edgetok.plugins.agreement, the comparison every GPU check makes, held to both sides on a CPU: a decision
flipped at a near tie and values from inputs x30 pass (both sides are right there); a decision flipped where
the reference's margin is clear and a real error in a value fail."""

import numpy as np
import pytest

from edgetok.plugins import agreement as ag
from edgetok.plugins import spec as plugin_spec


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
    margin = ag.token_merge_margin(metric, 8, 1, 1)
    assert margin[0] > 1e-4 and margin[1] <= ag.noise(1.0)
    assert (ag.token_merge_margin(metric, 0, 1, 1) == np.inf).all()
