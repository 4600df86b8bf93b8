"""``profile --host``: the remote command must carry any path literally, an unreachable host must fail fast
with one line, and a round trip through stand-in ssh/scp must bring the report back and leave no temp dir."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetok.errors import EdgetokError
from edgetok.profile.remote import companions, remote_profile_command, run_remote

NASTY = ["/tmp/a b/m;rm -rf ~.onnx", "/tmp/$(touch pwned).onnx", "/tmp/`touch pwned`.engine",
         "/tmp/it's \"quoted\" & | > <.onnx", "--looks-like-an-option", "*", "~", "a\nb.onnx", ""]


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# A stand-in edgetok for the "remote" side: records argv, writes a report, can fail on request.
FAKE_EDGETOK = f"""#!{sys.executable}
import json, os, sys
argv = sys.argv[1:]
if os.environ.get("ARGV_OUT"):
    open(os.environ["ARGV_OUT"], "w").write(json.dumps(argv))
code = int(os.environ.get("FAKE_EDGETOK_EXIT", "0"))
if code:
    print("loading model...", file=sys.stderr)
    print("Error: model.onnx has no input named pixel_values", file=sys.stderr)
    sys.exit(code)
report = argv[argv.index("--report-json") + 1]
models = [a for a in argv[1:] if a.endswith((".onnx", ".engine"))]
seen = {{m: sorted(os.listdir(os.path.dirname(m))) for m in models}}
open(report, "w").write(json.dumps({{"argv": argv, "seen": seen, "jetson": {{"energy_per_inference_mj": 12.5}}}}))
"""

# ssh stand-in: drop the options and host, run the remote command locally the way sshd would (one string,
# through a shell), with the "remote" PATH and HOME.
FAKE_SSH = f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
open(os.environ["SSH_LOG"], "a").write(repr(args) + "\\n")
i = 0
while args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-p", "-i") else 1
rest = args[i + 1:]
if rest[:1] == ["--"]:
    rest = rest[1:]
env = dict(os.environ, PATH=os.environ["REMOTE_PATH"], HOME=os.environ["REMOTE_HOME"])
sys.exit(subprocess.call(["bash", "-c", " ".join(rest)], env=env))
"""

# scp stand-in: copy locally, with the "host:" prefix stripped from the destination.
FAKE_SCP = f"""#!{sys.executable}
import os, shutil, sys
args = sys.argv[1:]
i = 0
while i < len(args) and args[i] != "--" and args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-P", "-i") else 1
if args[i] == "--":
    i += 1
*sources, dest = args[i:]
dest = dest.split(":", 1)[1]
for s in sources:
    shutil.copy(s, dest)
"""


# ------------------------------------------------------------------------------- the remote command
def test_remote_command_carries_nasty_arguments_literally(tmp_path):
    bin_dir, home, cwd = tmp_path / "bin", tmp_path / "home", tmp_path / "cwd"
    for d in (bin_dir, home, cwd):
        d.mkdir()
    write_exe(bin_dir / "edgetok", FAKE_EDGETOK)
    (home / "keep").write_text("rm -rf ~ must never run")
    tmpdir = "/tmp/tmp.$(touch pwned) x"
    args = ["--duration", "5", "--name", "x; touch pwned", "$HOME", "'"]
    command = remote_profile_command(tmpdir, NASTY, args)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "ARGV_OUT": str(tmp_path / "argv.json"),
           "FAKE_EDGETOK_EXIT": "9"}
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 9  # the stand-in ran, and its exit status came through
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == ["profile", *NASTY, *args, "-o", f"{tmpdir}/out", "--report-json", f"{tmpdir}/report.json"]
    assert not list(tmp_path.rglob("pwned")) and not Path("/tmp/pwned").exists()
    assert (home / "keep").is_file()


def test_remote_command_puts_user_site_bin_first(tmp_path):
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    write_exe(home / ".local" / "bin" / "edgetok", FAKE_EDGETOK)  # a `pip install --user edgetok`
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "ARGV_OUT": str(tmp_path / "argv.json"),
           "FAKE_EDGETOK_EXIT": "3"}
    done = subprocess.run(["bash", "-c", remote_profile_command("/tmp/t", ["/tmp/t/0/m.onnx"], [])], env=env,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 3
    assert json.loads((tmp_path / "argv.json").read_text())[:2] == ["profile", "/tmp/t/0/m.onnx"]


def test_companions(tmp_path):
    onnx = tmp_path / "vit.fp16.onnx"
    engine = tmp_path / "vit.engine"
    for p in (onnx, engine, tmp_path / "vit.fp16.edgetok.json", tmp_path / "vit.fp16.onnx.data",
              tmp_path / "vit.engine.build.json"):
        p.write_text("x")
    assert companions(onnx) == [tmp_path / "vit.fp16.edgetok.json", tmp_path / "vit.fp16.onnx.data"]
    assert companions(engine) == [tmp_path / "vit.engine.build.json"]
    (tmp_path / "vit.edgetok.json").write_text("x")
    assert companions(engine) == [tmp_path / "vit.edgetok.json", tmp_path / "vit.engine.build.json"]


# ----------------------------------------------------------------------------------- error paths
@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client here")
def test_unreachable_host_fails_fast_with_one_line(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_text("x")
    began = time.monotonic()
    with pytest.raises(EdgetokError) as err:
        run_remote("nobody@host.invalid", [model], ["--duration", "1"], connect_timeout=5)
    assert time.monotonic() - began < 15
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot reach nobody@host.invalid over ssh (")
    assert "ssh nobody@host.invalid true" in message


@pytest.mark.parametrize("host", ["-oProxyCommand=evil", "-oProxyCommand=/tmp/evil", "-oProxyCommand=touch pwned",
                                  "", "user@host name", "user@ho\nst", "../etc/x"])
def test_bad_host_is_refused_before_ssh_runs(tmp_path, host):
    model = tmp_path / "m.onnx"
    model.write_text("x")
    with pytest.raises(EdgetokError, match="not an ssh destination"):
        run_remote(host, [model], [])
    assert not list(tmp_path.rglob("pwned"))


def test_missing_local_model(tmp_path):
    with pytest.raises(EdgetokError, match="does not exist"):
        run_remote("user@jetson", [tmp_path / "nope.onnx"], [])


# ------------------------------------------------------------------ round trip through stand-ins
@pytest.fixture
def jetson_over_fake_ssh(tmp_path, monkeypatch):
    """Stand-in ssh and scp first on PATH; the "remote" side is this machine with its own PATH, HOME and
    TMPDIR (so its mktemp directories can be checked), and a stand-in edgetok unless a test removes it."""
    local_bin, remote_bin, remote_home, remote_tmp = (tmp_path / d for d in ("bin", "rbin", "rhome", "rtmp"))
    for d in (local_bin, remote_bin, remote_home, remote_tmp):
        d.mkdir()
    write_exe(local_bin / "ssh", FAKE_SSH)
    write_exe(local_bin / "scp", FAKE_SCP)
    write_exe(remote_bin / "edgetok", FAKE_EDGETOK)
    monkeypatch.setenv("PATH", f"{local_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("REMOTE_PATH", f"{remote_bin}:/usr/bin:/bin")
    monkeypatch.setenv("REMOTE_HOME", str(remote_home))
    monkeypatch.setenv("TMPDIR", str(remote_tmp))
    monkeypatch.setenv("SSH_LOG", str(tmp_path / "ssh.log"))
    monkeypatch.delenv("FAKE_EDGETOK_EXIT", raising=False)
    monkeypatch.delenv("ARGV_OUT", raising=False)

    models = tmp_path / "my models; $(touch pwned)"
    (models / "eng").mkdir(parents=True)
    onnx, engine = models / "m.onnx", models / "eng" / "m.engine"
    for p in (onnx, models / "m.edgetok.json", models / "m.onnx.data", engine, models / "eng" / "m.engine.build.json"):
        p.write_text(p.name)
    return {"onnx": onnx, "engine": engine, "remote_tmp": remote_tmp, "remote_bin": remote_bin, "root": tmp_path}


def test_round_trip_brings_the_report_back_and_cleans_up(jetson_over_fake_ssh):
    env = jetson_over_fake_ssh
    report = run_remote("user@jetson", [env["onnx"], env["engine"]], ["--duration", "3", "--device", "jetson"])
    (tmp,) = {Path(p).parent.parent for p in report["seen"]}
    assert tmp.parent == env["remote_tmp"]
    assert report["argv"] == ["profile", f"{tmp}/0/m.onnx", f"{tmp}/1/m.engine", "--duration", "3", "--device",
                              "jetson", "-o", f"{tmp}/out", "--report-json", f"{tmp}/report.json"]
    # Each model in its own directory, with its companions next to it.
    assert report["seen"] == {f"{tmp}/0/m.onnx": ["m.edgetok.json", "m.onnx", "m.onnx.data"],
                              f"{tmp}/1/m.engine": ["m.engine", "m.engine.build.json"]}
    assert report["jetson"]["energy_per_inference_mj"] == 12.5
    assert list(env["remote_tmp"].iterdir()) == []  # the remote temp dir is gone
    assert not list(env["root"].rglob("pwned"))
    calls = [eval(line) for line in (env["root"] / "ssh.log").read_text().splitlines()]  # noqa: S307 - our own repr
    assert all(c[:5] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "user@jetson"] for c in calls)
    assert calls[-1][-1].startswith("rm -rf -- ")


def test_remote_profile_failure_reports_its_last_line_and_cleans_up(jetson_over_fake_ssh, monkeypatch):
    env = jetson_over_fake_ssh
    monkeypatch.setenv("FAKE_EDGETOK_EXIT", "1")
    with pytest.raises(EdgetokError) as err:
        run_remote("user@jetson", [env["onnx"]], [])
    assert str(err.value) == ("edgetok profile on user@jetson failed: "
                              "Error: model.onnx has no input named pixel_values")
    assert list(env["remote_tmp"].iterdir()) == []


def test_edgetok_missing_on_the_jetson(jetson_over_fake_ssh):
    env = jetson_over_fake_ssh
    (env["remote_bin"] / "edgetok").unlink()
    with pytest.raises(EdgetokError) as err:
        run_remote("user@jetson", [env["onnx"]], [])
    assert str(err.value) == "edgetok is not installed on user@jetson: pip install edgetok there"
    assert list(env["remote_tmp"].iterdir()) == []


def test_remote_run_timeout(jetson_over_fake_ssh):
    env = jetson_over_fake_ssh
    write_exe(env["remote_bin"] / "edgetok", f"#!{sys.executable}\nimport time; time.sleep(4)\n")
    began = time.monotonic()
    with pytest.raises(EdgetokError, match="did not finish within 1 s; shorten --duration"):
        run_remote("user@jetson", [env["onnx"]], [], run_timeout=1)
    assert time.monotonic() - began < 10
    assert list(env["remote_tmp"].iterdir()) == []
