"""`edgetok profile`: real ONNX Runtime CPU profiles, consistent statistics, comparison table and plot,
and one-line errors for what cannot run.

No test here asserts on measured times or on relations between them: the real profiles are checked for the
arithmetic the report does from what it recorded, and the timing loop's rules and the Jetson energy figures are
checked exactly on injected clocks."""

import functools
import inspect
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from cli_assertions import assert_one_line_error, run_cli
from test_jetson import FakeClock, group_ends, open_feed, wait_for

from edgetok.profile import measure, profiler, tegrastats
from edgetok.profile.measure import Measurement, timed_round, warm_up
from edgetok.profile.profiler import ProfileOptions, profile, write_reports
from edgetok.profile.stats import summarize, warnings_for
from edgetok.vit.export import ViTExportOptions, export_vit


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, opts in {"dense": dict(method="none"), "tome": dict(method="tome", r=10)}.items():
        paths[name] = export_vit(ViTExportOptions(model="deit_tiny_patch16_224", img_size=96,
                                                  output=str(root / f"{name}.onnx"), **opts))["path"]
    return paths


def test_summary_statistics_match_numpy_and_warn_like_trtexec():
    samples = [0.010, 0.011, 0.012, 0.013, 0.050]
    s = summarize(samples)
    assert s["min"] == pytest.approx(10.0) and s["max"] == pytest.approx(50.0)
    assert s["median"] == pytest.approx(12.0) and s["mean"] == pytest.approx(19.2)
    assert s["p90"] == pytest.approx(np.percentile(np.array(samples) * 1e3, 90))
    assert s["stdev"] == pytest.approx(np.std(np.array(samples) * 1e3, ddof=1))
    assert s["cv"] == pytest.approx(s["stdev"] / s["mean"])
    steady = summarize([0.010] * 20)
    assert warnings_for({"latency": steady}) == []
    assert "unstable" in warnings_for({"latency": s})[0]
    gpu = {"latency": steady, "compute": steady, "enqueue": summarize([0.009] * 20), "h2d": summarize([0.02] * 20)}
    notes = " ".join(warnings_for(gpu))
    assert "enqueue-bound" in notes and "H2D-bound" in notes


@pytest.mark.slow
def test_real_onnxruntime_cpu_profile_is_consistent(onnx_pair):
    result = profile(ProfileOptions(models=[onnx_pair["dense"]], batch=2, duration_s=0.5, iterations=5,
                                    warmup_ms=50, threads=1))
    (m,) = result["models"]
    lat = m["timings_ms"]["latency"]
    assert lat["min"] <= lat["median"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"] and lat["stdev"] >= 0
    assert m["iterations"] >= 5  # the count is a floor the loop enforces, whatever the machine's speed
    # Throughput is the iterations over the loop's wall time (overhead included), times the batch.
    assert m["throughput"]["qps"] == pytest.approx(m["iterations"] / m["wall_s"], rel=1e-12)
    assert m["throughput"]["items_per_s"] == pytest.approx(2 * m["throughput"]["qps"], rel=1e-12)
    assert m["runner"]["execution_provider"] == "CPUExecutionProvider"
    assert m["runner"]["intra_op_threads"] == 1 and m["runner"]["allow_spinning"] is False
    assert m["batch"] == 2 and m["precision"] == "fp32"
    env = result["environment"]
    assert env["cpu"] and env["cpu_count"] >= 1 and env["versions"]["onnxruntime"]


class SteppingRunner:
    """A stand-in runner: each inference moves the injected clock on by ``step`` s and reports ``latency`` s."""

    def __init__(self, clock: FakeClock, step: float, latency: float):
        self.clock, self.step, self.latency, self.calls = clock, step, latency, 0

    def infer(self) -> dict:
        self.calls += 1
        self.clock.now += self.step
        return {"latency": self.latency}


def test_timed_round_and_warm_up_on_an_injected_clock():
    """The loop's rules, exactly: run until the duration has passed *and* the iterations are done; wall time,
    progress ticks and throughput come from the loop clock, the window from the window clock."""
    clock = FakeClock(10.0)
    runner = SteppingRunner(clock, step=0.25, latency=0.1875)  # 0.0625 s of loop overhead per inference
    warm_up(runner, 0.6, clock=clock)
    assert runner.calls == 3  # 0.25, 0.5 (< 0.6: once more), 0.75
    warm_up(runner, 0.0, clock=clock)
    assert runner.calls == 4  # always at least one

    m, ticks = Measurement(), []
    windows = iter([500.0, 507.5, 600.0, 601.5])
    timed_round(runner, m, 1.0, 2, ticks.append, clock=clock, window_clock=windows.__next__)
    assert len(m.records) == 4 and m.wall_s == 1.0  # the duration decided: 4 x 0.25 s
    assert ticks == [0.5, 0.5, 0.0]  # a tick once more than 0.25 s passed, and the rest at the end
    timed_round(runner, m, 0.5, 6, ticks.append, clock=clock, window_clock=windows.__next__)
    assert len(m.records) == 10 and m.wall_s == 2.5  # the count decided: 6 x 0.25 s
    assert sum(ticks) == m.wall_s
    assert m.windows == [(500.0, 507.5), (600.0, 601.5)]

    report = m.report(batch=2)
    assert report["iterations"] == 10 and report["wall_s"] == 2.5
    assert report["throughput"] == {"qps": 4.0, "items_per_s": 8.0}  # 2 items / 0.25 s, not / 0.1875 s latency
    lat = report["timings_ms"]["latency"]
    assert lat["min"] == lat["median"] == lat["max"] == pytest.approx(187.5) and lat["stdev"] == 0.0


def test_the_sampler_stamps_on_the_clock_of_the_rounds_windows():
    """summarize() compares tegrastats stamps with timed_round's windows: both must default to time.monotonic."""
    assert inspect.signature(timed_round).parameters["window_clock"].default is time.monotonic
    assert tegrastats.TegrastatsSampler().clock is time.monotonic


@pytest.mark.slow
def test_comparison_table_and_plot_from_two_real_profiles(onnx_pair, tmp_path):
    result = profile(ProfileOptions(models=[onnx_pair["dense"], onnx_pair["tome"]], duration_s=0.4, iterations=3,
                                    warmup_ms=20, rounds=2))
    dense, tome = result["comparison"]
    assert dense["speedup"] == pytest.approx(1.0) and dense["flops_bound"] == pytest.approx(1.0)
    side = json.loads(Path(onnx_pair["tome"]).with_name("tome.edgetok.json").read_text())
    dense_side = json.loads(Path(onnx_pair["dense"]).with_name("dense.edgetok.json").read_text())
    assert tome["gmacs"] == side["flops"]["reduced_gmacs"]
    # the bound the export printed (unrounded), not a ratio of the 4-decimal GMACs
    assert tome["flops_bound"] == pytest.approx(side["flops"]["speedup_bound"] / dense_side["flops"]["speedup_bound"])
    assert tome["flops_bound"] == pytest.approx(dense_side["flops"]["reduced_gmacs"] / side["flops"]["reduced_gmacs"],
                                                rel=1e-2)
    assert tome["speedup"] == pytest.approx(dense["median_ms"] / tome["median_ms"])
    assert tome["speedup_over_bound"] == pytest.approx(tome["speedup"] / tome["flops_bound"])
    json_path, md_path, png_path = write_reports(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["comparison"] == result["comparison"]
    md = md_path.read_text().splitlines()
    assert any(line.startswith("| dense | onnxruntime |") for line in md)
    assert any(line.startswith("| tome | onnxruntime |") and f"{tome['speedup']:.2f}x" in line for line in md)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000


@pytest.mark.slow
def test_profile_cli_with_npz_inputs(capsys, onnx_pair, tmp_path):
    np.savez(tmp_path / "in.npz", pixel_values=np.zeros((3, 3, 96, 96), np.float32))
    code, out, err = run_cli(capsys, "profile", onnx_pair["dense"], "--inputs", str(tmp_path / "in.npz"),
                             "--duration", "0.2", "--warmup", "10", "-o", str(tmp_path / "r"))
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "profile.json").read_text())
    assert report["models"][0]["batch"] == 3 and report["settings"]["inputs"].endswith("in.npz")
    assert "| dense | onnxruntime | 3 |" in out


@pytest.mark.slow
def test_torch_runner_recreates_the_model_from_the_sidecar(onnx_pair):
    result = profile(ProfileOptions(models=[onnx_pair["tome"]], backend="torch", duration_s=0.2, iterations=2,
                                    warmup_ms=10))
    (m,) = result["models"]
    assert m["runner"]["backend"] == "torch" and m["runner"]["weights"] == "random"
    assert m["reduction"]["method"] == "tome" and m["timings_ms"]["latency"]["median"] > 0


@pytest.mark.slow
def test_recipe_sweep_exports_and_profiles_each_variant(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text("export:\n  model: deit_tiny_patch16_224\n  method: tome\n  img_size: 64\n"
                              "  output: m/t.onnx\nprofile:\n  sweep:\n    r: [0, 4]\n  duration: 0.2\n")
    code, out, err = run_cli(capsys, "profile", "--recipe", "s.yaml", "--warmup", "10", "--duration", "0.3")
    assert code == 0, err
    assert json.loads(Path("edgetok-out/profile/profile.json").read_text())["settings"]["duration_s"] == 0.3
    assert sorted(p.name for p in Path("m").glob("*.onnx")) == ["t_r0.onnx", "t_r4.onnx"]
    report = json.loads(Path("edgetok-out/profile/profile.json").read_text())
    assert [r["name"] for r in report["comparison"]] == ["r=0", "r=4"]
    assert report["comparison"][1]["flops_bound"] > 1.2


def _fake_engine(tmp_path, backend="tensorrt-rtx"):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 64)
    Path(f"{engine}.build.json").write_text(json.dumps({"backend": {"name": backend}, "precision": "fp16",
                                                       "profiles": [[{"opt": [4, 3, 224, 224]}]]}))
    return engine


@pytest.mark.slow
def test_bad_inputs(capsys, tmp_path, onnx_pair):
    engine = _fake_engine(tmp_path)
    cases = [
        (["profile", str(tmp_path / "missing.onnx")], ["missing.onnx", "does not exist"]),
        (["profile", str(engine), "--backend", "onnxruntime", "--device", "cuda"],
         ["tensorrt-rtx engine", "--backend onnxruntime cannot run it"]),
        (["profile", str(engine)], ["engine", "--device cuda"]),
        (["profile", onnx_pair["dense"], "--backend", "tensorrt"], ["build-engine"]),
        (["profile", onnx_pair["dense"], "--device", "jetson"], ["--device jetson", "not a Jetson", "--host"]),
        (["profile", onnx_pair["dense"], "--device", "cuda"], ["CUDAExecutionProvider", "onnxruntime-gpu"]),
        (["profile", onnx_pair["dense"], "--inputs", str(tmp_path / "none.npz")], ["none.npz"]),
        (["profile"], ["at least one model"]),
        (["profile", onnx_pair["dense"], "--duration", "nan"], ["--duration nan"]),
        (["profile", onnx_pair["dense"], "--threads", "-3"], ["--threads -3"]),
    ]
    for args, needles in cases:
        code, out, err = run_cli(capsys, *args, "-o", str(tmp_path / "never"))
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_unreachable_host_is_one_line(capsys, tmp_path, onnx_pair, monkeypatch):
    """A stand-in ssh answers as OpenSSH does for a name that does not resolve: no DNS or network needed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'ssh: Could not resolve hostname host.invalid: Name or service "
                                 "not known' >&2\nexit 255\n")
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code, out, err = run_cli(capsys, "profile", onnx_pair["dense"], "--host", "nobody@host.invalid",
                             "-o", str(tmp_path / "never"))
    assert_one_line_error(code, err, "cannot reach nobody@host.invalid over ssh (ssh: Could not resolve hostname")
    assert not (tmp_path / "never").exists()


def _stand_in(bin_dir: Path, name: str, fixture: Path):
    """An executable printing a captured output (without its `#` header) once."""
    body = "\n".join(line for line in fixture.read_text().splitlines() if not line.startswith("#"))
    data = bin_dir / f"{name}.txt"
    data.write_text(body + "\n")
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\ncat "{data}"\n')
    script.chmod(0o755)


@pytest.mark.slow
def test_jetson_profile_reports_power_energy_and_clock_state(onnx_pair, tmp_path, monkeypatch):
    """Stand-in tegrastats, nvpmodel and jetson_clocks (captured outputs) on PATH. The test hands tegrastats its
    lines at chosen moments of the run, with the sampler's clock set for each, and steps the round's clocks, so
    which samples fall in the model's window, the iteration count and the energy per inference are exact."""
    fixtures = Path(__file__).parent / "fixtures"
    bin_dir, feed, argv = tmp_path / "bin", tmp_path / "feed", tmp_path / "argv"
    bin_dir.mkdir()
    os.mkfifo(feed)
    (bin_dir / "tegrastats").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{argv}"\nexec cat "{feed}"\n')
    (bin_dir / "tegrastats").chmod(0o755)
    _stand_in(bin_dir, "nvpmodel", fixtures / "nvpmodel" / "thor-maxn.txt")
    _stand_in(bin_dir, "jetson_clocks", fixtures / "jetson_clocks" / "agx-orin-jp5-dynamic.txt")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr("edgetok.profile.jetson.is_jetson", lambda: True)
    agx = fixtures / "tegrastats" / "agx-orin-jetpack7.2.txt"
    line = ("".join(ln for ln in agx.read_text().splitlines(keepends=True) if not ln.startswith("#"))).encode()

    stamp, samplers, fd = FakeClock(), [], None
    real_sampler = tegrastats.TegrastatsSampler

    def sampler_on_the_fake_clock(**kwargs):
        samplers.append(real_sampler(clock=stamp, **kwargs))
        return samplers[-1]

    def send(at: float) -> None:
        """One tegrastats line, arriving while the sampler's clock reads ``at``."""
        n = len(samplers[0]._samples) + 1
        stamp.now = at
        os.write(fd, line)
        wait_for(lambda: len(samplers[0]._samples) == n, f"tegrastats sample {n}")

    def window_clock() -> float:  # read by timed_round as the round starts and as it ends
        nonlocal fd
        if fd is None:
            fd = open_feed(feed)
            send(99.0)  # stamped before the window, as a line from the warm-up would be
            return 100.0
        send(101.0)  # as the round ends: on the window's edge, so it counts
        return 101.0

    readings = []

    def loop_clock() -> float:  # 0.125 s per reading: the 0.75 s round is exactly 6 inferences
        n = len(readings)
        readings.append(n * 0.125)
        if n in (2, 4):  # after the 2nd and 4th inference
            send(100.0 + n * 0.125)
        return readings[-1]

    monkeypatch.setattr(tegrastats, "TegrastatsSampler", sampler_on_the_fake_clock)
    monkeypatch.setattr(profiler, "timed_round",
                        functools.partial(measure.timed_round, clock=loop_clock, window_clock=window_clock))
    try:
        result = profile(ProfileOptions(models=[onnx_pair["dense"]], device="jetson", ep="cpu", duration_s=0.75,
                                        iterations=2, warmup_ms=10, tegrastats_interval_ms=50))
    finally:
        if fd is not None:
            os.close(fd)
    (sampler,) = samplers
    assert argv.read_text().split() == ["--interval", "50"]
    assert [t for t, _ in sampler.stop()] == [99.0, 100.25, 100.5, 101.0]
    group_ends(sampler.pid)  # profile() stopped tegrastats
    (m,) = result["models"]
    assert m["iterations"] == 6 and m["wall_s"] == 0.75
    power = m["jetson"]
    assert power["samples"] == 3 and power["window_s"] == 1.0  # 100.25, 100.5 and 101.0; not 99.0
    # AGX Orin has no VDD_IN: total power is the sum of its three rails, 5139 + 3268 + 5500 mW.
    assert power["power_source"] == "sum of rails" and power["power_mw"] == {"avg": 13907.0, "peak": 13907}
    # 13.907 W for 1 s over 6 inferences = 2.3178 J each.
    assert power["energy_per_inference_mj"] == pytest.approx(13907 / 6, rel=1e-12)
    assert result["jetson"]["power_mode"] == {"name": "MAXN", "id": 0}
    assert result["jetson"]["clocks"]["locked"] is False and "jetson_clocks" in result["jetson"]["warning"]
    assert result["comparison"][0]["energy_mj"] == power["energy_per_inference_mj"]


def _report(name: str, batch: int, median: float, qps: float, accuracy: dict | None = None) -> dict:
    """A model's profile report as compare.rows reads it, with a wall-clock throughput that disagrees with
    its median latency (as a few slow outliers make it do)."""
    latency = {**{k: median for k in ("min", "mean", "median", "p90", "p95", "p99", "max")}, "stdev": 0.0, "cv": 0.0}
    return {"name": name, "runner": {"backend": "onnxruntime"}, "batch": batch, "precision": "fp32",
            "timings_ms": {"latency": latency}, "throughput": {"qps": qps, "items_per_s": qps * batch},
            "flops": None, "reduction": {"method": "tome"}, "accuracy": accuracy}


def test_items_per_second_and_speedup_come_from_the_same_median():
    """r=4 is faster by its median but slower by the loop's wall clock: the table's items/s must rank it as its
    speedup does, both from the median latency."""
    from edgetok.profile import compare

    dense, r4, b8 = _report("dense", 2, 50.0, 19.0), _report("r=4", 2, 46.0, 18.0), _report("b8", 8, 160.0, 6.0)
    rows = compare.rows([dense, r4, b8])
    assert [r["items_per_s"] for r in rows] == pytest.approx([40.0, 2e3 / 46, 50.0], rel=1e-12)
    assert rows[1]["speedup"] == pytest.approx(50 / 46, rel=1e-12) and rows[1]["items_per_s"] > rows[0]["items_per_s"]
    assert rows[2]["speedup"] == pytest.approx(50.0 / 40.0, rel=1e-12)  # other batch: ratio of items/s at median
    table = compare.markdown(rows)
    assert "| items/s at median |" in table and "| 43.5 | – | 1.09x |" in table
    assert "batch / median latency" in compare.notes(rows)


def test_agreement_columns_name_their_reference(tmp_path):
    """Agreement and KL come from an earlier `eval --reference`: the table names that model (file, hash prefix)."""
    from edgetok.profile import compare

    sha = "ab12cd34ef56" + "0" * 52
    acc = {"top1": 0.97, "reference": {"model": "out/dense.onnx", "sha256": sha, "top1_agreement": 0.99, "mean_kl": 0.01}}
    old = {"top1": 0.95, "reference": {"model": "old/dense.onnx", "top1_agreement": 0.98, "mean_kl": 0.02}}
    rows = compare.rows([_report("dense", 1, 10.0, 100.0), _report("tome", 1, 8.0, 120.0, acc),
                         _report("evit", 1, 7.0, 140.0, old)])
    assert [r["reference"] for r in rows] == [None, "dense.onnx (ab12cd34ef56)", "dense.onnx (hash not recorded)"]
    lines = compare.markdown(rows).splitlines()
    assert lines[0].endswith("| agreement | KL | vs (eval --reference) |")
    assert lines[3].endswith("| 99.00% | 0.0100 | dense.onnx (ab12cd34ef56) |")
    assert "earlier `edgetok eval`" in compare.notes(rows)
