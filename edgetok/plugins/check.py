"""`edgetok plugins check`: every plugin's kernels against its reference, on the spec's random and
adversarial cases — under Triton's interpreter on a CPU, compiled for real on a GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgetok.errors import EdgetokError
from edgetok.plugins.agreement import TOLERANCE, Margins, compare_decisions, value_error, value_tolerance


@dataclass
class KernelResult:
    plugin: str
    kernel: str
    case: str
    # floats: max |got - want| relative to the largest expected value; integers: mismatches (on a GPU, those
    # where the reference's margin is clear); inf: another shape (a data-dependent output whose size the
    # kernels counted wrong)
    error: float
    exact: bool  # an integer result (indices, ranks): must match exactly, near ties aside on a GPU
    passed: bool
    near_ties: int = 0  # on a GPU: decisions that differ where the reference's margin is within float32 noise


def use_device(device: str) -> None:
    """Select where kernels run; must happen before Triton is imported (it reads TRITON_INTERPRET then)."""
    if device not in ("cpu", "cuda"):
        raise EdgetokError(f"--device {device!r} is unknown; choose cpu (Triton's interpreter) or cuda")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise EdgetokError("--device cuda with TRITON_INTERPRET=1 set would interpret, not run the kernels; unset it")


def compare(got: np.ndarray, want: np.ndarray, exact: bool, margin=None, tie: float = 0.0,
            magnitude: float = 0.0) -> tuple[float, int, bool]:
    """(error, near ties, passed) of one result against the reference's. Floats: the relative error, within
    value_tolerance(magnitude) (TOLERANCE at 0). Integers without a margin: every difference counts (the
    interpreter sums in numpy's order; some decisions rest on no arithmetic). With the reference's margin
    per entry (on a GPU, from the spec's margins hook): differences at near ties are counted apart, both
    sides right; the others count."""
    if got.shape != want.shape:
        return float("inf"), 0, False
    if not exact:
        error = value_error(got, want)
        return error, 0, error <= value_tolerance(magnitude)
    if margin is None:
        error = float((got != want).sum())
        return error, 0, error == 0
    decisions = compare_decisions(got, want, margin, tie)
    return float(decisions.wrong), decisions.near_ties, decisions.agree


def _allowance(margins: Margins | None, name: str) -> dict:
    """compare()'s margin, tie and magnitude for result ``name``: none under the interpreter (exact)."""
    if margins is None:
        return {}
    if name not in margins.decisions:
        return {"magnitude": margins.magnitude}
    margin, tie = margins.decisions[name]
    if isinstance(margin, list):  # per sample, as the intermediates list them: joined as _per_sample joins them
        margin = np.concatenate([np.asarray(m, np.float64).reshape(-1) for m in margin] or [np.zeros(0)])
    return {"margin": margin, "tie": tie, "magnitude": margins.magnitude}


def _per_sample(region, expected: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(got, want): the leading entries of each sample's slice of a flat scratch region, as many as the
    reference lists for that sample (which may differ per sample: TokenPrune's counts), joined."""
    if not expected:
        return region[:0], region[:0]
    rows = region.reshape(len(expected), -1)
    return (np.concatenate([rows[b, :len(e)] for b, e in enumerate(expected)]),
            np.concatenate([np.asarray(e).reshape(-1) for e in expected]))


def run_checks(device: str, say: Callable[[str], None] = lambda s: None, seed: int = 0) -> list[KernelResult]:
    """Each kernel of each plugin on the spec's cases: the scratch it writes against the reference's
    intermediates, the outputs against the reference's outputs."""
    use_device(device)
    try:
        import torch

        from edgetok.plugins import kernels
    except ImportError as exc:
        raise EdgetokError(f"edgetok plugins check runs the Triton kernels, which needs {exc.name} (not installed "
                           "here; a Jetson has no Triton): run it on a machine with torch and Triton") from None
    from edgetok.plugins.spec import run_reference, specs

    if device == "cuda" and not torch.cuda.is_available():
        raise EdgetokError("--device cuda: no CUDA GPU is visible here; use --device cpu (Triton's interpreter)")
    results = []
    for name, spec in specs().items():
        cases = spec.cases(np.random.default_rng(seed)) if spec.cases else []
        say(f"{name}: {len(cases)} cases on {'the interpreter' if device == 'cpu' else torch.cuda.get_device_name()}")
        for label, inputs, fields in cases:
            fields = spec.resolve(fields)
            want = dict(zip((t.name for t in spec.outputs), run_reference(name, inputs, fields)))
            steps = spec.intermediates(inputs, fields) if spec.intermediates else {}
            # a GPU sums in another order than numpy: decisions at near ties may flip, values carry the noise
            # of their magnitude (edgetok.plugins.agreement); the interpreter sums as numpy does: exact
            margins = spec.margins(inputs, fields) if device == "cuda" and spec.margins else None
            got, regions = kernels.run_torch(spec, [torch.from_numpy(a).to(device) for a in inputs], fields,
                                             scratch_regions=True)
            got = dict(zip(want, (g.cpu().numpy() for g in got)))
            shapes = [tuple(a.shape) for a in inputs]
            for launch in kernels.module(spec).plan(shapes, fields).launches:
                compared = []  # (error, near ties, passed, exact)
                for written in launch.kernel.writes:
                    if written in want:  # data-dependent outputs come cut to the size the kernels counted
                        exact = np.issubdtype(want[written].dtype, np.integer)  # a size tensor: exactly
                        g, w = got[written], want[written]
                        if margins is not None and margins.settled is not None and not exact:
                            g, w = g[margins.settled], w[margins.settled]  # the others follow another decision
                        compared.append((*compare(g, w, exact, **_allowance(margins, written)), exact))
                    elif written in steps:
                        expected = steps[written]
                        exact = bool(expected) and np.issubdtype(expected[0].dtype, np.integer)
                        compared.append((*compare(*_per_sample(regions[written].cpu().numpy(), expected), exact,
                                                  **_allowance(margins, written)), exact))
                failed = [c for c in compared if not c[2]]
                error, _, ok, exact = max(failed or compared, key=lambda c: c[0]) if compared else (0.0, 0, True, False)
                results.append(KernelResult(name, launch.kernel.name, label, error, exact, ok,
                                            sum(c[1] for c in compared)))
    return results


def _count(error: float) -> str:
    return "all (other shape)" if error == float("inf") else str(int(error))


def _mismatched(error: float) -> str:
    return f"{_count(error)} mismatched " + ("index" if error == 1 else "indices")


def _differ(error: float) -> str:
    return f"{_count(error)} " + ("index differs" if error == 1 else "indices differ")


def summary(results: list[KernelResult], device: str = "cpu") -> str:
    """Per plugin, the cases that match; per kernel, one row of aligned columns (worst error and, on a GPU,
    the decisions flipped at near ties, runs, worst case)."""
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import get

    lines: list[str | tuple[str, ...]] = []  # tuples: kernel rows, padded to common widths below
    for plugin in dict.fromkeys(r.plugin for r in results):
        mine = [r for r in results if r.plugin == plugin]
        cases = len(dict.fromkeys(r.case for r in mine))
        failed = [r for r in mine if not r.passed]
        lines.append(f"{plugin}: {cases - len(dict.fromkeys(r.case for r in failed))}/{cases} cases match the reference "
                     + (f"(tolerance {TOLERANCE:g} relative; indices exact)" if device == "cpu" else
                        f"(tolerance {TOLERANCE:g} relative, or float32 noise at the inputs' magnitude; indices "
                        "exact but at near ties of the reference's scores)"))
        for kernel in [k.name for k in kernels.module(get(plugin)).KERNELS if any(r.kernel == k.name for r in mine)]:
            runs = [r for r in mine if r.kernel == kernel]
            worst = max(runs, key=lambda r: r.error)
            measure = _mismatched(worst.error) if worst.exact else f"max error {worst.error:.2e}"
            ties = sum(r.near_ties for r in runs)
            if ties:
                measure += f", {ties} near " + ("tie" if ties == 1 else "ties") + " flipped"
            lines.append((kernel, measure, f"over {len(runs)} run" + ("" if len(runs) == 1 else "s"),
                          f"(worst: {worst.case})"))
        lines += [f"  MISMATCH {r.kernel} on {r.case}: "
                  + (_differ(r.error) if r.exact else f"error {r.error:.3g}") for r in failed]
    rows = [line for line in lines if isinstance(line, tuple)]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    return "\n".join(line if isinstance(line, str) else
                     "  " + "  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths)) + "  " + line[3]
                     for line in lines)
