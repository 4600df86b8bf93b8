"""What `edgetok tune` searches: derived from the method registry (edgetok.vit.methods) and the export,
quantize and build options, so a method added to the registry is searched without a change here.

A method's *amount* is its ``knob`` (what ``compare`` varies: ToMe's r, EViT's keep rate, GTP's P), bounded by
the settings the model can take; the method's other searchable options (those with a default: GTP's alpha,
graph and θ, Zero-TPrune's similarity share) are searched in their declared range or choices. A method without
a knob (ATS, dtome) has every searchable option searched. An option with no upper bound (dtome's r) is bounded
by the model (its non-prefix tokens over its depth), and a float without a declared range (ATS's budget) over
[default / 4, default].

Torch-free: the command line parses and refuses a bad list here before Ray, Optuna or torch loads; the bounds
that need the model (:func:`bounds`) are given the model's facts by the caller.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from edgetok.errors import EdgetokError
from edgetok.vit import methods as registry
from edgetok.vit.methods import Method, Option

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
ATTENTIONS = ("dense", "sparse")
PLUGINS = ("auto", "on", "off")
METRICS = ("top1", "agreement")
CPU = "cpu"
SPARSE_MASS = (0.8, 1.0)  # --attention sparse: the pooled attention mass each query block keeps (1: dense)
FP8_MIN_ARCH = 89  # quantize --mode fp8 needs SM 8.9+ (edgetok.workflows.quantize refuses below)


def _items(value: str, flag: str, example: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise EdgetokError(f"{flag} {value!r} is empty; give a comma-separated list, e.g. {example}")
    return list(dict.fromkeys(items))


def parse_methods(value: str | None, calibrate: str | None) -> tuple[str, ...]:
    """``--methods``: registered methods (``none``, the dense baseline, is always trial 0 and need not be
    named). Default: every method, dtome only with --calibrate (its thresholds are calibrated there)."""
    known = registry.names()
    if value is None:
        return tuple(m for m in known if m != "none" and (m != "dtome" or calibrate))
    chosen = _items(value, "--methods", "tome,evit")
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise EdgetokError(f"--methods {unknown[0]!r} is not a registered method; choose from {', '.join(known)} "
                           "(`edgetok methods` lists them)")
    if "dtome" in chosen and not calibrate:
        raise EdgetokError("--methods dtome needs --calibrate DIR: its per-block thresholds are calibrated on "
                           "training images (e.g. `edgetok data digits --split train`)")
    return tuple(m for m in chosen if m != "none")


def parse_target(value: str) -> str:
    """``cpu`` (ONNX Runtime here) or a GPU architecture ``smNN`` (a Ray custom resource of that name)."""
    if value == CPU or re.fullmatch(r"sm\d{2,3}", value):
        return value
    raise EdgetokError(f"--target {value!r} is neither cpu nor a GPU architecture such as sm87 (Orin), sm89, sm110 "
                       "(Thor): the Ray resource its devices offer")


def parse_precisions(value: str | None, target: str, calibrate: str | None) -> tuple[str, ...]:
    """``--precision``: fp32 and int8 for ``--target cpu`` (ONNX Runtime's CPU provider has no fast fp16 and no
    FP8); fp16, int8 and fp8 (SM 8.9+) for engines; int8 and fp8 need --calibrate."""
    if value is None:
        default = ["fp32"] + ([] if target == CPU else ["fp16"]) + (["int8"] if calibrate else [])
        return tuple(default)
    chosen = _items(value, "--precision", "fp32,int8")
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad:
        raise EdgetokError(f"--precision {bad[0]!r} is unknown; choose from {', '.join(PRECISIONS)}")
    if target == CPU and ({"fp16", "fp8"} & set(chosen)):
        which = sorted({"fp16", "fp8"} & set(chosen))[0]
        raise EdgetokError(f"--precision {which} needs an engine target (e.g. --target sm87): --target cpu profiles "
                           "with ONNX Runtime's CPU provider, which has no fast fp16 or FP8; search fp32,int8")
    if "fp8" in chosen and target != CPU and int(target[2:]) < FP8_MIN_ARCH:
        raise EdgetokError(f"--precision fp8 needs SM 8.9 or newer; --target {target} has no FP8 tensor cores: drop "
                           "fp8 (int8 is the 8-bit choice there)")
    quantized = [p for p in chosen if p in ("int8", "fp8")]
    if quantized and not calibrate:
        raise EdgetokError(f"--precision {quantized[0]} needs --calibrate DIR: training-style images to calibrate on "
                           "(not the --data images), e.g. from `edgetok data digits --split train`")
    return tuple(chosen)


def parse_attention(value: str) -> tuple[str, ...]:
    chosen = _items(value, "--attention", "dense,sparse")
    bad = [a for a in chosen if a not in ATTENTIONS]
    if bad:
        raise EdgetokError(f"--attention {bad[0]!r} is unknown; choose from {', '.join(ATTENTIONS)}")
    return tuple(chosen)


def plugin_choices(value: str, target: str) -> tuple[bool, ...]:
    """``--plugins``: on, off, or auto (searched both ways for an engine target; off for --target cpu, where
    ONNX Runtime runs the plugins' Python reference ops, a slower path that is not what a device runs)."""
    if value not in PLUGINS:
        raise EdgetokError(f"--plugins {value!r} is unknown; choose auto, on or off")
    return {"on": (True,), "off": (False,)}.get(value, (False,) if target == CPU else (False, True))


def parse_duration(value: str | None) -> float | None:
    """``--time 2h``: seconds from ``90s``, ``30m``, ``2h`` or ``1h30m`` (None: not given)."""
    if value is None:
        return None
    text = value.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([hms])", "", text).strip():
        raise EdgetokError(f"--time {value!r} is not a duration; give e.g. 90s, 30m, 2h or 1h30m")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not 0 < seconds < math.inf:
        raise EdgetokError(f"--time {value!r} must be longer than 0 s, e.g. 30m")
    return seconds


# ------------------------------------------------------------------------------------------ per method
def searched(method: Method) -> list[Option]:
    """The options a study varies for ``method``: its knob's keys (the amount) and its searchable options
    with a default; without a knob, every searchable option."""
    if method.knob is None:
        return [o for o in method.options if o.searchable and o.cli]
    keys = set(method.knob(1)[0]) if method.knob(1) else set()
    return [o for o in method.options if o.cli and (o.name in keys or (o.searchable and o.default is not None))]


@dataclass(frozen=True)
class Dimension:
    """One searched option: ``kind`` int (``low``..``high``), float (``low``..``high`` by ``step``), choice
    (``choices``); ``as_text``: a knob whose value is a string of an integer (GTP's P)."""
    name: str
    kind: str
    low: float = 0
    high: float = 0
    step: float | None = None
    choices: tuple = ()
    as_text: bool = False

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, (), False) or k in ("low", "high")}


@dataclass
class Space:
    """Everything a trial may choose: the methods with their dimensions, precisions, attention and plugins."""
    methods: dict[str, list[Dimension]]
    precisions: tuple[str, ...]
    attentions: tuple[str, ...]
    plugins: tuple[bool, ...]
    attention_blocks: tuple[int, ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        return {"methods": {m: [d.describe() for d in dims] for m, dims in self.methods.items()},
                "precisions": list(self.precisions), "attention": list(self.attentions),
                "plugins": list(self.plugins), "attention_blocks": list(self.attention_blocks),
                "attention_mass": list(SPARSE_MASS)}


def bounds(method: Method, depth: int, free_tokens: int, fits: Callable[[dict], bool]) -> list[Dimension]:
    """The dimensions of ``method`` on a model of ``depth`` blocks and ``free_tokens`` non-prefix tokens;
    ``fits(setting)`` says whether the model can take a knob setting (planned without error)."""
    dims = []
    knob_keys = set(method.knob(depth)[0]) if method.knob else set()
    for option in searched(method):
        if option.name in knob_keys:
            values = [s[option.name] for s in method.knob(depth) if fits(s)]
            if not values:
                continue
            numbers = [float(v) for v in values]
            if isinstance(values[0], str) or option.type == "int":
                dims.append(Dimension(option.name, "int", int(min(numbers)), int(max(numbers)),
                                      as_text=isinstance(values[0], str)))
            else:
                dims.append(Dimension(option.name, "float", min(numbers), max(numbers), step=0.01))
        elif option.choices:
            dims.append(Dimension(option.name, "choice", choices=tuple(option.choices)))
        elif option.type == "int":
            low, high = option.range or (0, None)
            dims.append(Dimension(option.name, "int", max(int(low), 1),
                                  int(high) if high is not None else max(1, free_tokens // depth)))
        elif option.type == "float":
            if option.range:
                low, high = option.range
                high = 1.0 if high is None else high
                low = low + 0.05 * (high - low) if option.bounds[0] == "(" else low
            else:
                high = float(option.default)
                low = high / 4
            dims.append(Dimension(option.name, "float", round(low, 4), round(high, 4), step=0.01))
    return dims


def config_label(config: dict) -> str:
    """``tome r=5, int8, sparse mass 0.9, plugins``: a trial's configuration in one short label."""
    opts = " ".join(f"{k}={v}" for k, v in config.get("options", {}).items())
    parts = [f"{config['method']}{' ' + opts if opts else ''}", config["precision"]]
    if config.get("attention") == "sparse":
        parts.append(f"sparse block {config['attention_block']} mass {config['attention_mass']}")
    if config.get("plugins"):
        parts.append("plugins")
    return ", ".join(parts)
