"""``edgetok profile --host user@jetson``: copy the models to a temporary directory on the Jetson, run the same
profile there over ssh, and bring its JSON report back.

ssh always runs in BatchMode (a password or host-key prompt fails fast instead of hanging a benchmark), every
step has a timeout, and the remote command is built from shlex-quoted words only, so a model path such as
``a b;rm -rf ~.onnx`` arrives as one literal argument. The remote temporary directory is removed whatever
happens."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from edgetok.errors import EdgetokError
from edgetok.sidecar import sidecar_path

# Only what mktemp produces; checked because scp's legacy protocol hands remote paths to the remote shell.
_SAFE_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/+-]+$")
_STAGE_SLACK_S = 20


def companions(model: Path) -> list[Path]:
    """The files next to a model that profile reads: its export sidecar, an engine's build report and the
    external weights of a large ONNX model."""
    found = [sidecar_path(model), Path(f"{model}.build.json"), Path(f"{model}.data")]
    return [p for p in found if p.is_file()]


def remote_profile_command(tmpdir: str, remote_models: list[str], profile_args: list[str]) -> str:
    """The one string ssh hands to the remote login shell. ``~/.local/bin`` goes first on PATH because a
    non-interactive ssh shell skips ~/.profile, where a `pip install --user` edgetok is usually found."""
    # Reports go inside the temporary directory too, so nothing is left behind on the Jetson.
    words = ["edgetok", "profile", *remote_models, *profile_args, "-o", f"{tmpdir}/out",
             "--report-json", f"{tmpdir}/report.json"]
    return 'PATH="$HOME/.local/bin:$PATH"; export PATH; ' + " ".join(shlex.quote(str(w)) for w in words)


def _check_host(host: str) -> None:
    # A host beginning with "-" would be read by ssh as an option (-oProxyCommand=...).
    if not host or host.startswith("-") or "/" in host or any(c.isspace() or ord(c) < 32 for c in host):
        raise EdgetokError(f"--host {host!r} is not an ssh destination; give user@hostname (or a Host from "
                           f"~/.ssh/config)")


def _last_line(text: str, default: str = "no error output") -> str:
    return next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), default)


class _Ssh:
    def __init__(self, host: str, connect_timeout: int):
        self.host = host
        self.connect_timeout = int(connect_timeout)
        self.options = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]

    def _call(self, argv: list[str], timeout: float, step: str, fix: str = "") -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                                  timeout=timeout)
        except FileNotFoundError:
            raise EdgetokError(f"{argv[0]} not found on PATH; install an OpenSSH client to use --host") from None
        except subprocess.TimeoutExpired:
            raise EdgetokError(f"{step} on {self.host} did not finish within {timeout:g} s; "
                               f"{fix or f'check the host is up: ssh {self.host} true'}") from None

    def run(self, command: str, timeout: float, step: str, fix: str = "") -> subprocess.CompletedProcess:
        return self._call(["ssh", *self.options, self.host, "--", command], timeout, step, fix)

    def copy(self, sources: list[Path], remote_dir: str, timeout: float) -> subprocess.CompletedProcess:
        # Absolute local paths: scp would read "a:b.onnx" as a host "a".
        local = [str(p.resolve()) for p in sources]
        user, at, name = self.host.rpartition("@")
        target = f"{user}{at}[{name}]" if ":" in name and not name.startswith("[") else self.host  # IPv6
        return self._call(["scp", "-q", *self.options, "--", *local, f"{target}:{remote_dir}/"], timeout,
                          "copying the models")

    def unreachable(self, done: subprocess.CompletedProcess) -> EdgetokError:
        return EdgetokError(f"cannot reach {self.host} over ssh ({_last_line(done.stderr)}); check the host name and "
                            f"that key-based login works: ssh {self.host} true")


def run_remote(host: str, files: list[Path], profile_args: list[str], connect_timeout: int = 10,
               run_timeout: int = 3600) -> dict:
    """Profile ``files`` on ``host`` with ``profile_args`` and return the report that run wrote."""
    _check_host(host)
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise EdgetokError(f"{f} does not exist; --host copies local model files to the Jetson")
    ssh = _Ssh(host, connect_timeout)
    short = ssh.connect_timeout + _STAGE_SLACK_S

    # One subdirectory per model so two models named model.onnx (and their sidecars) cannot collide.
    subdirs = " ".join(f'"$d/{k}"' for k in range(len(files)))
    done = ssh.run(f'd=$(mktemp -d) && mkdir -- {subdirs} && echo "$d"' if files else "mktemp -d", short,
                   "creating a temporary directory")
    if done.returncode == 255:
        raise ssh.unreachable(done)
    tmpdir = _last_line(done.stdout, "")
    if done.returncode != 0 or not _SAFE_REMOTE_DIR.match(tmpdir):
        raise EdgetokError(f"cannot create a temporary directory on {host} ({_last_line(done.stderr)}); check that "
                           f"`ssh {host} mktemp -d` works")
    try:
        remote_models = []
        for k, model in enumerate(files):
            remote_dir = f"{tmpdir}/{k}"
            batch = [model, *companions(model)]
            copied = ssh.copy(batch, remote_dir, short + sum(p.stat().st_size for p in batch) / 5e6)  # >= 5 MB/s
            if copied.returncode != 0:
                raise EdgetokError(f"copying {model} to {host}:{remote_dir} failed ({_last_line(copied.stderr)}); "
                                   f"check there is room there: ssh {host} df -h /tmp")
            remote_models.append(f"{remote_dir}/{model.name}")

        ran = ssh.run(remote_profile_command(tmpdir, remote_models, profile_args), run_timeout,
                      "the remote profile", "shorten --duration, or allow it a longer run timeout")
        if ran.returncode == 127:
            raise EdgetokError(f"edgetok is not installed on {host}: pip install edgetok there")
        if ran.returncode == 255 and not ran.stdout:
            raise ssh.unreachable(ran)
        if ran.returncode != 0:
            raise EdgetokError(f"edgetok profile on {host} failed: {_last_line(ran.stderr, f'exit {ran.returncode}')}")

        fetched = ssh.run(f"cat -- {shlex.quote(tmpdir + '/report.json')}", short, "fetching report.json")
        if fetched.returncode != 0:
            raise EdgetokError(f"the profile on {host} wrote no report ({_last_line(fetched.stderr)}); run it there "
                               f"by hand to see why: ssh {host} edgetok profile ...")
        try:
            return json.loads(fetched.stdout)
        except json.JSONDecodeError as exc:
            raise EdgetokError(f"report.json from {host} is not valid JSON ({exc}); check the edgetok versions match "
                               f"on both machines") from None
    finally:
        try:
            ssh.run(f"rm -rf -- {shlex.quote(tmpdir)}", short, "removing the temporary directory")
        except EdgetokError:
            pass  # the original error matters more; a leftover /tmp/tmp.* dir is cleared at reboot
