"""`edgetok tune`: a real search on the digits model over a local Ray instance (loopback only), resumed after
SIGTERM with a worker process killed on the way; placement on a second local node that offers a custom
resource; bad input refused in one line before Ray, Optuna or torch loads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from cli_assertions import assert_one_line_error, run_cli

TRIALS = 8


def _tune(out: Path, data: Path, train: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgetok", "tune", "edgetok_digits_vit", "--data", str(data), "--calibrate",
            str(train), "--methods", "tome,evit", "--precision", "fp32,int8", "--max-drop", "1.0", "--trials",
            str(TRIALS), "--duration", "0.1", "--workers", "2", "-o", str(out), *extra]


def _done(out: Path) -> list[dict]:
    try:
        trials = json.loads((out / "tune.json").read_text())["trials"]
    except (OSError, ValueError):
        return []
    return [t for t in trials if t["state"] in ("profiled", "not profiled")]


def _kill_first_prepare(found: list, stop: threading.Event) -> None:
    """SIGKILL the first Ray worker seen running a trial's export/eval (its process title is ray::prepare)."""
    while not stop.is_set() and not found:
        listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            pid, _, args = line.strip().partition(" ")
            if args.startswith("ray::prepare"):
                os.kill(int(pid), signal.SIGKILL)
                found.append(int(pid))
                return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """Run 1 is stopped with SIGTERM after 3 trials are done; run 2 (the same command) finishes the study while
    the first worker seen exporting is killed."""
    from edgetok.vit.digits import write_heldout_folder

    root = tmp_path_factory.mktemp("tune")
    data = Path(write_heldout_folder(root / "heldout")["path"])
    train = Path(write_heldout_folder(root / "train", "train")["path"])
    out = root / "study"
    first = subprocess.Popen(_tune(out, data, train), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 400
    while len(_done(out)) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, first_err = first.communicate(timeout=120)
    before = json.loads((out / "tune.json").read_text())["trials"]
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_first_prepare, args=(killed, stop), daemon=True)
    killer.start()
    second = subprocess.run(_tune(out, data, train), cwd=root, capture_output=True, text=True, timeout=600)
    stop.set()
    return {"root": root, "out": out, "data": data, "train": train, "first_rc": first.returncode,
            "first_err": first_err, "before": before, "second": second, "killed": killed,
            "tune": json.loads((out / "tune.json").read_text())}


@pytest.mark.slow
def test_resume_after_sigterm_runs_no_finished_trial_again(search):
    assert search["first_rc"] == 143, search["first_err"]
    assert "error: terminated (SIGTERM)" in search["first_err"].strip().splitlines()[-1]
    assert search["second"].returncode == 0, search["second"].stderr
    finished = {t["number"]: t for t in search["before"] if t["state"] in ("profiled", "not profiled")}
    assert len(finished) >= 3
    trials = {t["number"]: t for t in search["tune"]["trials"]}
    for number, t in finished.items():  # kept as run 1 left them: same run, files, result
        assert trials[number]["run"] == 1 and trials[number]["artifacts"] == t["artifacts"]
        assert trials[number]["state"] == t["state"] and trials[number]["accuracy"] == t["accuracy"]
    run2 = [t for t in trials.values() if t["run"] == 2]
    assert run2
    for t in run2:  # a configuration finished in run 1 is not run again (the sampler may propose it: not run)
        if any(f["config"] == t["config"] for f in finished.values()):
            assert t["duplicate_of"] in finished and t["artifacts"] is None, t
    interrupted = [t for t in trials.values() if (t["reason"] or "").startswith("interrupted")]
    assert {t["retry_of"] for t in run2 if t["retry_of"] is not None} <= {t["number"] for t in interrupted}
    counted = [t for t in trials.values() if t not in interrupted]
    assert len(counted) == TRIALS and all(t["state"] in ("profiled", "not profiled") for t in counted)
    assert "tune: 8/8 done, 0 running, 0 failed" in search["second"].stderr


@pytest.mark.slow
def test_a_killed_worker_is_retried_not_lost(search):
    assert search["killed"], "no worker was seen running ray::prepare"
    trials = search["tune"]["trials"]
    assert not [t for t in trials if t["state"] == "failed" and not t["reason"].startswith("interrupted")]
    assert all(t["state"] != "running" for t in trials)


@pytest.mark.slow
def test_every_trial_accuracy_is_edgetok_eval_of_its_artifact(search, capsys):
    from edgetok import sidecar

    evaluated = 0
    for t in search["tune"]["trials"]:
        if t["state"] not in ("profiled", "not profiled") or t["duplicate_of"] is not None:
            continue
        folder = search["out"] / "trials" / f"{t['number']:04d}"
        for item in t["artifacts"]:
            assert sidecar.file_sha256(folder / item["file"]) == item["sha256"]
        code, out, err = run_cli(capsys, "eval", str(folder / t["artifact"]), "--data", str(search["data"]),
                                 "--json", "--no-sidecar")
        assert code == 0, err
        assert json.loads(out)["top1"] == t["accuracy"]["top1"], t["label"]
        dense_top1 = search["tune"]["dense"]["top1"]
        assert t["loss_points"] == round(100 * (dense_top1 - t["accuracy"]["top1"]), 4)
        evaluated += 1
    assert evaluated >= TRIALS - 1
    kinds = {t["config"]["precision"] for t in search["tune"]["trials"] if t["config"]}
    over = [t for t in search["tune"]["trials"] if (t["reason"] or "").startswith("over the accuracy budget")]
    assert all(t["loss_points"] > 1.0 and t["latency_ms"] is None for t in over)
    assert kinds <= {"fp32", "int8"}


@pytest.mark.slow
def test_the_front_is_non_dominated_and_best_yaml_reproduces_its_accuracy(search, capsys):
    tune, out = search["tune"], search["out"]
    profiled = [t for t in tune["trials"] if t["state"] == "profiled"]
    point = {t["number"]: (t["latency_ms"]["median"], t["loss_points"]) for t in profiled}
    front = tune["front"]
    assert front and set(front) <= set(point)

    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    for n in front:
        assert not any(dominates(point[m], point[n]) for m in point), n
    for n in set(point) - set(front):
        assert any(dominates(point[m], point[n]) or point[m] == point[n] for m in front), n
    best = min(front, key=lambda n: point[n])
    assert tune["best"] == best and all(point[n][1] <= 1.0 for n in front)
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG" and "| trial |" in (out / "pareto.md").read_text()

    recipe = yaml.safe_load((out / "best.yaml").read_text())
    again = search["root"] / "again"
    recipe["export"]["output"] = str(again / "model.onnx")
    (search["root"] / "again.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(capsys, "export", "--recipe", str(search["root"] / "again.yaml"))
    assert code == 0, err
    model = again / "model.onnx"
    if "quantize" in recipe:  # the recipe's quantize section, as build-engine --recipe applies it
        q = recipe["quantize"]
        code, _, err = run_cli(capsys, "quantize", str(model), "--mode", q["mode"], "--calibrate", q["calibrate"],
                               "--samples", str(q["samples"]), "-o", str(again / "model_q.onnx"))
        assert code == 0, err
        model = again / "model_q.onnx"
    code, stdout, err = run_cli(capsys, "eval", str(model), "--data", str(search["data"]), "--json")
    assert code == 0, err
    recorded = next(t for t in tune["trials"] if t["number"] == best)
    assert json.loads(stdout)["top1"] == recorded["accuracy"]["top1"]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_build_and_profile_run_only_on_the_node_with_the_targets_resource(tmp_path):
    """A head (1 CPU) and a second node offering {"sm87": 1} and no CPU, both on 127.0.0.2: every export/eval
    runs on the head, every build/profile on the sm87 node (a CPU stand-in: there is no GPU here)."""
    from edgetok.vit.digits import write_heldout_folder

    data = write_heldout_folder(tmp_path / "heldout")["path"]
    host, port = "127.0.0.2", _free_port("127.0.0.2")
    address = f"{host}:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")  # the head, its nodes and drivers share ~/.ray/auth_token
    ray = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 characters
    common = ["--node-ip-address", host, "--block", "--disable-usage-stats", "--temp-dir", temp]
    nodes = [subprocess.Popen([ray, "start", "--head", "--port", str(port), "--num-cpus", "1",
                               "--include-dashboard", "false", *common], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the head's GCS port answers once it is up
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        nodes.append(subprocess.Popen([ray, "start", "--address", address, "--num-cpus", "0", "--resources",
                                       '{"sm87": 1}', *common[:-2]], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = tmp_path / "study"
        done = subprocess.run([sys.executable, "-m", "edgetok", "tune", "edgetok_digits_vit", "--data", data,
                               "--target", "sm87", "--address", address, "--cpu-stand-in", "--methods", "tome",
                               "--trials", "3", "--duration", "0.1", "--target-timeout", "120", "-o", str(out)],
                              env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        probe = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(address=%r, log_to_driver=False); "
                                "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
                                % address], env=env, capture_output=True, text=True, timeout=120)
        resources = json.loads(probe.stdout.strip().splitlines()[-1])
    finally:
        for node in reversed(nodes):  # `ray start --block` stops its own processes on SIGTERM
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)
    tune = json.loads((out / "tune.json").read_text())
    device = {n for n, r in resources.items() if r.get("sm87")}
    head = {n for n, r in resources.items() if not r.get("sm87")}
    assert len(device) == 1 and len(head) == 1
    profiled = [t for t in tune["trials"] if t["state"] == "profiled"]
    assert profiled and {t["nodes"]["profile"] for t in profiled} == device
    assert {t["nodes"]["prepare"] for t in tune["trials"] if t["nodes"]["prepare"]} == head
    assert all(t["device"].startswith("cpu stand-in for sm87") for t in profiled)
    assert "build-engine --recipe" in (out / "best.yaml").read_text()


@pytest.mark.slow
def test_a_target_no_node_provides_fails_after_the_timeout_naming_it(capsys, tmp_path):
    from edgetok.vit.digits import write_heldout_folder

    data = write_heldout_folder(tmp_path / "heldout")["path"]
    code, _, err = run_cli(capsys, "tune", "edgetok_digits_vit", "--data", data, "--target", "sm87",
                           "--target-timeout", "2", "--methods", "tome", "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "--target sm87: no Ray node provides the resource 'sm87' after 2 s",
                          "--resources '{\"sm87\": 1}'")
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.mark.parametrize("args,message", [
    (["--max-drop", "-1"], "--max-drop -1 must be a finite number of points >= 0"),
    (["--methods", "tome,magic"], "--methods 'magic' is not a registered method; choose from none, tome"),
    (["--precision", "fp32,fp64"], "--precision 'fp64' is unknown; choose from fp32, fp16, int8, fp8"),
    (["--precision", "fp16"], "--precision fp16 needs an engine target"),
    (["--precision", "int8"], "--precision int8 needs --calibrate DIR"),
    (["--time", "soon"], "--time 'soon' is not a duration"),
    (["--trials", "3", "--time", "1h"], "give --trials or --time, not both"),
    (["--target", "orin"], "--target 'orin' is neither cpu nor a GPU architecture"),
    (["--address", "127.0.0.1:{port}"], "--address 127.0.0.1:{port}: no Ray head answers at 127.0.0.1:{port}"),
])
def test_bad_input_is_one_line_before_ray_or_torch(tmp_path, args, message):
    """Each refusal in a fresh interpreter: one line, exit 1, and neither Ray, Optuna nor torch imported."""
    from edgetok.vit.digits import write_heldout_folder

    data = write_heldout_folder(tmp_path / "heldout")["path"]
    port = _closed_port()
    args = [a.format(port=port) for a in args]
    script = ("import sys; from edgetok.cli import main; code = main(sys.argv[1:]); "
              "print(sorted(m for m in ('ray', 'optuna', 'torch') if m in sys.modules)); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "tune", "edgetok_digits_vit", "--data", data, *args, "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert_one_line_error(done.returncode, done.stderr, message.format(port=port))
    assert done.stdout.strip() == "[]"
    assert not (tmp_path / "out").exists()


def test_the_space_is_derived_from_the_method_registry(tmp_path):
    """Every registered method's searched options are its knob and its searchable options with a default (all
    searchable ones without a knob), bounded on the model; a method registered later is searched the same way."""
    from edgetok.errors import EdgetokError
    from edgetok.tune import space
    from edgetok.tune.study import TuneOptions, build_space
    from edgetok.vit import methods
    from edgetok.vit.methods import Method, Option
    from edgetok.vit.reduction import plan

    opts = TuneOptions(model="edgetok_digits_vit", data=str(tmp_path), methods=("tome", "evit", "gtp", "ats"))
    built, facts = build_space(opts)
    dims = {m: {d.name: d for d in ds} for m, ds in built.methods.items()}
    assert set(dims["tome"]) == {"r"} and dims["tome"]["r"].low == 1 and dims["tome"]["r"].kind == "int"
    assert dims["evit"]["keep_rate"].kind == "float" and (dims["evit"]["keep_rate"].low,
                                                          dims["evit"]["keep_rate"].high) == (0.1, 0.99)
    assert dims["gtp"]["propagate"].as_text and dims["gtp"]["graph"].choices == ("spatial", "semantic", "mixed")
    assert (dims["gtp"]["alpha"].low, dims["gtp"]["alpha"].high) == (0, 1.0)
    assert (dims["ats"]["ats_budget"].low, dims["ats"]["ats_budget"].high) == (0.25, 1.0)
    vit = facts["vit"]
    for name, key in (("tome", "r"), ("gtp", "propagate")):  # the largest amount plans on the model, one more not
        top = dims[name][key].high
        as_given = str if key == "propagate" else int
        plan(vit, methods.make_method(name, vit.depth, tokens=vit.num_tokens, **{key: as_given(top)}))
        with pytest.raises(EdgetokError):
            plan(vit, methods.make_method(name, vit.depth, tokens=vit.num_tokens, **{key: as_given(top + 1)}))
    for method in methods.describe():
        declared = methods.get(method["name"])
        names = {o.name for o in space.searched(declared)}
        knob = set(declared.knob(1)[0]) if declared.knob else set()
        assert names == knob | {o.name for o in declared.options if o.searchable and o.cli
                                and (declared.knob is None or o.default is not None)}
    extra = Method(name="halve", summary="test", build=lambda depth, options, model: None,
                   options=(Option("keep", "float", "share kept", default=0.5, range=(0, 1), bounds="(]",
                                   searchable=True),),
                   knob=lambda depth: [{"keep": k / 10} for k in range(1, 10)])
    assert [(d.name, d.kind, d.low, d.high) for d in space.bounds(extra, 6, 64, lambda s: s["keep"] <= 0.7)] == \
        [("keep", "float", 0.1, 0.7)]


def test_a_rerun_with_other_settings_is_refused_in_one_line(capsys, tmp_path):
    from edgetok.tune.study import TuneOptions, open_study
    from edgetok.vit.digits import write_heldout_folder

    data = write_heldout_folder(tmp_path / "heldout")["path"]
    out = tmp_path / "study"
    out.mkdir()
    open_study(TuneOptions(model="edgetok_digits_vit", data=data, methods=("tome",), max_drop=1.0), out)
    code, _, err = run_cli(capsys, "tune", "edgetok_digits_vit", "--data", data, "--methods", "tome", "--max-drop",
                           "0.5", "-o", str(out))
    assert_one_line_error(code, err, f"-o {out} holds a study made with other settings (max_drop: 1.0)",
                          "give another -o for a new study")
    assert sorted(p.name for p in out.iterdir()) == ["study.db"]
