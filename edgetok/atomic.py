"""Outputs appear whole or not at all, and never in place of something that is not ours.

One file (a sidecar, a report) is written to a temporary file beside it, synced, and renamed over it.

An artifact set (a model with its sidecar, external weights, cubin bundle or build report) sits side by side in
the user's own folder, where a versioned folder behind one symlink swap would change what the user sees (the
model would become a link, and copying the folder would copy links). So ``publish`` takes a set staged whole
and checked beside its targets, and, under the artifact's lock (``locked``, the lock `eval` also takes to
record accuracy in the sidecar), hard-links each file it replaces to a backup name, then renames the new files
over the old: data, sidecar and reports first, the model last. If any rename fails, every name already
replaced gets its backup back and new names are removed, so the folder keeps the old set whole. Between two
renames a reader that does not take the lock could see the new sidecar beside the old model; that is why the
readers check the model's SHA-256 the sidecar records (``sidecar.read``) and refuse a mismatch instead of
reporting one model's numbers for another. A SIGKILL between two renames leaves the same, detected, mismatch.
A set spread over several folders (a pair's engines in target/ and draft/ and its manifest) is published the
same way as one set (``publish_sets``): one lock, one rollback across the folders, the manifest last.

A folder artifact (a spec-pair) is staged as one folder and published with one ``rename`` onto its name
(``publish_folder``). POSIX makes that atomic and refuses it onto a folder that is not empty, so two exports
to one ``-o`` cannot both succeed, and nothing is ever moved into an existing folder (as ``shutil.move`` does).

Only regular files, and empty folders for folder artifacts, are replaced: a symlink, character device, FIFO or
socket at an output path is refused in one line, since renaming over /dev/null or /proc/self/fd/1 would
replace the device or the link. A report asked for on a stream (``-``, /dev/stdout, a FIFO, a character device
such as /dev/null) is written into it instead (``write_report``), as trtexec's ``--exportTimes`` does.

Temporary names carry the writing process's PID (``.NAME.edgetok-PID-XXXX.tmp``). A process killed with
SIGKILL cannot clean up, so whenever edgetok writes into a folder it first removes such leftovers whose
process is gone (or whose PID now belongs to a process started after them).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from edgetok.errors import EdgetokError

_TEMP = re.compile(r"^\..+\.edgetok-(\d+)-[^.]+\.tmp$")


_LONG_NAME = 200  # bytes: with ".", ".edgetok-PID-", 8 random characters and ".tmp" a temp name stays <= 255


def _temp_prefix(name: str) -> str:
    """A long name is cut and hashed (``.NAME[:100]-SHA12.edgetok-…``), so an output whose own name fits the
    filesystem's 255 bytes never fails on its temporary name."""
    if len(os.fsencode(name)) > _LONG_NAME:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
        name = f"{os.fsencode(name)[:100].decode(errors='ignore')}-{digest}"
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


_KINDS = ((stat.S_ISLNK, "symbolic link"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"), (stat.S_ISREG, "regular file"))


def check_target(path: str | Path, want: str = "file") -> None:
    """Refuse, in one line, an output path holding what a rename must not replace: anything but a regular
    file (``want="file"``), a folder (``"folder"``) or either (``"either"``, before the staging of an output
    that may be one or the other). A missing path is fine."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if (stat.S_ISREG(mode) and want in ("file", "either")) or (stat.S_ISDIR(mode) and want in ("folder", "either")):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    if kind == "symbolic link":
        with contextlib.suppress(OSError):
            kind += f" (to {os.readlink(path)})"
    wanted = {"file": "a regular file", "folder": "a folder"}.get(want, "a regular file or folder")
    raise EdgetokError(f"{path} is a {kind}, not {wanted}: edgetok renames its finished output over the old one and "
                       "will not replace it; choose another path")


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    check_target(path, "file")
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
    check_target(final, "either")  # before the work: a device or link there would be refused at publish time
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


@contextlib.contextmanager
def scratch_dir(name: str):
    """A private work folder in $TMPDIR named like the staging folders (``.NAME.edgetok-PID-XXXX.tmp``), removed
    after, so what a run killed with SIGKILL leaves there (hundreds of MB of model copies for DeiT) is swept by
    the next run, as leftovers beside outputs are. While it is open it is also ``tempfile``'s default folder:
    the temporaries libraries make on their own (ONNX Runtime's calibration copies) are inside it, ours too."""
    previous = tempfile.tempdir
    base = Path(tempfile.gettempdir())
    remove_stale(base)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=_temp_prefix(name), suffix=".tmp"))
    tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(tmp, ignore_errors=True)


MODEL_SUFFIXES = (".onnx", ".engine", ".plan", ".trt")  # published last: the file a reader opens first
_LOCKS: dict = {}


@contextlib.contextmanager
def locked(artifact: str | Path):
    """Serialise the publishing of an artifact (and read-modify-write of its sidecar) across processes. As
    huggingface_hub keeps its locks in the cache's ``.locks`` folder, ours live in ``$XDG_CACHE_HOME/edgetok/locks``
    (one per artifact path), so nothing appears beside the artifacts. Re-entrant within a process: a publish
    inside ``sidecar.locked`` takes the same lock again without waiting for itself."""
    from filelock import FileLock

    path = lock_path(artifact)
    lock = _LOCKS.get(str(path)) or _LOCKS.setdefault(str(path), FileLock(str(path)))
    with lock:
        yield


def lock_path(artifact: str | Path) -> Path:
    """The lock file of ``artifact``: in the user's cache, or in $TMPDIR where the cache cannot be written (a
    read-only home on a device)."""
    key = hashlib.sha256(str(Path(artifact).resolve()).encode()).hexdigest()[:32]
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetok" / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / f"edgetok-locks-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{key}.lock"


def publish(staged: Path, final_dir: Path) -> list[Path]:
    """Make the files of ``staged`` (a staging_dir, complete and checked) visible in ``final_dir`` as one set,
    under the model's lock: every old file is kept under a backup name until all renames succeeded, and put back
    if one fails (see the module docstring). Returns the published paths, the model last."""
    return publish_sets([(Path(staged), Path(final_dir))])


def publish_sets(sets: list[tuple[Path, Path]], lock: str | Path | None = None) -> list[Path]:
    """``publish`` for a set spread over several folders (a pair's engines in target/ and draft/, then its
    manifest): the staged folders' files in the order given, each folder's model last, under one lock (``lock``,
    by default the last file's), and every rename undone if any fails, across all the folders."""
    moves: list[tuple[Path, Path]] = []
    for staged, final_dir in sets:
        entries = sorted(Path(staged).iterdir(), key=lambda p: (p.suffix in MODEL_SUFFIXES, p.name))
        moves += [(entry, Path(final_dir) / entry.name) for entry in entries]
    if lock is None:
        lock = moves[-1][1] if moves else (Path(sets[-1][1]) if sets else Path.cwd())
    with locked(lock):
        for _, target in moves:
            check_target(target, "file")
        replaced: list[tuple[Path, Path | None]] = []
        try:
            for entry, target in moves:
                replaced.append((target, _backup(target)))
                os.replace(entry, target)
            for folder in dict.fromkeys(target.parent for _, target in moves):
                _fsync_dir(folder)
        except BaseException:
            for target, backup in reversed(replaced):  # the old set back, whole
                with contextlib.suppress(OSError):
                    if backup is None:
                        os.unlink(target)
                    else:
                        os.replace(backup, target)
            raise
        finally:
            for _, backup in replaced:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(backup)
    return [target for _, target in moves]


def _backup(target: Path) -> Path | None:
    """A second name for the file ``target`` holds now (None: there is none), so a failed publish can restore
    it. A hard link leaves the old file in place until the new one is renamed over it; where links are not
    supported (FAT, some network filesystems) the old file is moved aside instead."""
    if not os.path.lexists(target):
        return None
    backup = target.with_name(f"{_temp_prefix(target.name)}{secrets.token_hex(4)}.tmp")
    try:
        os.link(target, backup)
    except OSError:
        os.rename(target, backup)
    return backup


def publish_folder(staged: Path, final: Path) -> Path:
    """Make the folder ``staged`` (from ``staging_dir(final)``) visible as ``final`` in one rename, under
    ``final``'s lock. The kernel replaces only a missing or empty folder, checked at that instant: of two exports
    to one path only one succeeds, and nothing is moved into an existing folder."""
    final = Path(final)
    with locked(final):
        check_target(final, "folder")
        if final.is_dir() and any(final.iterdir()):
            raise EdgetokError(f"{final} exists and is not empty; choose a new folder")
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(staged, 0o777 & ~umask)  # mkdtemp made it private; an output folder is an ordinary one
        try:
            os.rename(staged, final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise EdgetokError(f"{final} exists and is not empty; choose a new folder") from None
            raise
        _fsync_dir(final.parent)
    return final


def to_stdout(path: str | Path) -> bool:
    """Whether an output path means this process's standard output: ``-``, /dev/stdout, /proc/self/fd/1, or
    any other name of the same open file."""
    if str(path) == "-":
        return True
    try:
        named, out = os.stat(path), os.fstat(1)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (out.st_dev, out.st_ino)


def write_report(path: str | Path, text: str) -> None:
    """A report where the user asked for it: standard output (``to_stdout``) and other streams (a FIFO, a
    character device such as /dev/null) are written into, as trtexec's ``--exportTimes`` does; any other path
    is replaced whole by ``write_text``, which refuses links and devices."""
    if to_stdout(path):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    if is_stream(path):
        try:
            with open(path, "w") as stream:
                stream.write(text)
        except OSError as exc:
            raise EdgetokError(f"{path}: the report could not be written ({exc.strerror}); choose another path") from None
        return
    write_text(path, text)


def is_stream(path: str | Path) -> bool:
    try:
        mode = os.stat(path).st_mode  # through links: /dev/stderr names a terminal or a pipe
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def check_report(path: str | Path) -> None:
    """``write_report``'s refusals, before the work whose report it is."""
    if not (to_stdout(path) or is_stream(path)):
        check_target(path, "file")
