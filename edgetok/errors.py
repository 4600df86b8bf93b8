"""The one exception type the CLI turns into a one-line message and a non-zero exit, and the ordinary
operating-system failures (a folder we may not write, a file where a folder should be, a full disk) said the
same way: they are the user's to fix, not bugs to report."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class EdgetokError(Exception):
    """A user-facing error: the message names the bad value and the fix, on one line."""


# atomic.py's staging names: ``.NAME.edgetok-PID-XXXX.tmp`` (NAME shortened and hashed when long).
_STAGING = re.compile(r"^\.(.+)\.edgetok-\d+-[^./]+\.tmp$")
_PSEUDO = ("/proc", "/sys")  # kernel pseudo-filesystems: no file can be created there


def _user_path(name: str) -> str:
    """The path the user asked for: a staging name in it becomes the name it stands for (or its folder, when
    the name was shortened)."""
    path = Path(name)
    for i, part in enumerate(path.parts):
        match = _STAGING.match(part)
        if match:
            final = match.group(1)
            parent = Path(*path.parts[:i]) if i else Path(".")
            return str(parent) if re.search(r"-[0-9a-f]{12}$", final) else str(parent / final)
    return name


def _cache_hint(path: str) -> str:
    cache = os.environ.get("EDGETOK_CACHE")
    if cache and (path == cache or path.startswith(cache.rstrip("/") + "/")):
        return f" (EDGETOK_CACHE={cache}: point it at a folder you can write, or unset it)"
    return ""


def os_error_message(exc: OSError) -> str | None:
    """One line for an ordinary OS failure, naming the path and what to do; None for one that is more likely
    a bug than the user's to fix (then the CLI says so)."""
    raw = exc.filename2 if exc.errno == errno.ENAMETOOLONG and exc.filename2 else exc.filename
    if raw is None:
        return "no space left on the device; free some space and rerun" if exc.errno == errno.ENOSPC else None
    path = _user_path(os.fsdecode(raw))
    hint = _cache_hint(path)
    absolute = os.path.abspath(path)
    if any(absolute == p or absolute.startswith(p + "/") for p in _PSEUDO) and exc.errno in (
            errno.ENOENT, errno.EPERM, errno.EACCES, errno.EROFS, errno.EEXIST):
        top = "/" + absolute.split("/")[1]
        return f"{path} is in {top}, a kernel pseudo-filesystem where edgetok cannot write; give an ordinary folder"
    messages = {
        errno.EACCES: f"permission denied for {path}{hint}; choose a folder you can write, or fix its permissions",
        errno.EPERM: f"operation not permitted on {path}{hint}; choose a folder you can write",
        errno.EROFS: f"{path} is on a read-only filesystem{hint}; choose a writable folder",
        errno.ENOSPC: f"no space left on the device holding {path}{hint}; free some space or write elsewhere",
        errno.EDQUOT: f"disk quota exceeded writing {path}{hint}; free some space or write elsewhere",
        errno.ENAMETOOLONG: f"a name in {path} is too long for the filesystem (at most 255 bytes per name, and "
                            "edgetok adds suffixes such as .edgetok.json); give a shorter name",
        errno.EISDIR: f"{path} is a folder where a file is expected; give a file name",
    }
    if exc.errno in messages:
        return messages[exc.errno]
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
        blocking = next((p for p in [Path(path), *Path(path).parents]
                         if p.exists() and not p.is_dir() and p != Path(path)), None)
        if blocking is not None:
            return f"{blocking} is a file, not a folder, so {path} cannot be made{hint}; remove it or choose " \
                   "another path"
        if exc.errno == errno.EEXIST and Path(path).exists() and not Path(path).is_dir():
            return f"{path} is a file where a folder is needed{hint}; remove it or choose another path"
    return None
