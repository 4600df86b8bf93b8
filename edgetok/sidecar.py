"""The sidecar JSON each artifact carries: what the next step (build-engine, profile, eval) needs."""

from __future__ import annotations

import datetime
import json
import platform
from importlib import metadata
from pathlib import Path

from edgetok import __version__
from edgetok.atomic import write_text
from edgetok.errors import EdgetokError

SUFFIX = ".edgetok.json"


def sidecar_path(artifact: str | Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.stem + SUFFIX)


def versions(*packages: str) -> dict:
    found = {"edgetok": __version__, "python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def stamp(data: dict) -> dict:
    return {"edgetok_version": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **data}


def write(path: str | Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def load(path: Path, remedy: str) -> dict:
    """A JSON artifact edgetok wrote; a damaged one is a one-line error saying how to remake it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise EdgetokError(f"{path} is not valid JSON ({exc}); {remedy}") from None


def read(artifact: str | Path) -> dict:
    path = sidecar_path(artifact)
    if not path.is_file():
        raise EdgetokError(f"{artifact} has no sidecar {path.name}; export it with `edgetok export`")
    return load(path, "re-export the model")
