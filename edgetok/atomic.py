"""Outputs appear whole or not at all: write into a temporary place, then rename.

Temporary names carry the writing process's PID (``.NAME.edgetok-PID-XXXX.tmp``). A process killed with
SIGKILL cannot clean up, so whenever edgetok writes into a folder it first removes such leftovers whose
process is gone (or whose PID now belongs to a process started after them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_TEMP = re.compile(r"^\..+\.edgetok-(\d+)-[^.]+\.tmp$")


def _temp_prefix(name: str) -> str:
    return f".{name}.edgetok-{os.getpid()}-"


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds; Linux /proc), or None if that cannot be told."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, made: float) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    started = _process_start(pid)
    return started is None or started <= made + 1.0  # a PID reused after the leftover was made is not its owner


def remove_stale(folder: Path) -> list[Path]:
    """Remove our own temporary files and folders in ``folder`` left by processes that no longer exist."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in Path(folder).iterdir():
            match = _TEMP.match(entry.name)
            if not match:
                continue
            try:
                made = entry.lstat().st_mtime
            except OSError:
                continue
            if _owner_alive(int(match.group(1)), made):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    remove_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it (a Jetson loses power)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(final: str | Path):
    """A scratch folder beside ``final`` (same filesystem, so renames are atomic), removed after."""
    final = Path(final)
    missing = [p for p in [final.parent, *final.parent.parents] if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final.name), suffix=".tmp"))
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
