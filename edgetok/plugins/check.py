"""`edgetok plugins check`: every plugin's kernels against its reference, on the spec's random and
adversarial cases — under Triton's interpreter on a CPU, compiled for real on a GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgetok.errors import EdgetokError

TOLERANCE = 1e-5  # relative to the largest reference value of each output


@dataclass
class KernelResult:
    plugin: str
    kernel: str
    case: str
    # floats: max |got - want| relative to the largest expected value; integers: mismatches; inf: another shape
    # (a data-dependent output whose size the kernels counted wrong)
    error: float
    exact: bool  # an integer result (indices, ranks): must match exactly
    passed: bool


def use_device(device: str) -> None:
    """Select where kernels run; must happen before Triton is imported (it reads TRITON_INTERPRET then)."""
    if device not in ("cpu", "cuda"):
        raise EdgetokError(f"--device {device!r} is unknown; choose cpu (Triton's interpreter) or cuda")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise EdgetokError("--device cuda with TRITON_INTERPRET=1 set would interpret, not run the kernels; unset it")


def _compare(got, want, exact: bool) -> float:
    if got.shape != want.shape:
        return float("inf")
    if exact:
        return float((got != want).sum())
    return float(np.abs(got - want).max(initial=0.0)) / max(float(np.abs(want).max(initial=0.0)), 1.0)


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
            got, regions = kernels.run_torch(spec, [torch.from_numpy(a).to(device) for a in inputs], fields,
                                             scratch_regions=True)
            got = dict(zip(want, (g.cpu().numpy() for g in got)))
            shapes = [tuple(a.shape) for a in inputs]
            for launch in kernels.module(spec).plan(shapes, fields).launches:
                errors = []
                for written in launch.kernel.writes:
                    if written in want:  # data-dependent outputs come cut to the size the kernels counted
                        exact = np.issubdtype(want[written].dtype, np.integer)  # a size tensor: exactly
                        errors.append((_compare(got[written], want[written], exact), exact))
                    elif written in steps:
                        expected = steps[written]
                        exact = bool(expected) and np.issubdtype(expected[0].dtype, np.integer)
                        errors.append((_compare(*_per_sample(regions[written].cpu().numpy(), expected), exact), exact))
                error, exact = max(errors, key=lambda e: e[0]) if errors else (0.0, False)
                ok = error == 0 if exact else error <= TOLERANCE
                results.append(KernelResult(name, launch.kernel.name, label, error, exact, ok))
    return results


def _count(error: float) -> str:
    return "all (other shape)" if error == float("inf") else str(int(error))


def summary(results: list[KernelResult]) -> str:
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import get

    lines = []
    for plugin in dict.fromkeys(r.plugin for r in results):
        mine = [r for r in results if r.plugin == plugin]
        cases = len(dict.fromkeys(r.case for r in mine))
        failed = [r for r in mine if not r.passed]
        lines.append(f"{plugin}: {cases - len(dict.fromkeys(r.case for r in failed))}/{cases} cases match the reference "
                     f"(tolerance {TOLERANCE:g} relative; indices exact)")
        for kernel in [k.name for k in kernels.module(get(plugin)).KERNELS if any(r.kernel == k.name for r in mine)]:
            runs = [r for r in mine if r.kernel == kernel]
            worst = max(runs, key=lambda r: r.error)
            measure = (f"{_count(worst.error)} mismatched indices" if worst.exact else f"max error {worst.error:.2e}")
            lines.append(f"  {kernel:<12} {measure} over {len(runs)} runs (worst: {worst.case})")
        lines += [f"  MISMATCH {r.kernel} on {r.case}: "
                  + (f"{_count(r.error)} indices differ" if r.exact else f"error {r.error:.3g}") for r in failed]
    return "\n".join(lines)
