"""The sidecar JSON each artifact carries: what the next step (build-engine, profile, eval) needs."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
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


@contextlib.contextmanager
def locked(artifact: str | Path):
    """Serialise read-modify-write of an artifact's sidecar (and its replacement by a new export) across
    processes. As huggingface_hub keeps its locks in the cache's ``.locks`` folder, ours live in
    ``$XDG_CACHE_HOME/edgetok/locks`` (one per sidecar path), so nothing appears beside the artifacts."""
    import os

    from filelock import FileLock

    path = str(sidecar_path(artifact).resolve())
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetok" / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{hashlib.sha256(path.encode()).hexdigest()[:32]}.lock")):
        yield


def update(artifact: str | Path, change):
    """Read, change and write an artifact's sidecar as one step no other edgetok process can interleave with.
    ``change(data)`` edits ``data`` in place and returns None, or returns a reason to leave the file as it is."""
    with locked(artifact):
        data = read(artifact)
        reason = change(data)
        if reason is None:
            write(sidecar_path(artifact), data)
        return reason


def request_mismatch(record_path: Path, want: dict, what: str) -> tuple[dict | None, str | None]:
    """A record (sidecar, build report) and why its ``request`` is not ``want``: (record, None) when it is,
    so the artifact it describes may be reused."""
    if not record_path.is_file():
        return None, f"it has no {what} {record_path.name}"
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, OSError):
        return None, f"its {what} {record_path.name} is unreadable"
    have = record.get("request") if isinstance(record, dict) else None
    if not isinstance(have, dict):
        return None, f"its {what} does not record what it was made from"
    differ = [k for k in want if have.get(k) != want[k]]
    if differ:
        return None, "; ".join(f"{k} was {have.get(k)!r}, now {want[k]!r}" for k in differ[:3])
    return record, None


def file_sha256(path: str | Path) -> str:
    """What an artifact's identity is checked by: the next step reuses a file only if this still matches."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
