"""What state a Jetson was in while it was measured: the nvpmodel power mode and whether jetson_clocks pinned
the clocks. Numbers from a board with dynamic clocks drift run to run, so the report says which it was.
None of this raises: a missing tool or a refused sudo is recorded as an error next to the unknown value."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")
TIMEOUT_S = 15

_MODE = re.compile(r"NV Power Mode:\s*(\S.*?)\s*$")
# "Gonvernor" is how the TX1-era jetson_clocks.sh spelled it.
_CPU = re.compile(r"^cpu(\d+):\s+(?:Online=(\d)\s+)?Gon?vernor=(\S+)\s+"
                  r"MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)")
_UNIT = re.compile(r"^(GPU|EMC)\s+MinFreq=(\d+)\s+MaxFreq=(\d+)(?:\s+CurrentFreq=(\d+))?(?:\s+FreqOverride=(\d+))?")

LOCK_WARNING = "clocks are not locked: run `sudo jetson_clocks` for stable numbers"


def is_jetson() -> bool:
    if TEGRA_RELEASE.exists():
        return True
    try:
        return b"nvidia,tegra" in DEVICE_TREE_COMPATIBLE.read_bytes()
    except OSError:
        return False


def _run(argv: list[str]) -> tuple[str, str | None]:
    """(stdout + stderr, error): error is set when it could not run or exited non-zero, and the output is
    still returned then, because a refused sudo can come after the line that matters."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=TIMEOUT_S)
    except FileNotFoundError:
        return "", f"{argv[0]} not found on PATH"
    except subprocess.TimeoutExpired:
        return "", f"`{' '.join(argv)}` did not finish in {TIMEOUT_S} s"
    except OSError as exc:
        return "", f"cannot run {argv[0]}: {exc.strerror}"
    text = done.stdout + done.stderr
    if done.returncode != 0:
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        return text, f"`{' '.join(argv)}` exited {done.returncode}: {last}"
    return text, None


def parse_power_mode(text: str) -> dict:
    """``NV Power Mode: MAXN`` and, on the next line, the mode number."""
    lines = text.splitlines()
    for k, line in enumerate(lines):
        m = _MODE.search(line)
        if m:
            following = lines[k + 1].strip() if k + 1 < len(lines) else ""
            return {"name": m.group(1), "id": int(following) if following.isdigit() else None}
    return {"name": None, "id": None}


def power_mode() -> dict:
    text, error = _run(["nvpmodel", "-q"])
    mode = parse_power_mode(text)
    # Without sudo older nvpmodel prints the mode, then NVPM ERROR lines: the mode is still right.
    if mode["name"] is None:
        mode["error"] = error or "nvpmodel -q printed no `NV Power Mode:` line"
    return mode


def _mhz(value: str, per_mhz: int) -> float:
    return int(value) / per_mhz


def parse_clocks(text: str) -> dict:
    """``jetson_clocks --show``: CPU freqs are in kHz, GPU/EMC in Hz; all reported in MHz.

    ``jetson_clocks`` pins the GPU by raising MinFreq to MaxFreq, but pins EMC with ``FreqOverride=1`` and
    leaves its MinFreq at the floor (e.g. ``EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000
    FreqOverride=1`` on a locked Nano), so EMC counts as locked when Min == Max or the override is on.
    """
    cpus, units = [], {"GPU": None, "EMC": None}
    for line in text.splitlines():
        line = line.strip()
        m = _CPU.match(line)
        if m:
            core, online, governor, lo, hi, cur = m.groups()
            cpus.append({"cpu": int(core), "online": None if online is None else online == "1", "governor": governor,
                         "min_mhz": _mhz(lo, 1000), "max_mhz": _mhz(hi, 1000), "current_mhz": _mhz(cur, 1000)})
            continue
        m = _UNIT.match(line)
        if m:
            name, lo, hi, cur, override = m.groups()
            pinned = lo == hi or (name == "EMC" and override == "1")
            units[name] = {"min_mhz": _mhz(lo, 10**6), "max_mhz": _mhz(hi, 10**6),
                           "current_mhz": None if cur is None else _mhz(cur, 10**6),
                           "freq_override": None if override is None else override == "1",
                           "locked": pinned and (cur is None or cur == hi)}
    cpus.sort(key=lambda c: c["cpu"])
    gpu, emc = units["GPU"], units["EMC"]
    locked = None if gpu is None else gpu["locked"] and (emc is None or emc["locked"])
    return {"locked": locked, "gpu": gpu, "emc": emc, "cpu": cpus}


def clocks() -> dict:
    """jetson_clocks --show needs root on most JetPacks; without it the error is kept and ``locked`` is None."""
    text, error = _run(["jetson_clocks", "--show"])
    found = parse_clocks(text)
    if error or found["gpu"] is None:
        found["error"] = error or "jetson_clocks --show printed no GPU line"
    return found


def lock_warning(clocks: dict) -> str | None:
    return None if clocks and clocks.get("locked") is True else LOCK_WARNING
