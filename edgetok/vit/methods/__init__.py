"""The reduction-method registry: every method declares itself once, and everything else derives from it.

A method is one module here (``tome.py``, ``evit.py``, ...) holding ``METHOD = Method(...)`` (``method.py``):
its name, a one-line summary, paper and reference code, its options (type, default, range or choices, help,
whether a search may vary it), its departures from the reference, and ``build``, which validates the options and returns
the object that plans and realises the reduction. The PyTorch realisation lives beside it (``tome_torch.py``)
and is imported only by ``build``: the declarations import no torch, so the command line checks every option
before torch, timm or a model loads (issue 25's fast refusal), as timm's ``@register_model`` keeps a model's
options with its name.

The CLI flags of ``edgetok export vit``, the export options, recipe keys, ``compare``'s method list, the
sidecar's request and ``edgetok methods`` all read this registry. A third-party package adds a method through
the entry-point group ``edgetok.methods``, whose value is a :class:`Method` (or a module holding ``METHOD``).
"""

from __future__ import annotations

import importlib
from typing import Callable

from edgetok.errors import EdgetokError
from edgetok.vit.methods.method import TYPES, Method, Option

__all__ = ["Method", "Option", "register_method", "names", "get", "describe", "check_options", "make_method"]

ENTRY_POINT_GROUP = "edgetok.methods"
# fixed-count methods first, in the order compare reports them; then the ones whose count follows the image
BUILTIN = ("none", "tome", "pitome", "zerotprune", "gtp", "evit", "ats", "dtome")


_REGISTRY: dict[str, Method] = {}
_loaded = False


def register_method(method: Method) -> Method:
    """Add ``method`` (a name may be registered once; an option shared with another method, such as ``r``,
    must have the same type there, since it is one flag)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise EdgetokError(f"reduction method {method.name!r} is registered twice ({_REGISTRY[method.name].source} "
                           f"and {method.source})")
    odd = [o.name for o in method.options if o.type not in TYPES]
    if odd:
        raise EdgetokError(f"method {method.name}: option {odd[0]} has no type edgetok knows; give one of {', '.join(TYPES)}")
    for other in _REGISTRY.values():
        for option in method.options:
            same = other.option(option.name)
            if same is not None and same.type != option.type:
                raise EdgetokError(f"method {method.name}: option {option.name} is a {option.type} but {other.name}'s "
                                   f"is a {same.type}; give it another name")
    _REGISTRY[method.name] = method
    return method


def _load() -> None:
    """The built-in methods, then the entry points (a broken third-party method is named, not fatal to the
    others: it is left out with a warning)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        register_method(importlib.import_module(f"edgetok.vit.methods.{name}").METHOD)
    for entry in entry_points():
        try:
            value = entry.load()
            method = getattr(value, "METHOD", value)
            if not isinstance(method, Method):
                raise TypeError(f"{entry.value} is not an edgetok.vit.methods.Method")
            register_method(method if method.source != "edgetok" else
                            Method(**{**method.__dict__, "source": entry.dist.name if entry.dist else entry.value}))
        except Exception as exc:  # a third party's bug must not stop every export
            import warnings

            warnings.warn(f"edgetok: reduction method {entry.name!r} from {entry.value} is left out: {exc}",
                          stacklevel=2)


def entry_points() -> list:
    from importlib.metadata import entry_points as found

    return list(found(group=ENTRY_POINT_GROUP))


def reload() -> None:
    """Look for entry points again (tests, or after installing a package in a running process)."""
    global _loaded
    for name in [n for n, m in _REGISTRY.items() if m.source != "edgetok"]:
        del _REGISTRY[name]
    _loaded = False
    _load()


def names() -> tuple[str, ...]:
    _load()
    return tuple(_REGISTRY)


def get(name: str, flag: str = "--method") -> Method:
    _load()
    if name not in _REGISTRY:
        raise EdgetokError(f"{flag} {name!r} is unknown; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def all_options() -> dict[str, Option]:
    """Every option name once (the first method declaring it), in declaration order."""
    _load()
    found: dict[str, Option] = {}
    for method in _REGISTRY.values():
        for option in method.options:
            found.setdefault(option.name, option)
    return found


def owners(option: str) -> list[Method]:
    _load()
    return [m for m in _REGISTRY.values() if m.option(option) is not None]


def comparable() -> tuple[str, ...]:
    """The methods ``compare`` can match at a target GMACs: those with a knob (a fixed token count)."""
    _load()
    return tuple(m.name for m in _REGISTRY.values() if m.knob is not None)


def setting_label(name: str, setting: dict) -> str:
    """``tome r=11``: a compare setting as its table and file names show it."""
    method = get(name)
    text = method.knob_label.format(**setting) if method.knob_label else " ".join(f"{k}={v}" for k, v in setting.items())
    return f"{name} {text}"


def describe() -> list[dict]:
    """What ``edgetok methods --json`` prints: every method with its options (the docs' method table)."""
    _load()
    return [m.describe() for m in _REGISTRY.values()]


def _foreign(method: Method, given: list[str], flag: Callable[[str], str]) -> str | None:
    """The one-line refusal for options of other methods given to ``method`` (None: none given)."""
    foreign = [k for k in given if method.option(k) is None]
    if not foreign:
        return None
    name = foreign[0]
    holders = owners(name)
    if not holders:
        return f"{flag(name)} is not an option of any reduction method ({', '.join(_REGISTRY)})"
    if len(holders) == 1:  # its owner's group: "--propagate/--alpha/--graph are GTP options; they need --method gtp"
        owner = holders[0]
        group, note = next(((g, n) for g, n in owner.groups if name in g), ((name,), ""))
        flags = "/".join(flag(k) for k in group)
        label = owner.label or owner.name
        many = len(group) > 1
        return (f"{flags} {'are' if many else 'is'} {'' if many else 'an ' if label[0] in 'AEIOU' else 'a '}"
                f"{label} option{'s' if many else ''}{note}; {'they need' if many else 'it needs'} --method {owner.name}"
                f" (--method {method.name} takes {method.takes()})")
    return (f"{flag(name)} is an option of {', '.join(m.label or m.name for m in holders)} (--method "
            f"{'/'.join(m.name for m in holders)}), not of {method.label or method.name}; --method {method.name} takes "
            f"{method.takes()}")


def check_options(method_name: str, options: dict, flag: Callable[[str], str] | None = None) -> Method:
    """The torch-free checks of a method and its options, in one line each: the method is known, no option of
    another method is given, every value is of its type and in its range. ``options`` maps option names to
    values (None: not given); ``flag`` spells an option for messages (a recipe's key, or the CLI flag)."""
    flag = flag or (lambda key: "--" + key.replace("_", "-"))
    method = get(method_name, flag("method"))
    given = [k for k, v in options.items() if v is not None]
    why = _foreign(method, given, flag)
    if why:
        raise EdgetokError(why)
    for key in given:
        why = method.option(key).refusal(options[key], flag(key))
        if why:
            raise EdgetokError(why)
    return method


def make_method(name: str, depth: int, tokens: int | None = None, defaults: dict | None = None, **options):
    """The method object for ``name`` (None for ``none``) from its options as keyword arguments (``r=8``,
    ``keep_rate=0.7``: the names its declaration gives); ``tokens`` is the model's token count (ATS samples from
    it); ``defaults`` the model's own defaults for options not given. Checked as the command line checks them:
    a library caller gets the same one-line refusals."""
    method = check_options(name, options)
    return method.build(depth, {k: v for k, v in options.items() if v is not None},
                        {"tokens": tokens, "defaults": defaults or {}})
