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
class CaseResult:
    plugin: str
    case: str
    max_abs_err: float
    decisions_match: bool  # output shapes agree and no row landed elsewhere (err within tolerance)
    passed: bool


def use_device(device: str) -> None:
    """Select where kernels run; must happen before Triton is imported (it reads TRITON_INTERPRET then)."""
    if device not in ("cpu", "cuda"):
        raise EdgetokError(f"--device {device!r} is unknown; choose cpu (Triton's interpreter) or cuda")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise EdgetokError("--device cuda with TRITON_INTERPRET=1 set would interpret, not run the kernels; unset it")


def run_checks(device: str, say: Callable[[str], None] = lambda s: None, seed: int = 0) -> list[CaseResult]:
    use_device(device)
    import torch

    from edgetok.plugins import kernels
    from edgetok.plugins.spec import run_reference, specs

    if device == "cuda" and not torch.cuda.is_available():
        raise EdgetokError("--device cuda: no CUDA GPU is visible here; use --device cpu (Triton's interpreter)")
    results = []
    for name, spec in specs().items():
        cases = spec.cases(np.random.default_rng(seed)) if spec.cases else []
        say(f"{name}: {len(cases)} cases on {'the interpreter' if device == 'cpu' else torch.cuda.get_device_name()}")
        for label, inputs, fields in cases:
            want = run_reference(name, inputs, fields)
            got = kernels.run_torch(spec, [torch.from_numpy(a).to(device) for a in inputs], fields)
            got = [g.cpu().numpy() for g in got]
            shapes_ok = all(g.shape == w.shape for g, w in zip(got, want))
            err = max(float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1.0) for g, w in zip(got, want)) \
                if shapes_ok else float("inf")
            ok = shapes_ok and err <= TOLERANCE
            results.append(CaseResult(name, label, err, shapes_ok, ok))
    return results


def summary(results: list[CaseResult]) -> str:
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import get

    lines = []
    for plugin in dict.fromkeys(r.plugin for r in results):
        mine = [r for r in results if r.plugin == plugin]
        worst = max(mine, key=lambda r: r.max_abs_err)
        failed = [r for r in mine if not r.passed]
        names = ", ".join(k.name for k in kernels.module(get(plugin)).KERNELS)
        lines.append(f"{plugin} ({names}): {len(mine) - len(failed)}/{len(mine)} cases match the reference; max error (relative) "
                     f"{worst.max_abs_err:.2e} ({worst.case}), tolerance {TOLERANCE:g}")
        lines += [f"  MISMATCH {r.case}: error {r.max_abs_err:.3g}" for r in failed]
    return "\n".join(lines)
