"""``profile --host``: the remote command must carry any path literally, an unreachable host must fail fast
with one line, and a round trip through stand-in ssh/scp must bring the report back and leave no temp dir. Only
``[user@]host[:port]`` reaches ssh; every profile option is checked before anything is copied; SIGTERM stops the
local ssh (and its helpers) and removes the remote folder; a malformed report is one line.

No test here needs DNS or a network (ssh is always a stand-in), and none asserts on how long anything took: a step
that must time out runs a stand-in that cannot finish within its timeout, so the outcome cannot depend on the
machine's load (the other subprocess timeouts are only hang guards)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_assertions import assert_one_line_error, run_cli

from edgetok.errors import EdgetokError
from edgetok.profile import compare, remote
from edgetok.profile.remote import companions, parse_host, remote_profile_command, run_remote

NASTY = ["/tmp/a b/m;rm -rf ~.onnx", "/tmp/$(touch pwned).onnx", "/tmp/`touch pwned`.engine",
         "/tmp/it's \"quoted\" & | > <.onnx", "--looks-like-an-option", "*", "~", "a\nb.onnx", ""]


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _model_report(name: str) -> dict:
    latency = {**{k: 2.0 for k in ("min", "mean", "median", "p90", "p95", "p99", "max")}, "stdev": 0.0, "cv": 0.0}
    return {"name": name, "model": name, "runner": {"backend": "tensorrt"}, "batch": 1, "precision": "fp16",
            "timings_ms": {"latency": latency}, "iterations": 10, "wall_s": 1.0,
            "throughput": {"qps": 500.0, "items_per_s": 500.0}, "warnings": [], "flops": None, "reduction": None,
            "accuracy": None}


# What a real remote profile's report.json holds, as far as write_reports and summary read it.
REPORT = {"kind": "profile", "environment": {"cpu": "ARMv8 Processor rev 1 (v8l)"},
          "settings": {"device": "jetson", "rounds": 1}, "models": [_model_report("m")],
          "comparison": compare.rows([_model_report("m")])}

# A stand-in edgetok for the "remote" side: records argv, writes a report (or FAKE_REPORT_TEXT verbatim), can fail
# on request.
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
if "FAKE_REPORT_TEXT" in os.environ:
    open(report, "w").write(os.environ["FAKE_REPORT_TEXT"])
    sys.exit(0)
models = [a for a in argv[1:] if a.endswith((".onnx", ".engine"))]
seen = {{m: sorted(os.listdir(os.path.dirname(m))) for m in models}}
inputs = argv[argv.index("--inputs") + 1] if "--inputs" in argv else None
data = dict(json.loads({json.dumps(REPORT)!r}), argv=argv, seen=seen, jetson={{"energy_per_inference_mj": 12.5}},
            inputs_found=inputs is not None and os.path.isfile(inputs))
open(report, "w").write(json.dumps(data))
"""

# ssh stand-in: drop the options and host, run the remote command locally the way sshd would (one string,
# through a shell), with the "remote" PATH and HOME. With BLOCK_MARK set, the call that runs the profile instead
# starts a helper in its own process group (as ssh does for a ProxyJump), writes both pids to BLOCK_MARK and
# blocks, so a test can interrupt edgetok there.
FAKE_SSH = f"""#!{sys.executable}
import json, os, subprocess, sys, time
args = sys.argv[1:]
open(os.environ["SSH_LOG"], "a").write(repr(args) + "\\n")
i = 0
while args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-p", "-i") else 1
rest = args[i + 1:]
if rest[:1] == ["--"]:
    rest = rest[1:]
command = " ".join(rest)
if os.environ.get("BLOCK_MARK") and " edgetok profile " in command:
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "edgetok-test-ssh-helper"])
    mark = os.environ["BLOCK_MARK"]
    open(mark + ".tmp", "w").write(json.dumps({{"ssh": os.getpid(), "helper": helper.pid}}))
    os.replace(mark + ".tmp", mark)
    time.sleep(3600)
env = dict(os.environ, PATH=os.environ["REMOTE_PATH"], HOME=os.environ["REMOTE_HOME"])
sys.exit(subprocess.call(["bash", "-c", command], env=env))
"""

# scp stand-in: copy locally, with the "[user@]host:" prefix (host maybe a bracketed IPv6) stripped from the
# destination; calls logged to SCP_LOG when it is set.
FAKE_SCP = f"""#!{sys.executable}
import os, shutil, sys
args = sys.argv[1:]
if os.environ.get("SCP_LOG"):
    open(os.environ["SCP_LOG"], "a").write(repr(args) + "\\n")
i = 0
while i < len(args) and args[i] != "--" and args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-P", "-i") else 1
if args[i] == "--":
    i += 1
*sources, dest = args[i:]
host = dest.split("@", 1)[1] if "@" in dest else dest
dest = host.split("]:", 1)[1] if host.startswith("[") else host.split(":", 1)[1]
for s in sources:
    shutil.copy(s, dest)
"""


def calls(log: Path) -> list[list[str]]:
    """The argv of every stand-in call logged to ``log`` (none if it never ran)."""
    return [eval(line) for line in log.read_text().splitlines()] if log.exists() else []  # noqa: S307 - our repr


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
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
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
                          capture_output=True, text=True, timeout=120)
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
    (tmp_path / "vit.engine.cubins.zip").write_text("x")  # the plugin kernels an engine launches go along
    assert companions(engine)[-1] == tmp_path / "vit.engine.cubins.zip"


# ----------------------------------------------------------------------------------- error paths
# What OpenSSH prints, and its exit status, for a host name that does not resolve (RFC 2606 reserves .invalid).
UNRESOLVABLE_SSH = f"""#!{sys.executable}
import os, sys
open(os.environ["SSH_LOG"], "a").write(repr(sys.argv[1:]) + "\\n")
print("ssh: Could not resolve hostname host.invalid: Name or service not known", file=sys.stderr)
sys.exit(255)
"""

# An ssh whose connection attempt never ends (a host that drops packets, with no ConnectTimeout of its own).
HANGING_SSH = f"""#!{sys.executable}
import time; time.sleep(3600)
"""


@pytest.fixture
def local_bin(tmp_path, monkeypatch) -> Path:
    """A directory first on PATH for a stand-in ssh; its calls are logged to ssh.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SSH_LOG", str(tmp_path / "ssh.log"))
    return bin_dir


def test_unreachable_host_fails_fast_with_one_line(tmp_path, local_bin):
    """ssh runs in BatchMode with the connect timeout given (no prompt, no long wait), and its failure to reach the
    host ends the run at the first step, as one line with ssh's own reason."""
    write_exe(local_bin / "ssh", UNRESOLVABLE_SSH)
    model = tmp_path / "m.onnx"
    model.write_text("x")
    with pytest.raises(EdgetokError) as err:
        run_remote("nobody@host.invalid", [model], ["--duration", "1"], connect_timeout=5)
    assert str(err.value) == ("cannot reach nobody@host.invalid over ssh (ssh: Could not resolve hostname host.invalid: "
                              "Name or service not known); check the host name and that key-based login works: "
                              "ssh nobody@host.invalid true")
    (call,) = calls(tmp_path / "ssh.log")
    assert call[:6] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "nobody@host.invalid", "--"]


def test_a_connection_that_hangs_is_cut_off_with_one_line(tmp_path, local_bin, monkeypatch):
    """If ssh itself never returns, the step's own timeout (connect timeout + slack, here 1 s + 0) ends it."""
    monkeypatch.setattr(remote, "_STAGE_SLACK_S", 0)
    write_exe(local_bin / "ssh", HANGING_SSH)
    model = tmp_path / "m.onnx"
    model.write_text("x")
    with pytest.raises(EdgetokError) as err:
        run_remote("nobody@host.invalid", [model], [], connect_timeout=1)
    assert str(err.value) == ("creating a temporary directory on nobody@host.invalid did not finish within 1 s; "
                              "check the host is up: ssh nobody@host.invalid true")


# One host per class of shell metacharacter (the character the message must name), then what is not
# [user@]host[:port]-shaped.
BAD_HOSTS = [
    ("jetson;reboot", "';'"), ("jetson$(touch pwned)", "'$'"), ("jetson`touch pwned`", "'`'"), ("jetson|cat", "'|'"),
    ("jet'son", '"\'"'), ('jet"son', "'\"'"), ("jetson&", "'&'"), ("jetson<x", "'<'"), ("jetson>x", "'>'"),
    ("jetson(x)", "'('"), ("jetson)", "')'"), ("jet*", "'*'"), ("jet?", "'?'"), ("jetson!", "'!'"),
    ("jet\\son", r"'\\'"), ("user@ho\nst", r"'\n'"), ("user@host name", "' '"), ("jet\tson", r"'\t'"),
    ("../etc/x", "'/'"), ("jetson,x", "','"), ("jetson#x", "'#'"), ("jetson~", "'~'"), ("jetson{a,b}", "'{'"),
    ("-oProxyCommand=evil", "starts with '-'"), ("-oProxyCommand=touch pwned", "starts with '-'"),
    ("", "empty"), ("user@@jetson", "the user 'user@'"), ("@jetson", "the user ''"), ("user@", "not [user@]host"),
    ("jetson:", "not [user@]host"), ("jetson:ssh", "not [user@]host"), ("jetson:0", "port 0"),
    ("jetson:65536", "port 65536"), (":22", "not [user@]host"), ("[::1", "not [user@]host"),
    ("[jetson]", "'jetson' is not an IPv6"), ("user@[::1]:", "not [user@]host"), ("::zz", "'::zz' is not an IPv6"),
    (".jetson", "not [user@]host"),
]


@pytest.mark.parametrize("host,named", BAD_HOSTS)
def test_bad_host_is_refused_before_ssh_runs(tmp_path, local_bin, host, named):
    """Refused here, in one line naming the value and what is wrong with it, with no ssh or scp call made (stand-ins
    that would log any call are first on PATH), whatever OpenSSH version would otherwise have to catch it."""
    write_exe(local_bin / "ssh", UNRESOLVABLE_SSH)
    write_exe(local_bin / "scp", UNRESOLVABLE_SSH)
    model = tmp_path / "m.onnx"
    model.write_text("x")
    with pytest.raises(EdgetokError) as err:
        run_remote(host, [model], [])
    message = str(err.value)
    assert message.startswith(f"--host {host!r} is not an ssh destination (") and named in message, message
    assert "give [user@]host[:port]" in message and "\n" not in message
    assert calls(tmp_path / "ssh.log") == []
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("host,user,name,port", [
    ("jetson", None, "jetson", None), ("my_jetson-2.lab", None, "my_jetson-2.lab", None),
    ("nvidia@jetson", "nvidia", "jetson", None), ("nvidia@192.168.55.1", "nvidia", "192.168.55.1", None),
    ("10.0.0.7:2222", None, "10.0.0.7", 2222), ("[::1]", None, "::1", None), ("u@[fe80::1%eth0]:22", "u", "fe80::1%eth0", 22),
    ("u@fe80::2", "u", "fe80::2", None), ("jetson.local:65535", None, "jetson.local", 65535),
])
def test_good_host_forms_are_parsed(host, user, name, port):
    dest = parse_host(host)
    assert (dest.user, dest.host, dest.port) == (user, name, port)


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
    made = calls(env["root"] / "ssh.log")
    assert all(c[:5] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "user@jetson"] for c in made)
    assert made[-1][-1].startswith("rm -rf -- ")


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
    """A remote profile that outlasts the run timeout is cut off there, by the remote `timeout` (the stand-in could
    never finish within 1 s: it sleeps 4, and had it finished, its missing report would be a different error; the
    local timeout is 1 + 10 + 30 s, only a hang guard), with one line naming the option, and the remote temp dir is
    still removed."""
    env = jetson_over_fake_ssh
    write_exe(env["remote_bin"] / "edgetok", f"#!{sys.executable}\nimport time; time.sleep(4)\n")
    with pytest.raises(EdgetokError) as err:
        run_remote("user@jetson", [env["onnx"]], [], run_timeout=1)
    assert str(err.value) == ("the remote profile on user@jetson did not finish within --remote-timeout 1 s; raise "
                              "--remote-timeout or shorten --duration")
    assert list(env["remote_tmp"].iterdir()) == []


@pytest.mark.parametrize("host,ssh_args,scp_args", [
    ("jetson", ["jetson"], ["jetson"]),
    ("user@jetson:2222", ["-p", "2222", "user@jetson"], ["-P", "2222", "user@jetson"]),
    ("10.0.0.7:22", ["-p", "22", "10.0.0.7"], ["-P", "22", "10.0.0.7"]),
    ("[::1]", ["::1"], ["[::1]"]),
    ("u@[fe80::1%eth0]:2200", ["-p", "2200", "u@fe80::1%eth0"], ["-P", "2200", "u@[fe80::1%eth0]"]),
])
def test_good_host_forms_reach_ssh_and_scp(jetson_over_fake_ssh, monkeypatch, host, ssh_args, scp_args):
    """The port goes to ssh as -p and to scp as -P, never inside the destination; ssh gets an IPv6 address bare and
    scp in brackets (scp would read the first ':' as the end of the host)."""
    env = jetson_over_fake_ssh
    monkeypatch.setenv("SCP_LOG", str(env["root"] / "scp.log"))
    report = run_remote(host, [env["onnx"]], [])
    assert report["argv"][0] == "profile"
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    made = calls(env["root"] / "ssh.log")
    assert len(made) == 4  # mktemp, the profile, cat report.json, rm -rf
    assert all(c[:len(options) + len(ssh_args) + 1] == [*options, *ssh_args, "--"] for c in made)
    (copy,) = calls(env["root"] / "scp.log")
    (tmp,) = {Path(p).parent.parent for p in report["seen"]}
    assert copy[:1 + len(options) + len(scp_args) - 1] == ["-q", *options, *scp_args[:-1]]
    assert copy[-1] == f"{scp_args[-1]}:{tmp}/0/"
    assert list(env["remote_tmp"].iterdir()) == []


# ------------------------------------------------------------------------ the profile command, --host
@pytest.fixture
def one_model(jetson_over_fake_ssh):
    return str(jetson_over_fake_ssh["onnx"])


def test_bad_host_on_the_command_line_is_one_line(capsys, tmp_path, jetson_over_fake_ssh, one_model):
    code, out, err = run_cli(capsys, "profile", one_model, "--host", "jetson;reboot", "-o", str(tmp_path / "never"))
    assert_one_line_error(code, err, "--host 'jetson;reboot' is not an ssh destination (it contains ';')",
                          "[user@]host[:port]")
    assert calls(tmp_path / "ssh.log") == []
    assert not (tmp_path / "never").exists()


def test_profile_options_are_checked_before_anything_is_copied(capsys, tmp_path, jetson_over_fake_ssh, one_model,
                                                               monkeypatch):
    """Each value the remote run would refuse, or that could not finish within --remote-timeout, is one line here
    with no ssh or scp call made (--device jetson itself is fine here: the Jetson is the remote machine)."""
    monkeypatch.setenv("SCP_LOG", str(tmp_path / "scp.log"))
    not_npz = tmp_path / "inputs.npy"
    np.save(not_npz, np.zeros(3))
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not a zip")
    cases = [
        (["--duration", "1e9"], ["--duration 1e+09 s", "--remote-timeout 3600", "raise --remote-timeout"]),
        (["--duration", "2000", one_model], ["2 model(s)", "need at least 4000", "--remote-timeout 3600"]),
        (["--duration", "100", "--remote-timeout", "50"], ["--duration 100 s", "--remote-timeout 50"]),
        (["--rounds", "0"], ["--rounds 0"]),
        (["--iterations", "0"], ["--iterations 0"]),
        (["--threads", "-1"], ["--threads -1"]),
        (["--batch", "0"], ["--batch 0"]),
        (["--duration", "nan"], ["--duration nan"]),
        (["--warmup", "inf"], ["--warmup inf"]),
        (["--device", "gpu"], ["--device 'gpu'"]),
        (["--inputs", str(tmp_path / "none.npz")], ["none.npz does not exist"]),
        (["--inputs", str(not_npz)], ["inputs.npy is a single array, not an .npz"]),
        (["--inputs", str(garbage)], ["garbage.npz is not a readable .npz"]),
        (["--remote-timeout", "0"], ["--remote-timeout 0 must be"]),
        (["--remote-timeout", "-5"], ["--remote-timeout -5 must be"]),
        (["--remote-timeout", "nan"], ["--remote-timeout nan must be"]),
        (["--remote-timeout", "inf"], ["--remote-timeout inf must be"]),
        (["--remote-timeout", "1e6"], ["--remote-timeout 1e+06 must be", "at most 604800"]),
        ([str(tmp_path / "missing.onnx")], ["missing.onnx does not exist"]),
    ]
    for extra, needles in cases:
        code, out, err = run_cli(capsys, "profile", one_model, *extra, "--host", "user@jetson",
                                 "-o", str(tmp_path / "never"))
        assert_one_line_error(code, err, *needles)
        assert calls(tmp_path / "ssh.log") == [] and calls(tmp_path / "scp.log") == [], extra
    assert not (tmp_path / "never").exists()
    code, out, err = run_cli(capsys, "profile", one_model, "--remote-timeout", "60", "-o", str(tmp_path / "never"))
    assert_one_line_error(code, err, "--remote-timeout 60 applies only with --host")


def test_inputs_and_rounds_reach_the_remote_run(capsys, tmp_path, jetson_over_fake_ssh, one_model, monkeypatch):
    """--inputs is copied into the remote folder and its remote path passed on; --rounds and the other options go
    along; the report comes back and is written here."""
    monkeypatch.setenv("ARGV_OUT", str(tmp_path / "argv.json"))
    monkeypatch.setenv("SCP_LOG", str(tmp_path / "scp.log"))
    feed = tmp_path / "feed.npz"
    np.savez(feed, pixel_values=np.zeros((1, 3, 8, 8), np.float32))
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "profile", one_model, "--host", "user@jetson", "--inputs", str(feed),
                             "--rounds", "3", "--duration", "2", "--warmup", "50", "--iterations", "7",
                             "--device", "jetson", "-o", str(out_dir))
    assert code == 0, err
    argv = json.loads((tmp_path / "argv.json").read_text())
    tmp = Path(argv[1]).parent.parent
    assert argv[argv.index("--rounds") + 1] == "3" and argv[argv.index("--iterations") + 1] == "7"
    assert argv[argv.index("--duration") + 1] == "2.0" and argv[argv.index("--warmup") + 1] == "50.0"
    assert argv[argv.index("--device") + 1] == "jetson"
    assert argv[argv.index("--inputs") + 1] == f"{tmp}/inputs/feed.npz"
    report = json.loads((out_dir / "profile.json").read_text())
    assert report["inputs_found"] is True  # it was there when the remote profile ran
    assert [c[-1] for c in calls(tmp_path / "scp.log")] == [f"user@jetson:{tmp}/0/", f"user@jetson:{tmp}/inputs/"]
    assert list(jetson_over_fake_ssh["remote_tmp"].iterdir()) == []


def test_remote_timeout_reaches_the_remote_timeout_word_and_the_local_timeout(capsys, tmp_path, jetson_over_fake_ssh,
                                                                             one_model, monkeypatch):
    """--remote-timeout N: the remote command runs under `timeout --kill-after=10 N`, and the local ssh that waits
    for it gets N + 10 s (the kill-after) + the connect timeout and slack, so the remote side stops first."""
    monkeypatch.setenv("ARGV_OUT", str(tmp_path / "argv.json"))
    timeouts = []
    real_call = remote._Ssh._call

    def spy(self, argv, timeout, *rest, **kw):
        timeouts.append((argv[-1], timeout))
        return real_call(self, argv, timeout, *rest, **kw)

    monkeypatch.setattr(remote._Ssh, "_call", spy)
    code, out, err = run_cli(capsys, "profile", one_model, "--host", "user@jetson", "--remote-timeout", "42.5",
                             "--duration", "1", "-o", str(tmp_path / "out"))
    assert code == 0, err
    (profile_call,) = [c for c in calls(tmp_path / "ssh.log") if " edgetok profile " in c[-1]]
    assert " timeout --kill-after=10 42.5 edgetok profile " in profile_call[-1]
    assert [t for command, t in timeouts if " edgetok profile " in command] == [42.5 + 10 + 10 + 20]
    assert json.loads((tmp_path / "argv.json").read_text())[0] == "profile"  # the stand-in ran under `timeout`
    assert remote._seconds(1e-4) == "0.001" and remote._seconds(3600.0) == "3600" and remote._seconds(1.25) == "1.25"


def test_pair_with_host_is_refused(capsys, tmp_path, jetson_over_fake_ssh):
    pair = tmp_path / "pair"
    pair.mkdir()
    code, out, err = run_cli(capsys, "profile", str(pair), "--pair", "--host", "user@jetson",
                             "-o", str(tmp_path / "never"))
    assert_one_line_error(code, err, "--pair --host is not supported yet; run edgetok profile --pair on the Jetson "
                                     "itself")
    assert calls(tmp_path / "ssh.log") == []
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("text,needle", [
    ('{"models": [], "settings": {}}', "it lacks 'environment', 'comparison'"),
    ("[1, 2]", "it holds a JSON list, not an object"),
    ('"profile"', "it holds a JSON str, not an object"),
    ("not json", "is not valid JSON"),
    ('{"settings": {}, "environment": {}, "models": [], "comparison": []}', "is not a non-empty list"),
    (json.dumps({**REPORT, "models": [{"name": "m"}]}), "an entry lacks 'timings_ms'"),
    (json.dumps({**REPORT, "settings": {}}), "an entry lacks 'device'"),
    (json.dumps({**REPORT, "comparison": [1]}), "an entry has the wrong form (TypeError"),
])
def test_malformed_report_is_one_line(capsys, tmp_path, jetson_over_fake_ssh, one_model, monkeypatch, text, needle):
    monkeypatch.setenv("FAKE_REPORT_TEXT", text)
    code, out, err = run_cli(capsys, "profile", one_model, "--host", "user@jetson", "-o", str(tmp_path / "never"))
    assert_one_line_error(code, err, "report.json from user@jetson ", needle, "edgetok versions match")
    assert "internal error" not in err
    assert not (tmp_path / "never").exists()
    assert list(jetson_over_fake_ssh["remote_tmp"].iterdir()) == []


# ------------------------------------------------------------------------------------------ SIGTERM
def _running(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still a live process of ours (a zombie, a gone pid or a reused one is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in "ZX" and marker in cmdline


def _wait_for(condition, what: str, limit_s: float = 120) -> None:
    """Poll until ``condition()``; the limit only guards against a hang and says nothing about speed."""
    give_up = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < give_up, f"still waiting for {what} after {limit_s} s"
        time.sleep(0.05)


def test_sigterm_stops_ssh_and_removes_the_remote_folder(tmp_path, jetson_over_fake_ssh, monkeypatch):
    """`edgetok profile --host` is terminated while its ssh for the profile step is blocked: it exits 143, the
    remote folder is removed (the stand-in ssh recorded the `rm -rf`), and neither the ssh nor the helper it started
    in its process group (as a ProxyJump ssh would be) is left running."""
    env = jetson_over_fake_ssh
    mark = tmp_path / "blocked.json"
    monkeypatch.setenv("BLOCK_MARK", str(mark))
    proc = subprocess.Popen([sys.executable, "-m", "edgetok", "profile", str(env["onnx"]), "--host", "user@jetson",
                             "-o", str(tmp_path / "never")], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = {}
    try:
        _wait_for(lambda: mark.exists() or proc.poll() is not None, "the profile step's ssh to block")
        assert proc.poll() is None, proc.communicate()
        pids = json.loads(mark.read_text())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM)") and "Traceback" not in err, err
        made = calls(tmp_path / "ssh.log")
        (profile_call,) = [c for c in made if " edgetok profile " in c[-1]]
        tmp = profile_call[-1].split("--report-json ")[1].rsplit("/", 1)[0]
        assert made[-1][-1] == f"rm -rf -- {tmp}"
        assert list(env["remote_tmp"].iterdir()) == []
        _wait_for(lambda: not _running(pids["ssh"], "bin/ssh"), "the stand-in ssh to end", 60)
        _wait_for(lambda: not _running(pids["helper"], "edgetok-test-ssh-helper"), "the ssh's helper to end", 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, marker in ((pids.get("ssh"), "bin/ssh"), (pids.get("helper"), "edgetok-test-ssh-helper")):
            if pid and _running(pid, marker):
                os.kill(pid, signal.SIGKILL)
