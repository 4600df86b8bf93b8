"""tegrastats on a Jetson: parse its one-line samples, run it in the background during a timed window, and
turn the samples inside that window into power, energy per inference, RAM, GPU and temperature figures.

The line format drifts between JetPack releases (GR3D per GPC on JetPack 7, freqs without load on Thor,
rails with or without a max), so the parser is token-driven and keeps whatever it does not recognise."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from edgetok.errors import EdgetokError

_TIME = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s*")
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")  # rails and engines are upper case; "MTS fg 0%" is not one
_USED_TOTAL = re.compile(r"^(\d+)/(\d+)MB$")
_LOAD_FREQ = re.compile(r"^(?:(\d+)%)?(?:@(\[[^\]]*\]|\d+))?$")
_RAIL = re.compile(r"^(\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?$")
_TEMP = re.compile(r"^([A-Za-z][A-Za-z0-9_\-]*)@(-?\d+(?:\.\d+)?)C(?:/(-?\d+(?:\.\d+)?)C)?$")
_INT = re.compile(r"^\d+$")
_GPU = re.compile(r"^GR3D\d*_FREQ$")
# Rails that measure the whole module's input; POM_5V_IN is the JetPack 4 (Nano) name for it.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
SENSOR_OFF_C = -256.0  # tegrastats prints this for a powered-down thermal zone (CV0@-256C)
SIGTERM_GRACE_S = 2.0  # stop(): how long tegrastats gets to exit on SIGTERM before the group is SIGKILLed


def _load_freq(token: str) -> tuple[int | None, list[int]] | None:
    """``12%`` / ``12%@1300`` / ``12%@[1300,1300]`` / ``@[1000,1000]`` -> (load, [freqs]); None if not that shape."""
    m = _LOAD_FREQ.match(token)
    if not m or not token:
        return None
    load = int(m.group(1)) if m.group(1) is not None else None
    freq = m.group(2)
    if freq is None:
        return (load, []) if load is not None else None
    if freq.startswith("["):
        return load, [int(f) for f in freq[1:-1].split(",") if f.strip().isdigit()]
    return load, [int(freq)]


def _skip_parenthesis(tokens: list[str], i: int) -> int:
    """Index after a ``(lfb 1x2MB)`` / ``(cached 0MB)`` group that starts at ``i`` (or ``i`` if none)."""
    if i < len(tokens) and tokens[i].startswith("("):
        while i < len(tokens) and not tokens[i].endswith(")"):
            i += 1
        return i + 1
    return i


def _cpu(token: str) -> list | None:
    if not (token.startswith("[") and token.endswith("]")):
        return None
    cores = []
    for item in token[1:-1].split(","):
        parsed = _load_freq(item.strip())
        if parsed is None or parsed[0] is None:
            cores.append(None)  # "off" (core offline) or something unreadable
        else:
            cores.append({"load_pct": parsed[0], "freq_mhz": parsed[1][0] if parsed[1] else None})
    return cores


def parse_line(line) -> dict:
    """One tegrastats line as a dict of known fields; never raises, so one odd line cannot end a profile."""
    out = {"time": None, "ram_mb": None, "swap_mb": None, "cpu": None, "emc": None, "gpu": None,
           "engines": {}, "rails_mw": {}, "temps_c": {}, "unknown": []}
    try:
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        line = str(line)
        m = _TIME.match(line)
        if m:
            out["time"] = m.group(1)
            line = line[m.end():]
        tokens = line.split()
    except Exception:  # noqa: BLE001 - an unprintable object is just an unknown line
        return out
    i = 0
    while i < len(tokens):
        tok, nxt = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else None
        try:
            i = _take(out, tokens, i, tok, nxt)
        except Exception:  # noqa: BLE001 - keep going: the rest of the line is still worth having
            out["unknown"].append(tok)
            i += 1
    return out


def _take(out: dict, tokens: list[str], i: int, tok: str, nxt: str | None) -> int:
    """Consume the field starting at ``tokens[i]`` into ``out``; return the index of the next field."""
    if tok in ("RAM", "SWAP") and nxt and _USED_TOTAL.match(nxt):
        used, total = _USED_TOTAL.match(nxt).groups()
        out["ram_mb" if tok == "RAM" else "swap_mb"] = {"used": int(used), "total": int(total)}
        return _skip_parenthesis(tokens, i + 2)
    if tok == "CPU" and nxt is not None and _cpu(nxt) is not None:
        out["cpu"] = _cpu(nxt)
        return i + 2
    temp = _TEMP.match(tok)
    if temp:
        name, cur, peak = temp.groups()
        out["temps_c"][name] = {"cur": float(cur), "max": float(peak) if peak is not None else None}
        return i + 1
    if not _NAME.match(tok) or nxt is None:
        out["unknown"].append(tok)
        return i + 1
    load_freq = _load_freq(nxt)
    if tok == "EMC_FREQ" and load_freq is not None:
        out["emc"] = {"load_pct": load_freq[0], "freq_mhz": load_freq[1][0] if load_freq[1] else None}
        return i + 2
    if _GPU.match(tok) and load_freq is not None:
        # JetPack 5 on AGX Orin prints one GR3D<n>_FREQ per GPC; JetPack 7 one array: same list either way.
        gpu = out["gpu"] or {"load_pct": None, "freq_mhz": []}
        gpu["load_pct"] = gpu["load_pct"] if gpu["load_pct"] is not None else load_freq[0]
        gpu["freq_mhz"] = gpu["freq_mhz"] + load_freq[1]
        out["gpu"] = gpu
        return i + 2
    rail = _RAIL.match(nxt)
    if rail:
        cur, avg, peak = rail.groups()
        name, n = tok, 1
        while name in out["rails_mw"]:  # AGX Orin JetPack 5 prints two "NC" (not connected) rails
            n += 1
            name = f"{tok}_{n}"
        out["rails_mw"][name] = {"cur": int(cur), "avg": int(avg), "max": int(peak) if peak is not None else None}
        return i + 2
    if nxt == "off":
        out["engines"][tok] = "off"
        return i + 2
    if _INT.match(nxt):
        out["engines"][tok] = int(nxt)
        return i + 2
    if load_freq is not None and (load_freq[0] is not None or load_freq[1]):
        out["engines"][tok] = {"load_pct": load_freq[0], "freq_mhz": load_freq[1][0] if load_freq[1] else None}
        return i + 2
    out["unknown"].append(tok)
    return i + 1


def _useful(parsed: dict) -> bool:
    return bool(parsed["rails_mw"]) or parsed["ram_mb"] is not None


class TegrastatsSampler:
    """tegrastats in its own session for the length of a timed window, so stop() can end it and anything it
    started with one signal, and a reader thread stamps each line with ``clock()`` as it arrives.

    ``clock`` must be the clock of the windows given to summarize(): time.monotonic, as measure.timed_round
    uses. ``clock`` and ``sleep`` also time stop()'s SIGTERM grace period; tests replace both."""

    def __init__(self, interval_ms: int = 100, executable: str = "tegrastats",
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.interval_ms = int(interval_ms)
        self.executable = executable
        self.clock = clock
        self.sleep = sleep
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._samples: list[tuple[float, dict]] = []
        self._tail = b""
        self._tail_time = 0.0

    def start(self) -> "TegrastatsSampler":
        if self._proc is not None:
            return self
        path = shutil.which(self.executable)
        if path is None:
            raise EdgetokError(f"tegrastats not found on PATH: `{self.executable}` is missing, so this is not a "
                               f"Jetson; use --host user@jetson")
        try:
            self._proc = subprocess.Popen([path, "--interval", str(self.interval_ms)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            raise EdgetokError(f"cannot start {path} ({exc.strerror}); check it runs: {path} --interval "
                               f"{self.interval_ms}") from None
        self.pid = self._proc.pid
        self._thread = threading.Thread(target=self._read, args=(self._proc.stdout.fileno(),),
                                        name="tegrastats-reader", daemon=True)
        self._thread.start()
        return self

    def _read(self, fd: int) -> None:
        """Raw os.read with a short select timeout, so stop() can end this thread even if a stray writer
        keeps the pipe open; the bytes after the last newline are kept as the tail for stop() to judge."""
        buf = b""
        quiet_deadline = None
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                if self._closing.is_set():
                    # Real time, not self.clock: this bound ends the thread whatever clock stamps the samples.
                    quiet_deadline = quiet_deadline or time.monotonic() + 1.0
                    if time.monotonic() > quiet_deadline:
                        break
                try:
                    if not sel.select(timeout=0.05):
                        if self._closing.is_set():
                            break
                        continue
                    chunk = os.read(fd, 65536)
                except (OSError, ValueError):
                    break
                if not chunk:
                    break
                now = self.clock()
                *lines, buf = (buf + chunk).split(b"\n")
                for raw in lines:
                    parsed = parse_line(raw)
                    if _useful(parsed):
                        self._samples.append((now, parsed))
                if buf:
                    self._tail_time = now
        self._tail = buf

    def stop(self) -> list[tuple[float, dict]]:
        """SIGTERM the whole group, SIGKILL it after SIGTERM_GRACE_S, reap, then collect; safe to call twice.

        The leader is reaped only after the SIGKILL: until then its zombie keeps the group id from being
        reused, so the SIGKILL that catches children which outlived (or ignored) SIGTERM cannot hit a stranger.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return list(self._samples)
        try:
            _signal_group(proc.pid, signal.SIGTERM)
            deadline = self.clock() + SIGTERM_GRACE_S
            while not _exited(proc.pid) and self.clock() < deadline:
                self.sleep(0.02)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.kill()  # in case it somehow left its group: stop() must never hang on it
            proc.wait()
        finally:
            self._closing.set()
            if self._thread is not None:
                self._thread.join(timeout=3)
            proc.stdout.close()
        if self._tail.strip():
            parsed = parse_line(self._tail)
            if _useful(parsed):
                self._samples.append((self._tail_time, parsed))
            self._tail = b""
        return list(self._samples)

    def __enter__(self) -> "TegrastatsSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(samples: list[tuple[float, dict]], start: float, end: float, inferences: int) -> dict:
    """Power, energy and load over the samples stamped inside [start, end] (time.monotonic()).

    Total power is the ``VDD_IN`` rail when the module reports it (Orin NX / Orin Nano: the whole module's
    input; ``POM_5V_IN`` on JetPack 4). AGX Orin has no such rail (VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, ...),
    so there the total is the sum of every rail in the sample: an approximation of module power, labelled
    in ``power_source``. Sensors reading -256 C are powered down and left out of the temperature peaks.
    """
    window = [parsed for t, parsed in samples if start <= t <= end]
    duration = end - start

    rails: dict[str, list[int]] = {}
    totals: list[int] = []
    sources = set()
    for s in window:
        for name, rail in s["rails_mw"].items():
            rails.setdefault(name, []).append(rail["cur"])
        source = next((r for r in INPUT_RAILS if r in s["rails_mw"]), None)
        if source:
            totals.append(s["rails_mw"][source]["cur"])
            sources.add(source)
        elif s["rails_mw"]:
            totals.append(sum(r["cur"] for r in s["rails_mw"].values()))
            sources.add("sum of rails")

    power_avg = _mean(totals)
    energy = (power_avg / 1000 * duration / inferences * 1000
              if power_avg is not None and inferences > 0 and duration > 0 else None)

    ram = [s["ram_mb"]["used"] for s in window if s["ram_mb"]]
    gpu = [s["gpu"] for s in window if s["gpu"]]
    gpu_loads = [g["load_pct"] for g in gpu if g["load_pct"] is not None]
    gpcs = max((len(g["freq_mhz"]) for g in gpu), default=0)
    emc = [s["emc"] for s in window if s["emc"]]
    temps: dict[str, float] = {}
    for s in window:
        for name, t in s["temps_c"].items():
            if t["cur"] > SENSOR_OFF_C:
                temps[name] = max(temps.get(name, t["cur"]), t["cur"])

    return {
        "samples": len(window),
        "window_s": duration,
        "power_source": " + ".join(sorted(sources)) or None,
        "power_mw": {"avg": power_avg, "peak": max(totals) if totals else None},
        "energy_per_inference_mj": energy,
        "rails_mw": {name: {"avg": _mean(v), "peak": max(v)} for name, v in rails.items()},
        "ram_used_mb": {"avg": _mean(ram), "peak": max(ram) if ram else None},
        "gpu_load_pct_avg": _mean(gpu_loads),
        "gpu_freq_mhz_avg": [_mean([g["freq_mhz"][k] for g in gpu if len(g["freq_mhz"]) > k]) for k in range(gpcs)],
        "emc_load_pct_avg": _mean([e["load_pct"] for e in emc if e["load_pct"] is not None]),
        "emc_freq_mhz_avg": _mean([e["freq_mhz"] for e in emc if e["freq_mhz"] is not None]),
        "temps_c_peak": temps,
        "warning": ("window too short for tegrastats interval; lengthen --duration" if len(window) < 2 else None),
    }
