"""Outputs appear whole or not at all: write into a temporary place, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staging_dir(final: str | Path):
    """A scratch folder beside ``final`` (same filesystem, so renames are atomic), removed after."""
    final = Path(final)
    missing = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in missing:  # folders made for an output that never appeared
            with contextlib.suppress(OSError):
                folder.rmdir()


def publish(staged: Path, final_dir: Path) -> list[Path]:
    """Move every file of ``staged`` into ``final_dir``; data files first, so the model appears last."""
    files = sorted(staged.iterdir(), key=lambda p: p.suffix == ".onnx")
    moved = []
    for f in files:
        target = final_dir / f.name
        os.replace(f, target)
        moved.append(target)
    return moved
