"""Build options shared by every backend, and the parsing of shape profiles from the command line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgetok.errors import EdgetokError

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class BuildOptions:
    onnx: str
    output: str | None = None
    backend: str = "auto"
    precision: str = "fp32"
    batch: str | None = None  # "MIN:OPT:MAX"
    shapes: list[str] = field(default_factory=list)  # "name:1x3x224x224:8x3x224x224:32x3x224x224"
    workspace: int | None = None  # MiB
    opt_level: int | None = None
    targets: list[str] = field(default_factory=list)  # ["sm86", "sm120"]
    timing_cache: str | None = None
    plugins: list[str] = field(default_factory=list)
    dla_core: int | None = None
    # edgetok's plugin nodes: the C++ library (this path, else the one `edgetok plugins build --lib` put in its
    # default place) unless python_plugins; serialize_plugins puts the library into the engine
    plugin_lib: str | None = None
    python_plugins: bool = False
    serialize_plugins: bool = False


@dataclass
class InputProfile:
    name: str
    min: list[int]
    opt: list[int]
    max: list[int]

    def as_dict(self) -> dict:
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}


def parse_batch(spec: str) -> tuple[int, int, int]:
    parts = spec.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise EdgetokError(f"--batch {spec!r} must be MIN:OPT:MAX (e.g. 1:8:32) or one number")
    low, opt, high = values
    if not 1 <= low <= opt <= high:
        raise EdgetokError(f"--batch {spec} must satisfy 1 <= MIN <= OPT <= MAX")
    return low, opt, high


def _dims(text: str, spec: str) -> list[int]:
    if not re.fullmatch(r"\d+(x\d+)*", text):
        raise EdgetokError(f"--shapes {spec!r}: {text!r} is not a shape like 8x3x224x224")
    return [int(d) for d in text.split("x")]


def parse_shapes(spec: str) -> InputProfile:
    """trtexec-style ``name:MIN:OPT:MAX`` with each shape written ``1x3x224x224``."""
    parts = spec.split(":")
    if len(parts) < 4:
        raise EdgetokError(f"--shapes {spec!r} must be name:MINxDIMS:OPTxDIMS:MAXxDIMS, e.g. x:1x3x224x224:8x3x224x224:32x3x224x224")
    name, low, opt, high = ":".join(parts[:-3]), *parts[-3:]
    low, opt, high = _dims(low, spec), _dims(opt, spec), _dims(high, spec)
    if not len(low) == len(opt) == len(high) or any(not a <= b <= c for a, b, c in zip(low, opt, high)):
        raise EdgetokError(f"--shapes {spec!r}: MIN <= OPT <= MAX must hold in every dimension")
    return InputProfile(name, low, opt, high)


def parse_targets(values: list[str]) -> list[str]:
    targets = []
    for value in values:
        for t in value.replace(" ", "").split(","):
            if t:
                targets.append(t.lower())
    return targets
