"""Recipes: YAML files naming one artifact's options, by section (``export:``, later ``build:``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from edgetok.errors import EdgetokError

DEFAULT = "default"


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("edgetok.recipes").iterdir() if p.name.endswith(".yaml"))


def is_path(recipe: str) -> bool:
    """A file the user named, as opposed to a built-in name: it has a folder part or a YAML suffix."""
    return "/" in recipe or recipe.endswith((".yaml", ".yml"))


def resolve(recipe: str) -> str:
    """Where a recipe comes from. Built-in names always mean the built-ins, so a file of that name in the
    working folder cannot stand in for one; a user's own file is named by a path (``./x.yaml``)."""
    if is_path(recipe):
        if not Path(recipe).is_file():
            raise EdgetokError(f"recipe file {recipe} does not exist; give a YAML file or a built-in name "
                               f"({', '.join(builtin_names())})")
        return str(Path(recipe))
    if recipe in builtin_names():
        return str(resources.files("edgetok.recipes") / f"{recipe}.yaml")
    hint = f"; for the file in this folder write ./{recipe}" if Path(recipe).is_file() else ""
    raise EdgetokError(f"recipe {recipe!r} is not a built-in recipe (built-ins: {', '.join(builtin_names())}); "
                       f"a recipe file is named by a path ending in .yaml or containing '/'{hint}")


def load(recipe: str, say=None) -> dict:
    """A recipe by path, or by built-in name (``deit_small_tome_r13``); ``say`` is told which file was used."""
    source = resolve(recipe)
    if say:  # a built-in name is told where its file is; a path the user gave is named once
        say(f"recipe {recipe}" + ("" if is_path(recipe) else f": {source} (built-in)"))
    text = Path(source).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EdgetokError(f"recipe {recipe} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise EdgetokError(f"recipe {recipe} must be a mapping with an 'export:' section")
    return data


def section(data: dict, name: str, allowed: set[str], recipe: str) -> dict:
    values = data.get(name)
    if not isinstance(values, dict):
        raise EdgetokError(f"recipe {recipe} has no '{name}:' section")
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise EdgetokError(f"recipe {recipe}: unknown key '{name}.{unknown[0]}'; allowed: {', '.join(sorted(allowed))}")
    return values


PROFILE_KEYS = {"sweep", "backend", "device", "batch", "duration", "iterations", "rounds", "threads", "warmup"}


def profile_plan(data: dict, recipe: str) -> tuple[list[tuple[str, dict]], dict]:
    """The exports a recipe's ``profile:`` section sweeps (label, export options) and its profile options.

    ``sweep: {r: [0, 8, 13, 16]}`` varies one export parameter; each variant gets its own output file.
    """
    from edgetok.vit.export import ViTExportOptions, default_output

    base = section(data, "export", ViTExportOptions.fields() | {"kind"}, recipe)
    base.pop("kind", None)
    prof = section(data, "profile", PROFILE_KEYS, recipe) if "profile" in data else {}
    sweep = prof.pop("sweep", None) or {}
    if len(sweep) > 1 or (sweep and not isinstance(next(iter(sweep.values())), list)):
        raise EdgetokError(f"recipe {recipe}: profile.sweep must vary one export parameter, e.g. {{r: [0, 8, 13]}}")
    if not sweep:
        return [(Path(base.get("output") or "model").stem, base)], prof
    (key, values), = sweep.items()
    if key not in ViTExportOptions.fields():
        raise EdgetokError(f"recipe {recipe}: profile.sweep.{key} is not an export option")
    variants = []
    for value in values:
        opts = {**base, key: value}
        out = Path(base["output"]) if base.get("output") else default_output(ViTExportOptions(**base))
        opts["output"] = str(out.with_name(f"{out.stem}_{key}{value}{out.suffix}"))
        variants.append((f"{key}={value}", opts))
    return variants, prof
