"""``edgetok profile --host user@jetson``: copy the models to a temporary directory on the Jetson, run the same
profile there over ssh, and bring its JSON report back.

The host must look like ``[user@]host[:port]`` (a ~/.ssh/config alias, a host name, IPv4, or IPv6 in brackets)
and is checked here, before ssh ever sees it. Every profile option is checked locally before anything is copied.
ssh always runs in BatchMode (a password or host-key prompt fails fast instead of hanging a benchmark), every
step has a timeout, and the remote command is built from shlex-quoted words only, so a model path such as
``a b;rm -rf ~.onnx`` arrives as one literal argument. The remote profile runs under coreutils ``timeout`` so it
cannot outlive its folder, and the remote temporary directory is removed whatever happens, SIGTERM and Ctrl-C
included; the local ssh/scp (with any helper it started, e.g. a ProxyJump ssh) is stopped first."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import secrets
import shlex
import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from edgetok.errors import EdgetokError
from edgetok.sidecar import sidecar_path

# Only what mktemp produces; checked because scp's legacy protocol hands remote paths to the remote shell.
_SAFE_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/+-]+$")
_STAGE_SLACK_S = 20
_CLEANUP_SLACK_S = 5  # the removal of the remote folder is best effort: connect timeout + this, no more
_KILL_AFTER_S = 10  # remote `timeout --kill-after`: SIGKILL this long after the SIGTERM
_STOP_GRACE_S = 2  # a local ssh/scp that ignores SIGTERM this long gets SIGKILL
DEFAULT_REMOTE_TIMEOUT_S = 3600.0
MAX_REMOTE_TIMEOUT_S = 7 * 24 * 3600

_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"  # a user, a host name, an IPv4 address or a ~/.ssh/config Host alias
_ALLOWED = re.compile(r"[A-Za-z0-9._@:\[\]%-]")  # every character a destination may have, brackets for IPv6


@dataclass(frozen=True)
class Destination:
    """A checked ``--host``: what ssh gets as its destination, and the port for ssh -p / scp -P."""
    text: str  # as the user wrote it, for messages
    user: str | None
    host: str  # an IPv6 address without brackets
    port: int | None

    @property
    def ssh_target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def scp_target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    @property
    def ssh_command(self) -> str:
        """How to reach it by hand, for the fixes the messages suggest."""
        return f"ssh -p {self.port} {self.ssh_target}" if self.port else f"ssh {self.ssh_target}"


def parse_host(text: str) -> Destination:
    """``[user@]host[:port]``, or a one-line error naming the value. Nothing that a shell or ssh could read as
    anything but a destination gets through: no metacharacters, spaces, control characters or leading ``-``."""
    def refuse(why: str) -> EdgetokError:
        return EdgetokError(f"--host {text!r} is not an ssh destination ({why}); give [user@]host[:port], e.g. "
                            f"nvidia@192.168.55.1, jetson:2222, user@[fe80::1] or a Host alias from ~/.ssh/config")

    if not text:
        raise refuse("it is empty")
    if text.startswith("-"):
        raise refuse("it starts with '-', which ssh would read as an option")
    bad = next((c for c in text if not _ALLOWED.fullmatch(c)), None)
    if bad is not None:
        raise refuse(f"it contains {bad!r}")
    user, at, rest = text.rpartition("@")
    if at and not re.fullmatch(_NAME, user):
        raise refuse(f"the user {user!r} is not a user name")
    if rest.startswith("["):  # [IPv6] or [IPv6]:port
        match = re.fullmatch(r"\[([^\[\]]+)\](?::([0-9]+))?", rest)
        host, port, v6 = (match.group(1), match.group(2), True) if match else (None, None, True)
    elif rest.count(":") >= 2:  # a bare IPv6 address, which leaves no room for a port
        host, port, v6 = rest, None, True
    else:
        match = re.fullmatch(rf"({_NAME})(?::([0-9]+))?", rest)
        host, port, v6 = (match.group(1), match.group(2), False) if match else (None, None, False)
    if host is None:
        raise refuse("it is not [user@]host[:port]")
    if v6:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise refuse(f"{host!r} is not an IPv6 address") from None
    if port is not None and not 1 <= int(port) <= 65535:
        raise refuse(f"port {port} is not 1-65535")
    return Destination(text=text, user=user or None, host=host, port=int(port) if port is not None else None)


def check_remote_timeout(seconds: float) -> float:
    number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if not (number and 0 < seconds <= MAX_REMOTE_TIMEOUT_S):
        raise EdgetokError(f"--remote-timeout {f'{seconds:g}' if number else repr(seconds)} must be a number of seconds > 0 and at most "
                           f"{MAX_REMOTE_TIMEOUT_S} (a week), e.g. --remote-timeout 7200")
    return float(seconds)


def _seconds(value: float) -> str:
    """A duration for coreutils `timeout`: plain decimal (no exponent), rounded up to the millisecond so a tiny
    value never becomes 0, which would mean no timeout at all."""
    ms = math.ceil(value * 1000)
    return str(ms // 1000) if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0")


def companions(model: Path) -> list[Path]:
    """The files next to a model that profile reads: its export sidecar, an engine's build report, the
    external weights of a large ONNX model and the plugin kernels (cubins) an engine launches."""
    found = [sidecar_path(model), Path(f"{model}.build.json"), Path(f"{model}.data"), Path(f"{model}.cubins.zip")]
    return [p for p in found if p.is_file()]


def remote_profile_command(tmpdir: str, remote_models: list[str], profile_args: list[str],
                           timeout_s: float = DEFAULT_REMOTE_TIMEOUT_S) -> str:
    """The one string ssh hands to the remote login shell. ``~/.local/bin`` goes first on PATH because a
    non-interactive ssh shell skips ~/.profile, where a `pip install --user` edgetok is usually found. The profile
    runs under coreutils `timeout` (SIGTERM after ``timeout_s``, SIGKILL 10 s later), so a run cut off here, or
    left behind when the connection drops, cannot outlive its temporary directory for long."""
    # Reports go inside the temporary directory too, so nothing is left behind on the Jetson.
    words = ["timeout", f"--kill-after={_KILL_AFTER_S}", _seconds(timeout_s), "edgetok", "profile", *remote_models,
             *profile_args, "-o", f"{tmpdir}/out", "--report-json", f"{tmpdir}/report.json"]
    return 'PATH="$HOME/.local/bin:$PATH"; export PATH; ' + " ".join(shlex.quote(str(w)) for w in words)


def _last_line(text: str, default: str = "no error output") -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), default)


def _stop(proc: subprocess.Popen) -> None:
    """End ``proc`` and everything in its process group (ssh may have started a ProxyJump/ProxyCommand helper):
    SIGTERM first, so ssh closes its connection, then SIGKILL for whatever is left."""
    for sig, grace in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)  # the group outlives its reaped leader while any member is alive
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


class _Ssh:
    def __init__(self, dest: Destination, connect_timeout: int):
        self.dest = dest
        self.host = dest.text
        self.connect_timeout = int(connect_timeout)
        self.options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]

    def _call(self, argv: list[str], timeout: float, step: str, fix: str = "",
              late: str | None = None) -> subprocess.CompletedProcess:
        # Its own session: the whole group (ssh and any helper) is stopped together, on a timeout, on Ctrl-C or on
        # SIGTERM (which main() raises here as Terminated).
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, errors="replace", start_new_session=True)
        except FileNotFoundError:
            raise EdgetokError(f"{argv[0]} not found on PATH; install an OpenSSH client to use --host") from None
        with proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop(proc)
                raise EdgetokError(late or f"{step} on {self.host} did not finish within {timeout:g} s; "
                                           f"{fix or f'check the host is up: {self.dest.ssh_command} true'}") from None
            except BaseException:
                _stop(proc)
                raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def run(self, command: str, timeout: float, step: str, fix: str = "",
            late: str | None = None) -> subprocess.CompletedProcess:
        """``late``: the whole message when ``timeout`` passes, instead of one built from ``step`` and ``fix``."""
        port = ["-p", str(self.dest.port)] if self.dest.port else []
        return self._call(["ssh", *self.options, *port, self.dest.ssh_target, "--", command], timeout, step, fix,
                          late)

    def copy(self, sources: list[Path], remote_dir: str, timeout: float, what: str) -> subprocess.CompletedProcess:
        # Absolute local paths: scp would read "a:b.onnx" as a host "a".
        local = [str(p.resolve()) for p in sources]
        port = ["-P", str(self.dest.port)] if self.dest.port else []
        return self._call(["scp", "-q", *self.options, *port, "--", *local, f"{self.dest.scp_target}:{remote_dir}/"],
                          timeout, f"copying {what}")

    def cleanup(self, pattern: str) -> None:
        """Best effort, with its own short timeout: a leftover folder is cleared at the Jetson's next reboot."""
        try:
            self.run(f"rm -rf -- {pattern}", self.connect_timeout + _CLEANUP_SLACK_S, "removing the temporary directory")
        except (EdgetokError, OSError):
            pass  # the original error (or the signal) matters more

    def unreachable(self, done: subprocess.CompletedProcess) -> EdgetokError:
        return EdgetokError(f"cannot reach {self.host} over ssh ({_last_line(done.stderr)}); check the host name and "
                            f"that key-based login works: {self.dest.ssh_command} true")


def _check_report(report, host: str) -> dict:
    """What write_reports and summary read must be there: a damaged or foreign report.json is one line."""
    problem = None
    if not isinstance(report, dict):
        problem = f"it holds a JSON {type(report).__name__}, not an object"
    else:
        missing = [k for k in ("settings", "environment", "models", "comparison") if k not in report]
        if missing:
            problem = f"it lacks {', '.join(repr(k) for k in missing)}"
        elif not (isinstance(report["models"], list) and report["models"]
                  and isinstance(report["comparison"], list) and report["comparison"]):
            problem = "its 'models' or 'comparison' is not a non-empty list"
        else:
            from edgetok.profile.profiler import summary

            try:
                summary(report)  # every model's figures and the comparison table
                for read in (lambda: report["settings"]["device"], lambda: report["comparison"][0]["batch"],
                             lambda: report["models"][0]["runner"]["backend"], lambda: report["environment"]["cpu"]):
                    read()  # the report title write_reports builds
            except KeyError as exc:
                problem = f"an entry lacks {exc}"
            except (TypeError, IndexError, ValueError, AttributeError) as exc:
                problem = f"an entry has the wrong form ({type(exc).__name__}: {_last_line(str(exc), '')})"
    if problem:
        raise EdgetokError(f"report.json from {host} is malformed: {problem}; check the edgetok versions match on "
                           f"both machines (edgetok --version here and there)")
    return report


def run_remote(host: str, files: list[Path], profile_args: list[str], connect_timeout: int = 10,
               run_timeout: float = DEFAULT_REMOTE_TIMEOUT_S, inputs: Path | None = None) -> dict:
    """Profile ``files`` on ``host`` with ``profile_args`` (and ``inputs``, an .npz copied along) and return the
    report that run wrote. ``run_timeout`` bounds the remote profile, there (coreutils `timeout`) and here."""
    dest = parse_host(host)
    run_timeout = check_remote_timeout(run_timeout)
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise EdgetokError(f"{f} does not exist; --host copies local model files to the Jetson")
    if inputs is not None and not Path(inputs).is_file():
        raise EdgetokError(f"--inputs {inputs} does not exist; give an .npz with one array per input")
    ssh = _Ssh(dest, connect_timeout)
    short = ssh.connect_timeout + _STAGE_SLACK_S

    # One subdirectory per model so two models named model.onnx (and their sidecars) cannot collide. The name
    # carries a tag chosen here, so an interrupt before mktemp's answer arrives can still remove the directory.
    tag = secrets.token_hex(8)
    pattern = f'"${{TMPDIR:-/tmp}}"/edgetok-{tag}.*'
    subdirs = " ".join([*(f'"$d/{k}"' for k in range(len(files))), *(['"$d/inputs"'] if inputs else [])])
    make = f'd=$(mktemp -d "${{TMPDIR:-/tmp}}/edgetok-{tag}.XXXXXX")'
    try:
        done = ssh.run(f'{make} && mkdir -- {subdirs} && echo "$d"' if subdirs else f'{make} && echo "$d"', short,
                       "creating a temporary directory")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        ssh.cleanup(pattern)
        raise
    if done.returncode == 255:
        raise ssh.unreachable(done)
    tmpdir = _last_line(done.stdout, "")
    if done.returncode != 0 or not _SAFE_REMOTE_DIR.match(tmpdir):
        raise EdgetokError(f"cannot create a temporary directory on {host} ({_last_line(done.stderr)}); check that "
                           f"`{dest.ssh_command} mktemp -d` works")
    try:
        remote_models = []
        for k, model in enumerate(files):
            remote_dir = f"{tmpdir}/{k}"
            batch = [model, *companions(model)]
            copied = ssh.copy(batch, remote_dir, short + sum(p.stat().st_size for p in batch) / 5e6,  # >= 5 MB/s
                              "the models")
            if copied.returncode != 0:
                raise EdgetokError(f"copying {model} to {host}:{remote_dir} failed ({_last_line(copied.stderr)}); "
                                   f"check there is room there: {dest.ssh_command} df -h /tmp")
            remote_models.append(f"{remote_dir}/{model.name}")
        args = list(profile_args)
        if inputs is not None:
            inputs = Path(inputs)
            copied = ssh.copy([inputs], f"{tmpdir}/inputs", short + inputs.stat().st_size / 5e6, "--inputs")
            if copied.returncode != 0:
                raise EdgetokError(f"copying --inputs {inputs} to {host}:{tmpdir}/inputs failed "
                                   f"({_last_line(copied.stderr)}); check there is room there: "
                                   f"{dest.ssh_command} df -h /tmp")
            args += ["--inputs", f"{tmpdir}/inputs/{inputs.name}"]

        # Here, past the remote `timeout` and its --kill-after, so the remote side normally reports first.
        local_timeout = run_timeout + _KILL_AFTER_S + short
        timed_out = (f"the remote profile on {host} did not finish within --remote-timeout {run_timeout:g} s; raise "
                     f"--remote-timeout or shorten --duration")
        ran = ssh.run(remote_profile_command(tmpdir, remote_models, args, run_timeout), local_timeout,
                      "the remote profile", late=timed_out)
        if ran.returncode in (124, 137):  # coreutils timeout: TERM sent (124), or KILL after --kill-after (137)
            raise EdgetokError(timed_out)
        if ran.returncode == 127:
            raise EdgetokError(f"edgetok is not installed on {host}: pip install edgetok there")
        if ran.returncode == 255 and not ran.stdout:
            raise ssh.unreachable(ran)
        if ran.returncode != 0:
            raise EdgetokError(f"edgetok profile on {host} failed: {_last_line(ran.stderr, f'exit {ran.returncode}')}")

        fetched = ssh.run(f"cat -- {shlex.quote(tmpdir + '/report.json')}", short, "fetching report.json")
        if fetched.returncode != 0:
            raise EdgetokError(f"the profile on {host} wrote no report ({_last_line(fetched.stderr)}); run it there "
                               f"by hand to see why: {dest.ssh_command} edgetok profile ...")
        try:
            report = json.loads(fetched.stdout)
        except json.JSONDecodeError as exc:
            raise EdgetokError(f"report.json from {host} is not valid JSON ({exc}); check the edgetok versions match "
                               f"on both machines (edgetok --version here and there)") from None
        return _check_report(report, host)
    finally:
        ssh.cleanup(shlex.quote(tmpdir))


def profile_remote(host: str, opts, remote_timeout: float | None = None, device_given: bool = False) -> dict:
    """``edgetok profile --host``: every option checked here first (nothing is copied for a value the remote run
    would refuse, or that could not finish within ``remote_timeout``), then the run on ``host``."""
    from edgetok.profile.profiler import _check

    parse_host(host)
    remote_timeout = check_remote_timeout(DEFAULT_REMOTE_TIMEOUT_S if remote_timeout is None else remote_timeout)
    opts = replace(opts, device=opts.device if device_given else "jetson")
    _check(replace(opts, device="cpu") if opts.device == "jetson" else opts)  # this machine need not be a Jetson
    for m in opts.models:
        if not Path(m).is_file():
            raise EdgetokError(f"{m} does not exist; --host copies local model files to the Jetson")
    if opts.inputs:
        _check_inputs(opts.inputs)
    needed = len(opts.models) * (opts.duration_s + opts.warmup_ms / 1e3)
    if needed >= remote_timeout:
        raise EdgetokError(f"--duration {opts.duration_s:g} s and --warmup {opts.warmup_ms:g} ms for "
                           f"{len(opts.models)} model(s) need at least {needed:g} s on {host}, not less than "
                           f"--remote-timeout {remote_timeout:g}; raise --remote-timeout or shorten --duration")
    args = ["--backend", opts.backend, "--device", opts.device, "--warmup", str(opts.warmup_ms), "--duration",
            str(opts.duration_s), "--iterations", str(opts.iterations), "--rounds", str(opts.rounds),
            "--threads", str(opts.threads)]
    args += ["--batch", str(opts.batch)] if opts.batch else []
    args += ["--ep", opts.ep] if opts.ep else []
    args += [] if opts.cuda_graphs is None else ["--cuda-graphs" if opts.cuda_graphs else "--no-cuda-graphs"]
    args += [] if opts.data_transfers is None else ["--data-transfers" if opts.data_transfers else "--no-data-transfers"]
    return run_remote(host, [Path(m) for m in opts.models], args, run_timeout=remote_timeout,
                      inputs=Path(opts.inputs) if opts.inputs else None)


def _check_inputs(path: str) -> None:
    """The .npz must be readable here; whether it fits the models is checked where they run."""
    import numpy as np

    if Path(path).is_dir():
        raise EdgetokError(f"--inputs {path} is a folder; with --host give an .npz (profile locally with the folder, "
                           "or save the preprocessed images with numpy.savez)")

    if not os.path.isfile(path):
        raise EdgetokError(f"--inputs {path} does not exist; give an .npz with one array per input")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise EdgetokError(f"--inputs {path} is not a readable .npz ({_last_line(str(exc), type(exc).__name__)})") \
            from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise EdgetokError(f"--inputs {path} is a single array, not an .npz; save it with numpy.savez(path, "
                           f"input_name=array)")
    data.close()
