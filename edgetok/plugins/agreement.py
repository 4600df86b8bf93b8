"""When a GPU's float32 result agrees with its reference: decisions wherever the reference's own margin is
clear of float32 noise, values to a tolerance scaled to the magnitude of what was summed.

Why not exact, and why not one fixed tolerance: a GPU sums in another order than numpy does (tiles, fused
multiply-adds, tree reductions), so a dot product differs by some ulps of the sum of its terms' magnitudes.

- A decision (an argmax, a rank, kept or dropped at a boundary) taken on scores whose reference margin is
  within that noise can come out either way with both sides right; one with a clear margin cannot.
- A value derived from inputs 30 times larger carries 30 times the noise (a logit from them, 900 times), so
  a tolerance fixed for unit-sized inputs (1e-5) fails correct kernels as soon as the inputs are not.

Both checks still refuse a real error: a decision that differs where the reference's margin is clear, a value
off by more than the noise of its magnitude. Used by the GPU checks (`plugins check --device cuda`, through each
spec's ``margins`` hook; bench/*_cuda.py; tests/test_plugin_kernels.py when TRITON_INTERPRET=0 on CUDA);
tests/test_agreement.py holds them to both sides on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)
# eps of the summed magnitude that a reordered float32 computation may differ by. Measured for SizeBiasedAttention
# (its kernels under the interpreter, and numpy in float32, against float64; every spec case at inputs x1 and
# x30): at most 0.31 eps x the largest logit magnitude. 4 leaves a GPU's other orders and fused multiply-adds
# 13 times that; at unit-sized inputs (magnitude ~10) it stays below TOLERANCE, which then decides.
NOISE_ULPS = 4
TOLERANCE = 1e-5  # values at unit-sized inputs: relative to the largest reference value (or 1)


def noise(magnitude):
    """The float32 noise of a result summed from terms whose absolute values add up to ``magnitude``."""
    return NOISE_ULPS * EPS32 * np.asarray(magnitude, dtype=np.float64)


def dot_magnitude(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> float:
    """The largest sum of absolute products behind any entry of a @ bᵀ · scale (batched over leading axes):
    the magnitude a reordered sum's error scales with, e.g. attention's logits from q and k. Torch tensors
    are multiplied where they are (a GPU batch of logits is slow in numpy)."""
    if hasattr(a, "detach"):
        return float((a.detach().abs().float() @ b.detach().abs().float().transpose(-1, -2)).amax()) * abs(scale)
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    return float((a @ np.swapaxes(b, -1, -2)).max(initial=0.0) * abs(scale))


# ------------------------------------------------------------------------------------------------ values
def value_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to the largest reference value (or 1); inf for another shape."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max(initial=0.0)) / max(float(np.abs(want).max(initial=0.0)), 1.0)


def value_tolerance(magnitude: float = 0.0) -> float:
    """TOLERANCE, or float32's noise at ``magnitude`` (see dot_magnitude) where that is larger."""
    return max(TOLERANCE, float(noise(magnitude)))


def values_agree(got: np.ndarray, want: np.ndarray, magnitude: float = 0.0) -> bool:
    return value_error(got, want) <= value_tolerance(magnitude)


# ------------------------------------------------------------------------------------------------ decisions
@dataclass(frozen=True)
class Decisions:
    differ: int  # decisions the two sides took differently
    near_ties: int  # of those, where the reference's margin was within float32 noise: both right

    @property
    def wrong(self) -> int:
        return self.differ - self.near_ties

    @property
    def agree(self) -> bool:
        return self.wrong == 0


def compare_decisions(got: np.ndarray, want: np.ndarray, margin: np.ndarray, tie) -> Decisions:
    """Decisions (indices, flags) against the reference's, each with the reference's margin (how far its
    score was from deciding otherwise: argmax_margin, boundary_margin, or |score - threshold|). ``tie``: the
    margin up to which either decision is right, noise(magnitude of the scores' terms), or, where the scores'
    difference between the two sides is measured (d at most), 2d (a scalar or one per decision). Exact ties
    (margin 0) are no near ties: see near_tie."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise ValueError(f"decisions of shape {list(got.shape)} against the reference's {list(want.shape)}")
    differ = got != want
    return Decisions(int(differ.sum()), int((differ & near_tie(margin, tie)).sum()))


def near_tie(margin, tie) -> np.ndarray:
    """Where a decision can come out either way with both sides right: its margin within ``tie`` but not 0.
    A margin of exactly 0 is an exact tie of the reference's scores (in float64), which only constructed
    inputs have (duplicated tokens or blocks, keys along a few axes), and a GPU computes them equal too: the
    tie rule (the lower index first) decides on both sides, and a flip there is wrong."""
    margin = np.asarray(margin, np.float64)
    return (margin > 0) & (margin <= np.asarray(tie, np.float64))


def least_margin(*margins) -> float:
    """The smallest margin among ``margins`` (arrays or numbers) that is not an exact tie; inf if none: the
    margin of a decision that rests on all of them (an index list a near tie anywhere in it may shift)."""
    found = np.concatenate([np.asarray(m, np.float64).reshape(-1) for m in margins] or [np.zeros(0)])
    return float(found[found > 0].min(initial=np.inf))


def argmax_margin(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Per row: the best score minus the second best (0 where they tie); inf with a single candidate."""
    scores = np.asarray(scores, np.float64)
    if scores.shape[axis] < 2:
        return np.full(np.delete(scores.shape, axis % scores.ndim), np.inf)
    top = -np.sort(-scores, axis=axis)
    return np.take(top, 0, axis=axis) - np.take(top, 1, axis=axis)


def boundary_margin(scores: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """Per score: its distance to the boundary between the k best and the rest (midway between the k-th and
    the (k+1)-th best), i.e. how far it is from moving across; inf when every score or none is kept."""
    scores = np.asarray(scores, np.float64)
    n = scores.shape[axis]
    if not 0 < k < n:
        return np.full(scores.shape, np.inf)
    top = -np.sort(-scores, axis=axis)
    boundary = (np.take(top, [k - 1], axis=axis) + np.take(top, [k], axis=axis)) / 2
    return np.abs(scores - boundary)


def order_margin(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Per score: its distance to the nearest other score of its row, i.e. how far its rank is from changing
    (ranks move only by two scores swapping); inf alone in its row."""
    scores = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    order = np.argsort(scores, axis=-1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=-1)
    gaps = np.diff(ranked, axis=-1)
    pad = np.full(ranked.shape[:-1] + (1,), np.inf)
    nearest = np.minimum(np.concatenate([pad, gaps], axis=-1), np.concatenate([gaps, pad], axis=-1))
    margin = np.empty_like(nearest)
    np.put_along_axis(margin, order, nearest, axis=-1)
    return np.moveaxis(margin, -1, axis)


# ------------------------------------------------------------------------------------------------ per case
@dataclass(frozen=True)
class Margins:
    """What comparing a GPU's results for one call with the reference's takes beyond the results: each
    plugin spec's ``margins`` hook computes it from the call (`plugins check --device cuda`).

    ``decisions``: per integer result (an output, or a scratch region as the spec's intermediates list it, one
    array per sample), the reference's margin of each entry, laid out like the result, and the ``tie`` it is
    compared with (see compare_decisions). ``magnitude``: what the float results are summed from
    (value_tolerance). ``settled``: per sample [B], whether every decision it rests on is clear of noise; its
    float outputs, computed after the decisions, differ as much as a flipped decision makes them, so only the
    settled samples' are compared (None: all)."""
    decisions: dict
    magnitude: float = 0.0
    settled: np.ndarray | None = None
