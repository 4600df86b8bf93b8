"""What a reduction method declares: its options and how it is built (:class:`Option`, :class:`Method`).

Kept apart from the registry (the package's ``__init__``), which finds and loads the declarations: a declaration
imports only this module, so declarations and registry do not import each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

TYPES = ("int", "float", "str", "ints", "schedule")  # an option's type, as `edgetok methods --json` names it


@dataclass(frozen=True)
class Option:
    """One option of a method. ``type``: int, float, str, ints (comma-separated block indices), schedule (a
    number or a per-block list, as a string on the command line). ``range``: (low, high) with ``bounds`` saying
    which ends are open ("(]": low < v <= high); high None: no upper bound; ``symbol`` names the value in the
    out-of-range message;
    ``check``: a further torch-free check returning the rest of a one-line error (None: fine); ``parse``: turns
    a command-line value into the option's (ATS: a whole budget above 1 is a token count). ``cli``: False
    for values only a sidecar carries (dtome's calibrated thresholds)."""
    name: str
    type: str
    help: str
    default: Any = None
    range: tuple[float, float | None] | None = None
    bounds: str = "[]"
    choices: tuple | None = None
    searchable: bool = False
    metavar: str | None = None
    symbol: str = "a value"
    example: str | None = None
    check: Callable[[Any], str | None] | None = None
    parse: Callable[[Any], Any] | None = None
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str | None:
        if self.range is None:
            return None
        low, high = self.range
        return f"{self.bounds[0]}{low:g}, " + ("∞)" if high is None else f"{high:g}{self.bounds[1]}")

    def refusal(self, value, flag: str) -> str | None:
        """The one-line error for ``value`` (None: it is in range); torch-free."""
        if self.choices is not None and value is not None and value not in self.choices:
            return f"{flag} {value!r} is unknown; choose {', '.join(map(str, self.choices))}"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.range is not None and number:
            low, high = self.range
            inside = (math.isfinite(value) and (low < value if self.bounds[0] == "(" else low <= value)
                      and (high is None or (value < high if self.bounds[1] == ")" else value <= high)))
            if not inside:
                return (f"{flag} {value} is out of range: give {self.symbol} in {self.range_text()}"
                        + (f", e.g. {self.example}" if self.example else ""))
        if self.check is not None and value is not None:
            why = self.check(value)
            if why:
                return f"{flag} {value} {why}"
        return None

    def describe(self) -> dict:
        low, high = self.range or (None, None)
        return {"name": self.name, "flag": self.flag, "type": self.type, "default": self.default,
                "range": None if self.range is None else {
                    "low": low, "high": high, "bounds": self.bounds[0] + (")" if high is None else self.bounds[1]),
                    "text": self.range_text()},
                "choices": None if self.choices is None else list(self.choices), "help": self.help,
                "searchable": self.searchable}


@dataclass(frozen=True)
class Method:
    """A reduction method. ``build(depth, options, model)`` validates the options given (a dict of option name
    to value, None left out) and returns the method object (None for ``none``); ``model`` holds ``tokens``
    (the model's token count) and ``defaults`` (the model's own defaults). ``tag(options)``: the default
    output's name part. ``knob(depth)``: every setting ``compare`` may try, one knob constant across blocks
    (None: the token count follows the image, so compare cannot match it); ``knob_label`` names a setting in
    compare's table and file names (``"r={r}"``; default: every key=value). ``label``: the
    method as its options' owner in messages (ToMe, EViT). ``groups``: options named together when they are
    given to another method. ``record(reduction)``: the options that rebuild it from a sidecar's reduction
    section, where it records them under other names (ToMe's per-block r)."""
    name: str
    summary: str
    build: Callable[[int, dict, dict], Any]
    options: tuple[Option, ...] = ()
    paper: str = ""
    reference: str = ""
    departures: tuple[str, ...] = ()
    label: str = ""
    tag: Callable[[dict], str] | None = None
    knob: Callable[[int], list[dict]] | None = None
    knob_label: str = ""
    groups: tuple[tuple[tuple[str, ...], str], ...] = ()
    record: Callable[[dict], dict] | None = None
    source: str = "edgetok"

    def from_record(self, reduction: dict) -> dict:
        """The options that rebuild this method from an export sidecar's ``reduction`` section (the torch
        runner re-creates the patched model from it); default: the options recorded under their own names."""
        if self.record is not None:
            return self.record(reduction)
        return {o.name: reduction[o.name] for o in self.options if o.name in reduction}

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def takes(self) -> str:
        """``--propagate P, --alpha, --graph and --sparsity``: what this method takes, for refusals."""
        flags = [o.flag + (f" {o.metavar}" if o.metavar else "") for o in self.options if o.cli]
        if not flags:
            return "no options"
        return flags[0] if len(flags) == 1 else ", ".join(flags[:-1]) + " and " + flags[-1]

    def describe(self) -> dict:
        return {"name": self.name, "summary": self.summary, "paper": self.paper, "reference": self.reference,
                "departures": list(self.departures), "source": self.source, "compare": self.knob is not None,
                "options": [o.describe() for o in self.options if o.cli]}
