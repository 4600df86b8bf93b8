"""Jetson profiling without a Jetson: the parsers against captured tegrastats / jetson_clocks / nvpmodel output
(plus two constructed tegrastats lines, labelled as such), and the background sampler against stand-in executables
put first on PATH.

Every fixture's `#` header says whether it is captured output (and from where) or constructed (and which fields are
real in form). No test here asserts on the wall clock: where time matters the sampler gets an injected clock, and
waiting for a stand-in process polls for the event itself, with only a generous hang guard."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from edgetok.errors import EdgetokError
from edgetok.profile import jetson, tegrastats
from edgetok.profile.tegrastats import TegrastatsSampler, parse_line, summarize

FIXTURES = Path(__file__).parent / "fixtures"
AGX_JP72 = FIXTURES / "tegrastats" / "agx-orin-jetpack7.2.txt"  # captured (second hand: see its header)
AGX_JP5 = FIXTURES / "tegrastats_web" / "agx-orin-jetpack5.txt"  # captured
# Constructed, not captured: only their GR3D_FREQ field is a real form; RAM/EMC_FREQ/APE are filler.
JP6_CONSTRUCTED = FIXTURES / "tegrastats" / "orin-jetpack6-gr3d-fragment.txt"
THOR_CONSTRUCTED = FIXTURES / "tegrastats" / "thor-gr3d-fragment.txt"
CONSTRUCTED = {JP6_CONSTRUCTED, THOR_CONSTRUCTED}

CAPTURED_LABEL = "# CAPTURED output"
CONSTRUCTED_LABEL = "# CONSTRUCTED, not captured output."


def lines(path: Path) -> list[str]:
    """A fixture's data lines, without the `#` header that says where it came from."""
    return [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_every_fixture_says_whether_it_is_captured_or_constructed():
    """Each fixture opens with its label: captured output with the address it was copied from, or constructed with
    which fields are real in form and which are filler; the tests' own list of constructed fixtures matches."""
    files = sorted(p for p in FIXTURES.rglob("*") if p.is_file())
    assert len(files) == 9
    constructed = set()
    for path in files:
        text = path.read_text().splitlines()
        header = [ln for ln in text if ln.startswith("#")]
        assert header and text[:len(header)] == header, path  # the label comes first, before any data line
        said = " ".join(header)
        if header[0].startswith(CONSTRUCTED_LABEL):
            constructed.add(path)
            assert "is a real form" in said and "filler" in said, path
        else:
            assert header[0].startswith(CAPTURED_LABEL), path
            assert "https://" in said, path
    assert constructed == CONSTRUCTED


def only_line(path: Path) -> dict:
    (line,) = lines(path)
    return parse_line(line)


# ------------------------------------------------------------------------------------------ parse_line
def test_parse_agx_orin_jetpack72_line():
    """A captured line, second hand (from jetson_stats' test file; its GR3D load may have been edited there)."""
    s = only_line(AGX_JP72)
    assert s["time"] == "07-25-2026 09:08:28"
    assert s["ram_mb"] == {"used": 20642, "total": 62817}
    assert s["swap_mb"] is None
    assert len(s["cpu"]) == 12
    assert s["cpu"][0] == {"load_pct": 23, "freq_mhz": 2201}
    assert s["cpu"][8] == {"load_pct": 33, "freq_mhz": 2201}
    assert s["cpu"][11] == {"load_pct": 27, "freq_mhz": 2201}
    assert s["emc"] == {"load_pct": 3, "freq_mhz": 3199}
    assert s["gpu"] == {"load_pct": 12, "freq_mhz": [1300, 1300]}
    assert s["rails_mw"] == {
        "VDD_GPU_SOC": {"cur": 5139, "avg": 5139, "max": 5139},
        "VDD_CPU_CV": {"cur": 3268, "avg": 3268, "max": 3268},
        "VIN_SYS_5V0": {"cur": 5500, "avg": 5500, "max": 5500},
    }
    assert s["temps_c"]["cpu"] == {"cur": 52.968, "max": 52.968}
    assert s["temps_c"]["gpu"] == {"cur": 47.625, "max": 47.625}
    assert set(s["temps_c"]) == {"cpu", "soc2", "soc0", "gpu"}
    assert s["engines"]["NVENC0"] == "off"
    assert s["engines"]["NVDLA1"] == "off"
    assert s["engines"]["PVA0_FREQ"] == "off"
    assert s["engines"]["APE"] == 174
    assert s["unknown"] == []


def test_parse_jetpack6_and_thor_gr3d_forms_in_constructed_lines():
    """Constructed lines, not captures: only their GR3D_FREQ fields are real forms (JetPack 6 plain `10%@1300`,
    Thor's array without a load); the filler around them checks that parsing carries on past the field."""
    jp6 = only_line(JP6_CONSTRUCTED)
    assert jp6["gpu"] == {"load_pct": 10, "freq_mhz": [1300]}
    assert jp6["ram_mb"] == {"used": 4722, "total": 7844}  # "(lfb 1x512kB)" is skipped, not unknown
    assert jp6["emc"] == {"load_pct": 2, "freq_mhz": 1866}
    assert jp6["engines"] == {"APE": 150}
    assert jp6["time"] is None and jp6["unknown"] == []
    thor = only_line(THOR_CONSTRUCTED)
    assert thor["gpu"] == {"load_pct": None, "freq_mhz": [1000, 1000, 1000]}
    assert thor["unknown"] == []


def test_parse_agx_orin_jetpack5_line_from_the_web():
    """A captured line, verbatim from a blog post."""
    s = only_line(AGX_JP5)
    assert s["time"] == "04-24-2023 00:01:24"
    assert s["swap_mb"] == {"used": 0, "total": 31398}
    assert s["gpu"] == {"load_pct": 0, "freq_mhz": [0, 0]}  # GR3D_FREQ and GR3D2_FREQ: one GPC each
    assert s["rails_mw"]["VDD_GPU_SOC"] == {"cur": 2399, "avg": 2399, "max": None}
    assert s["rails_mw"]["VDDQ_VDD2_1V8AO"] == {"cur": 301, "avg": 301, "max": None}
    assert "NC" in s["rails_mw"] and "NC_2" in s["rails_mw"]  # the second "NC" rail is not lost
    assert s["temps_c"]["CV0"] == {"cur": -256.0, "max": None}
    assert s["temps_c"]["Tdiode"] == {"cur": 33.25, "max": None}
    assert s["engines"] == {"VIC_FREQ": 729, "APE": 174}
    assert s["unknown"] == []


def test_every_tegrastats_fixture_line_parses_cleanly():
    """Captured and constructed lines alike."""
    for path in [*sorted((FIXTURES / "tegrastats").glob("*.txt")), AGX_JP5]:
        for line in lines(path):
            s = parse_line(line)
            assert s["unknown"] == [], path
            assert s["ram_mb"] is not None and s["gpu"] is not None and s["emc"] is not None, path
            assert json.loads(json.dumps(s)) == s


def test_two_value_rail_and_garbage_never_raise():
    s = parse_line("VDD_IN 5000mW/4800mW VDD_CPU_GPU_CV 1200mW/1100mW garbage ??? 12%@ RAM")
    assert s["rails_mw"] == {"VDD_IN": {"cur": 5000, "avg": 4800, "max": None},
                             "VDD_CPU_GPU_CV": {"cur": 1200, "avg": 1100, "max": None}}
    assert s["unknown"] == ["garbage", "???", "12%@", "RAM"]
    old = parse_line("RAM 2011/3964MB (lfb 66x4MB) IRAM 0/252kB(lfb 252kB) MTS fg 0% bg 0% POM_5V_IN 1228/1228")
    assert old["rails_mw"] == {"POM_5V_IN": {"cur": 1228, "avg": 1228, "max": None}}
    assert "IRAM" in old["unknown"] and "MTS" in old["unknown"] and "fg" in old["unknown"]
    for odd in [None, b"\xff\xfe RAM", "", "   ", "\x00\x01", "CPU [", "CPU [x%@y,,]", "GR3D_FREQ 12%@[",
                "GR3D_FREQ @[a,b]", "RAM 1/", "EMC_FREQ", "VDD_IN 1mW/2mW/3mW/4mW", "@@@C", 12345, "x" * 10000]:
        s = parse_line(odd)
        assert set(s) == {"time", "ram_mb", "swap_mb", "cpu", "emc", "gpu", "engines", "rails_mw", "temps_c",
                          "unknown"}
        assert all(isinstance(u, str) for u in s["unknown"])


# ------------------------------------------------------------------------------------------- summarize
def sample(ram: int, load: int, f1: int, f2: int, vdd_in: int, cpu_c: float) -> dict:
    return parse_line(f"RAM {ram}/7620MB (lfb 1x4MB) EMC_FREQ 5%@2133 GR3D_FREQ {load}%@[{f1},{f2}] "
                      f"cpu@{cpu_c}C/{cpu_c}C tj@50.5C/50.5C VDD_IN {vdd_in}mW/{vdd_in}mW/{vdd_in}mW "
                      f"VDD_CPU_GPU_CV 900mW/900mW/900mW")


def test_summarize_by_hand_with_vdd_in():
    samples = [
        (9.5, sample(9999, 99, 9, 9, 99999, 99.0)),  # before the window: ignored
        (10.0, sample(3000, 40, 600, 610, 5000, 50.0)),
        (11.0, sample(3100, 60, 612, 612, 7000, 55.5)),
        (12.0, sample(2900, 50, 609, 605, 6000, 52.0)),
        (12.5, sample(9999, 99, 9, 9, 99999, 99.0)),  # after: ignored
    ]
    out = summarize(samples, start=10.0, end=12.0, inferences=400)
    assert out["samples"] == 3
    assert out["power_source"] == "VDD_IN"  # not VDD_IN + VDD_CPU_GPU_CV: the rail is part of the input
    assert out["power_mw"] == {"avg": 6000.0, "peak": 7000}
    # 6 W for 2 s over 400 inferences = 0.03 J = 30 mJ each.
    assert out["energy_per_inference_mj"] == pytest.approx(30.0)
    assert out["rails_mw"]["VDD_IN"] == {"avg": 6000.0, "peak": 7000}
    assert out["rails_mw"]["VDD_CPU_GPU_CV"] == {"avg": 900.0, "peak": 900}
    assert out["ram_used_mb"] == {"avg": 3000.0, "peak": 3100}
    assert out["gpu_load_pct_avg"] == pytest.approx(50.0)
    assert out["gpu_freq_mhz_avg"] == [pytest.approx(607.0), pytest.approx(609.0)]
    assert out["emc_freq_mhz_avg"] == 2133 and out["emc_load_pct_avg"] == 5
    assert out["temps_c_peak"] == {"cpu": 55.5, "tj": 50.5}
    assert out["warning"] is None
    assert json.loads(json.dumps(out)) == out


def test_summarize_sums_rails_on_agx_orin():
    line = lines(AGX_JP72)[0]
    out = summarize([(0.0, parse_line(line)), (1.0, parse_line(line))], start=0.0, end=1.0, inferences=10)
    assert out["power_source"] == "sum of rails"
    assert out["power_mw"]["avg"] == 5139 + 3268 + 5500  # 13907 mW
    # 13.907 W for 1 s over 10 inferences = 1.3907 J = 1390.7 mJ each.
    assert out["energy_per_inference_mj"] == pytest.approx(1390.7)
    assert out["gpu_freq_mhz_avg"] == [1300, 1300]
    assert out["temps_c_peak"]["cpu"] == 52.968


def test_summarize_constructed_thor_line_has_no_gpu_load_and_skips_powered_down_sensors():
    """The Thor line is constructed (real GR3D_FREQ form, filler around it); the -256C sensors are from the captured
    JetPack 5 line."""
    thor = parse_line(lines(THOR_CONSTRUCTED)[0])
    out = summarize([(1.0, thor), (2.0, thor)], 1.0, 2.0, 5)
    assert out["gpu_load_pct_avg"] is None
    assert out["gpu_freq_mhz_avg"] == [1000, 1000, 1000]
    assert out["power_mw"] == {"avg": None, "peak": None} and out["energy_per_inference_mj"] is None
    jp5 = parse_line(lines(AGX_JP5)[0])
    temps = summarize([(0.0, jp5), (0.5, jp5)], 0.0, 1.0, 1)["temps_c_peak"]
    assert "GPU" not in temps and "CV0" not in temps  # -256C: sensor powered down
    assert temps["CPU"] == 42.593


def test_summarize_warns_when_the_window_is_too_short():
    one = summarize([(0.5, sample(3000, 40, 600, 610, 5000, 50.0))], 0.0, 1.0, 10)
    assert one["samples"] == 1
    assert one["warning"] == "window too short for tegrastats interval; lengthen --duration"
    assert one["energy_per_inference_mj"] == pytest.approx(500.0)  # 5 W x 1 s / 10
    none = summarize([(5.0, sample(3000, 40, 600, 610, 5000, 50.0))], 0.0, 1.0, 10)
    assert none["samples"] == 0 and none["warning"] and none["energy_per_inference_mj"] is None
    assert none["ram_used_mb"] == {"avg": None, "peak": None}


# ------------------------------------------------------------------------------------ the sampler
HANG_GUARD_S = 120  # only ends a test that would otherwise hang; never a check of how fast anything ran


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def live_group_members(pgid: int) -> list[int]:
    """Processes (not zombies: this container's PID 1 may never reap orphans) in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = raw[raw.rfind(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_for(predicate, what: str) -> None:
    """Poll until ``predicate()`` holds: stand-in processes get scheduled whenever a busy machine lets them."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, f"hung: {what} never happened"
        time.sleep(0.01)


def group_ends(pgid: int) -> None:
    """A SIGKILLed process is gone only once the kernel has run its exit: wait for that, however long it takes."""
    wait_for(lambda: live_group_members(pgid) == [], f"process group {pgid} to end")


class FakeClock:
    """A clock that moves only when a test sets it or when the sampler sleeps on it, so sample stamps and the
    SIGTERM grace period are exact numbers whatever the load on the machine."""

    def __init__(self, now: float = 0.0):
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_bin(tmp_path, monkeypatch) -> Path:
    """A directory first on PATH for stand-in tegrastats / nvpmodel / jetson_clocks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FIXTURE", str(AGX_JP72))
    return bin_dir


# Ignores --interval. The lines come from a child in the leader's process group, printed only after the child has
# set its signal disposition: a leader-only kill would orphan it, and once samples arrive the trap is in place.
LOOPING_TEGRASTATS = """#!/bin/sh
( {child}while :; do grep -v '^#' "$FIXTURE"; sleep 0.05; done ) &
wait
"""


@pytest.mark.parametrize("child", ["", "trap '' TERM; "], ids=["child-dies-on-sigterm", "child-ignores-sigterm"])
def test_sampler_collects_and_leaves_no_process_behind(fake_bin, child):
    write_exe(fake_bin / "tegrastats", LOOPING_TEGRASTATS.format(child=child))
    sampler = TegrastatsSampler(interval_ms=50).start()
    try:
        wait_for(lambda: len(sampler._samples) >= 4, "4 samples")
        assert len(live_group_members(sampler.pid)) >= 2  # the waiting leader and the printing child
    finally:
        samples = sampler.stop()
    assert len(samples) >= 4
    times = [t for t, _ in samples]
    assert times == sorted(times)
    assert all(s["ram_mb"] == {"used": 20642, "total": 62817} for _, s in samples)
    assert samples[0][1]["rails_mw"]["VDD_GPU_SOC"]["cur"] == 5139
    assert gone(sampler.pid)  # the leader is reaped
    group_ends(sampler.pid)  # and the child, even the one that ignores SIGTERM, was SIGKILLed with the group
    assert sampler.stop() == samples  # twice is harmless


def open_feed(path: Path) -> int:
    """The write end of the FIFO a stand-in tegrastats copies to its stdout, once the stand-in has it open."""
    fd = None

    def opened() -> bool:
        nonlocal fd
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the reader has opened it
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return False
        return True

    wait_for(opened, "the stand-in tegrastats to open its feed")
    return fd


def test_sampler_stamps_lines_with_its_clock_and_the_window_picks_them(fake_bin, tmp_path, monkeypatch):
    """The test hands tegrastats each line itself and sets the injected clock before each: every sample carries
    exactly the clock's reading when it arrived, and summarize() keeps those inside the window, edges included."""
    feed, argv = tmp_path / "feed", tmp_path / "argv"
    os.mkfifo(feed)
    monkeypatch.setenv("FEED", str(feed))
    monkeypatch.setenv("ARGV_OUT", str(argv))
    write_exe(fake_bin / "tegrastats", '#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_OUT"\nexec cat "$FEED"\n')
    line = (lines(AGX_JP72)[0] + "\n").encode()
    clock = FakeClock()
    with TegrastatsSampler(interval_ms=50, clock=clock) as sampler:
        fd = open_feed(feed)
        try:
            for k, now in enumerate([9.5, 10.0, 11.0, 12.0, 12.5], start=1):
                clock.now = now  # only while no line is in flight
                os.write(fd, line)
                wait_for(lambda k=k: len(sampler._samples) == k, f"sample {k}")
        finally:
            samples = sampler.stop()  # with the feed still open: the stand-in is killed, it does not just end
            os.close(fd)
    assert argv.read_text().split() == ["--interval", "50"]
    assert [t for t, _ in samples] == [9.5, 10.0, 11.0, 12.0, 12.5]
    out = summarize(samples, start=10.0, end=12.0, inferences=4)
    assert out["samples"] == 3 and out["window_s"] == 2.0
    assert out["power_source"] == "sum of rails" and out["power_mw"] == {"avg": 13907.0, "peak": 13907}
    # 13.907 W for 2 s over 4 inferences = 6.9535 J = 6953.5 mJ each.
    assert out["energy_per_inference_mj"] == pytest.approx(6953.5, rel=1e-12)
    assert out["warning"] is None
    group_ends(sampler.pid)


# Writes the fixture line and an unfinished one in a single write() (a pipe delivers up to PIPE_BUF bytes at once),
# so when the first sample has arrived the tail is already in the reader's buffer; then waits to be killed.
PARTIAL_LINE_TEGRASTATS = f"""#!{sys.executable}
import os, signal
data = "".join(line for line in open(os.environ["FIXTURE"]) if not line.startswith("#"))
os.write(1, (data + os.environ["TAIL"]).encode())
signal.pause()
"""


@pytest.mark.parametrize("tail, kept", [("RAM 4722/7844MB (lfb 1x512kB) VDD_IN 4000mW/4000mW", True),
                                        ("RAM 47", False)])
def test_sampler_final_partial_line(fake_bin, monkeypatch, tail, kept):
    monkeypatch.setenv("TAIL", tail)
    write_exe(fake_bin / "tegrastats", PARTIAL_LINE_TEGRASTATS)
    sampler = TegrastatsSampler().start()
    wait_for(lambda: len(sampler._samples) >= 1, "the first sample")
    reader = sampler._thread
    samples = sampler.stop()
    assert not reader.is_alive()  # the reader ended on the pipe's end; it was not left waiting for a newline
    assert samples[0][1]["rails_mw"]["VIN_SYS_5V0"]["cur"] == 5500
    if kept:
        assert len(samples) == 2 and samples[1][1]["rails_mw"] == {"VDD_IN": {"cur": 4000, "avg": 4000, "max": None}}
        assert samples[1][0] == samples[0][0]  # stamped when its bytes arrived, with the line before it
    else:
        assert len(samples) == 1
    group_ends(sampler.pid)


def test_sampler_kills_a_tegrastats_that_ignores_sigterm(fake_bin):
    """On the injected clock, stop() gives SIGTERM exactly the grace period, then SIGKILLs the group."""
    write_exe(fake_bin / "tegrastats", """#!/bin/sh
trap '' TERM
while :; do grep -v '^#' "$FIXTURE"; sleep 0.05; done
""")
    clock = FakeClock()
    sampler = TegrastatsSampler(clock=clock, sleep=clock.sleep).start()
    wait_for(lambda: len(sampler._samples) >= 2, "2 samples")  # printed after the trap: SIGTERM is ignored now
    proc = sampler._proc
    samples = sampler.stop()
    assert proc.returncode == -signal.SIGKILL  # it outlived SIGTERM and had to be killed
    grace = tegrastats.SIGTERM_GRACE_S
    assert clock.now >= grace > clock.now - clock.slept[-1]  # waited out the grace period, and not a step more
    assert len(samples) >= 2
    assert gone(sampler.pid)
    group_ends(sampler.pid)


def test_sampler_without_tegrastats(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EdgetokError) as err:
        TegrastatsSampler().start()
    assert "tegrastats not found on PATH" in str(err.value) and "--host user@jetson" in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------- jetson.py
@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="this machine is a Jetson")
def test_is_jetson_false_here():
    assert jetson.is_jetson() is False


def test_is_jetson_from_release_file_or_device_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(jetson, "TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    monkeypatch.setattr(jetson, "DEVICE_TREE_COMPATIBLE", tmp_path / "compatible")
    assert jetson.is_jetson() is False
    (tmp_path / "compatible").write_bytes(b"raspberrypi,4-model-b\x00brcm,bcm2711\x00")
    assert jetson.is_jetson() is False
    (tmp_path / "compatible").write_bytes(b"nvidia,p3737-0000+p3701-0005\x00nvidia,p3701-0005\x00nvidia,tegra234\x00")
    assert jetson.is_jetson() is True
    (tmp_path / "compatible").unlink()
    (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3\n")
    assert jetson.is_jetson() is True


def replay(bin_dir: Path, name: str, fixture: Path | None, exit_code: int = 0, extra: str = "") -> None:
    """A stand-in ``name`` that prints a fixture (without its `#` header) and exits."""
    body = f"grep -v '^#' '{fixture}'\n" if fixture else ""
    write_exe(bin_dir / name, f"#!/bin/sh\n{body}{extra}exit {exit_code}\n")


def test_power_mode_from_real_nvpmodel_output(fake_bin):
    replay(fake_bin, "nvpmodel", FIXTURES / "nvpmodel" / "thor-maxn.txt")
    assert jetson.power_mode() == {"name": "MAXN", "id": 0}
    # Without sudo, JetPack 4 nvpmodel printed the mode and then NVPM ERROR lines: the mode still counts.
    replay(fake_bin, "nvpmodel", FIXTURES / "nvpmodel" / "nano-5w-nonroot.txt")
    assert jetson.power_mode() == {"name": "5W", "id": 1}


def test_power_mode_failures_are_recorded(fake_bin, tmp_path, monkeypatch):
    replay(fake_bin, "nvpmodel", None, 1, "echo 'NVPM ERROR: failed to read power mode' >&2\n")
    mode = jetson.power_mode()
    assert mode["name"] is None and mode["id"] is None
    assert "exited 1" in mode["error"] and "NVPM ERROR: failed to read power mode" in mode["error"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert jetson.power_mode() == {"name": None, "id": None, "error": "nvpmodel not found on PATH"}


def test_clocks_agx_orin_not_locked(fake_bin):
    replay(fake_bin, "jetson_clocks", FIXTURES / "jetson_clocks" / "agx-orin-jp5-dynamic.txt")
    c = jetson.clocks()
    assert "error" not in c
    assert c["locked"] is False
    assert c["gpu"] == {"min_mhz": 306.0, "max_mhz": 1300.5, "current_mhz": 306.0, "freq_override": None,
                        "locked": False}
    assert c["emc"] == {"min_mhz": 204.0, "max_mhz": 3199.0, "current_mhz": 2133.0, "freq_override": False,
                        "locked": False}
    assert [cpu["cpu"] for cpu in c["cpu"]] == list(range(12))  # printed as cpu0, cpu1, cpu10, cpu11, cpu2...
    assert c["cpu"][3] == {"cpu": 3, "online": True, "governor": "schedutil", "min_mhz": 729.6, "max_mhz": 2201.6,
                           "current_mhz": 1190.4}
    assert jetson.lock_warning(c) == "clocks are not locked: run `sudo jetson_clocks` for stable numbers"


def test_clocks_nano_before_and_after_jetson_clocks(fake_bin):
    replay(fake_bin, "jetson_clocks", FIXTURES / "jetson_clocks" / "nano-locked.txt")
    locked = jetson.clocks()
    assert locked["locked"] is True
    assert locked["gpu"]["min_mhz"] == locked["gpu"]["max_mhz"] == locked["gpu"]["current_mhz"] == 921.6
    # EMC stays MinFreq=204 MHz when locked: FreqOverride=1 with CurrentFreq == MaxFreq is what pins it.
    assert locked["emc"] == {"min_mhz": 204.0, "max_mhz": 1600.0, "current_mhz": 1600.0, "freq_override": True,
                             "locked": True}
    assert all(cpu["min_mhz"] == cpu["max_mhz"] == 1428.0 for cpu in locked["cpu"])
    assert jetson.lock_warning(locked) is None

    replay(fake_bin, "jetson_clocks", FIXTURES / "jetson_clocks" / "nano-dynamic.txt")
    dynamic = jetson.clocks()
    assert dynamic["locked"] is False and dynamic["gpu"]["current_mhz"] == 230.4
    assert dynamic["emc"]["freq_override"] is False and dynamic["emc"]["locked"] is False
    assert jetson.lock_warning(dynamic) is not None


def test_clocks_lock_rules():
    gpu = "GPU MinFreq=1020000000 MaxFreq=1020000000 CurrentFreq=1020000000\n"
    assert jetson.parse_clocks(gpu)["locked"] is True  # no EMC line: GPU alone decides
    assert jetson.parse_clocks(gpu + "EMC MinFreq=3199000000 MaxFreq=3199000000 CurrentFreq=3199000000\n")["locked"]
    assert not jetson.parse_clocks(gpu + "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 "
                                         "FreqOverride=0\n")["locked"]
    assert not jetson.parse_clocks(gpu + "EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=2133000000 "
                                         "FreqOverride=1\n")["locked"]  # override on, but not at max
    throttled = "GPU MinFreq=1020000000 MaxFreq=1020000000 CurrentFreq=612000000\n"
    assert jetson.parse_clocks(throttled)["locked"] is False
    assert jetson.parse_clocks("GPU MinFreq=5 MaxFreq=5\n")["locked"] is True  # no CurrentFreq given
    tx1 = jetson.parse_clocks("cpu0: Gonvernor=interactive MinFreq=1734000 MaxFreq=1734000 CurrentFreq=1734000\n")
    assert tx1["cpu"] == [{"cpu": 0, "online": None, "governor": "interactive", "min_mhz": 1734.0,
                           "max_mhz": 1734.0, "current_mhz": 1734.0}]
    assert jetson.parse_clocks("nothing useful\n") == {"locked": None, "gpu": None, "emc": None, "cpu": []}
    assert jetson.lock_warning({"locked": None}) and jetson.lock_warning({}) and jetson.lock_warning(None)


def test_clocks_failures_are_recorded(fake_bin, tmp_path, monkeypatch):
    # jetson_clocks prints its "SOC family" header before refusing a non-root user (its own script's order).
    replay(fake_bin, "jetson_clocks", None, 1, "echo 'SOC family:tegra234  Machine:Jetson AGX Orin'\n"
                                               "echo 'Error: Run this script(/usr/bin/jetson_clocks) as a root user'\n")
    c = jetson.clocks()
    assert c["locked"] is None and c["gpu"] is None
    assert "as a root user" in c["error"] and "exited 1" in c["error"]
    assert jetson.lock_warning(c) is not None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    missing = jetson.clocks()
    assert missing["locked"] is None and missing["error"] == "jetson_clocks not found on PATH"


def test_commands_time_out_instead_of_hanging(fake_bin, tmp_path, monkeypatch):
    """An nvpmodel that never answers is killed at the timeout: the outcome does not depend on how long the stand-in
    took to start, only on it not finishing (it would write `finished` after 30 s)."""
    monkeypatch.setattr(jetson, "TIMEOUT_S", 0.5)
    finished = tmp_path / "finished"
    write_exe(fake_bin / "nvpmodel", f"#!{sys.executable}\nimport time; time.sleep(30)\n"
                                     f"open({str(finished)!r}, 'w').write('nvpmodel -q ran to its end')\n")
    mode = jetson.power_mode()
    assert mode == {"name": None, "id": None, "error": "`nvpmodel -q` did not finish in 0.5 s"}
    assert not finished.exists()  # killed: power_mode() did not wait for it
