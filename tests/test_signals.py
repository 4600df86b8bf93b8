"""Signals and kills: SIGTERM or Ctrl-C while ONNX Runtime runs our Python plugin ops is the normal interrupted
exit (143 / 130, one line, nothing left behind), not std::terminate (134); an op's own exception is one line
too; quantize's child process dies with it even on SIGKILL; a killed run's $TMPDIR scratch folder is swept by
the next run, a live run's kept.

The held op: the child process replaces TokenMerge's reference with one that tells the test it is running
(one byte on a pipe) and then blocks reading a pipe the test holds, so the signal arrives while ONNX Runtime
is inside our op, every time, with no sleeps."""

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgetok.cli import main

CHILD = textwrap.dedent("""
    import os, signal, sys
    from edgetok.plugins import ort_ops, spec
    mode, ready, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    spec.specs()  # the references are registered on import
    original = spec._REFERENCES["TokenMerge"]

    def held(*args, **kwargs):
        os.write(ready, b"r")
        if mode == "hold":
            os.read(hold, 1)  # the test signals us here, inside ONNX Runtime's call of our op
        else:
            raise ValueError("the reference broke")
        return original(*args, **kwargs)

    spec._REFERENCES["TokenMerge"] = held
    if mode == "deferred":  # SIGTERM handled in the callback's own frame, after the op failed
        empty = ort_ops._empty_outputs

        def signalled(k_id):
            signal.raise_signal(signal.SIGTERM)
            return empty(k_id)

        ort_ops._empty_outputs = signalled
    from edgetok.cli import main
    sys.exit(main(sys.argv[4:]))
""")


@pytest.fixture(scope="module")
def plugin_model(tmp_path_factory):
    from edgetok.vit.digits import write_heldout_folder
    from edgetok.vit.export import ViTExportOptions, export_vit

    root = tmp_path_factory.mktemp("signals")
    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", output=str(root / "fp32.onnx"), method="tome", r=6,
                                       plugins=True))
    return side["path"], write_heldout_folder(root / "train", split="train")["path"]


def _quantize_in_child(tmp_path, plugin_model, mode: str, sig: int | None):
    """Run `edgetok quantize` of the --plugins model in a child whose TokenMerge op is held (or fails); send
    ``sig`` once the op runs. Returns (exit code, stderr, output folder, TMPDIR)."""
    script, out, scratch = tmp_path / "child.py", tmp_path / "out", tmp_path / "tmpdir"
    script.write_text(CHILD)
    scratch.mkdir()
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    model, train = plugin_model
    command = [sys.executable, str(script), mode, str(ready_w), str(hold_r), "quantize", model, "--calibrate", train,
               "--samples", "8", "-o", str(out / "q.onnx")]
    child = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(scratch)}, pass_fds=(ready_w, hold_r),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.close(ready_w)
    os.close(hold_r)
    try:
        assert select.select([ready_r], [], [], 300)[0], "the op never ran"
        assert os.read(ready_r, 1) == b"r", "the child ended before the op ran"
        if sig is not None:
            child.send_signal(sig)
        err = child.communicate(timeout=300)[1]
    finally:
        child.kill()
        os.close(ready_r)
        os.close(hold_w)
    return child.returncode, err, out, scratch


def _leftovers(scratch: Path) -> list[Path]:
    """What a run left in its $TMPDIR, less ONNX Runtime's ``.ses`` (a session id it keeps there on purpose,
    after a run that succeeds too)."""
    return [p for p in scratch.iterdir() if p.name != ".ses"]


def _assert_one_line(err: str, line: str):
    lines = [x for x in err.strip().splitlines() if x.startswith("error")]
    assert lines == [line], err
    assert "Traceback" not in err and "terminate called" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,message", [
    (signal.SIGTERM, 143, "error: terminated (SIGTERM); nothing was written"),
    (signal.SIGINT, 130, "error: aborted"),
])
def test_a_signal_while_our_op_runs_is_the_normal_interrupted_exit(tmp_path, plugin_model, sig, code, message):
    returncode, err, out, scratch = _quantize_in_child(tmp_path, plugin_model, "hold", sig)
    assert returncode == code, f"exit {returncode} (134/-6 is std::terminate): {err}"
    _assert_one_line(err, message)
    assert not out.exists() or not list(out.iterdir()), list(out.iterdir())  # no staging folder, no output
    assert not _leftovers(scratch), _leftovers(scratch)  # our scratch and ONNX Runtime's, all removed


@pytest.mark.slow
def test_an_exception_in_our_op_is_one_line_not_an_abort(tmp_path, plugin_model):
    returncode, err, out, scratch = _quantize_in_child(tmp_path, plugin_model, "fail", None)
    assert returncode == 1, err
    _assert_one_line(err, "error: internal error ValueError: the reference broke (rerun with EDGETOK_DEBUG=1 for the "
                          "traceback, and please report it)")
    assert not out.exists() or not list(out.iterdir())
    assert not _leftovers(scratch), _leftovers(scratch)


@pytest.mark.slow
def test_a_signal_in_the_callbacks_own_frame_is_deferred_to_the_run(tmp_path, plugin_model):
    """Where a handler's exception could not be caught (the callback's first instruction, its error path) the
    signal waits for session.run to return, and wins over the op's failure: the user asked to stop."""
    returncode, err, out, scratch = _quantize_in_child(tmp_path, plugin_model, "deferred", None)
    assert returncode == 143, f"exit {returncode}: {err}"
    _assert_one_line(err, "error: terminated (SIGTERM); nothing was written")
    assert not _leftovers(scratch), _leftovers(scratch)


STAND_IN = "import os, sys, time; os.write(os.open(sys.argv[1], os.O_WRONLY), b'%d' % os.getpid()); time.sleep(600)"
PARENT = "import sys; from pathlib import Path; from edgetok.workflows.quantize import run_child; run_child(sys.argv[1:], Path.cwd())"


def test_quantizes_child_dies_when_quantize_is_killed(tmp_path):
    """The stand-in for Model Optimizer, started by run_child as _modelopt_fp8 starts it, holds a FIFO open for
    writing: the test sees end-of-file exactly when it is gone."""
    fifo = tmp_path / "alive"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, sys.executable, "-c", STAND_IN, str(fifo)], cwd=tmp_path)
    pid = None
    try:
        assert select.select([reader], [], [], 120)[0], "the child never started"
        pid = int(os.read(reader, 32))
        assert pid != parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert select.select([reader], [], [], 60)[0] and os.read(reader, 1) == b"", \
            f"the child {pid} outlived its SIGKILLed parent"
        pid = None
    finally:
        os.close(reader)
        parent.kill()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_does_not_start(tmp_path):
    from edgetok.workflows.quantize import _DIE_WITH_PARENT

    # The parent PID the shim was told about is not its parent: as if edgetok died before the prctl.
    done = subprocess.run([sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid() + 1), sys.executable, "-c",
                           "open('ran', 'w')"], cwd=tmp_path)
    assert done.returncode == 137 and not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_the_next_quantize_sweeps_a_dead_runs_scratch_folder_and_keeps_a_live_ones(tmp_path, plugin_model,
                                                                                   monkeypatch, capsys):
    import tempfile

    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # $TMPDIR, as tempfile read it
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        leftovers = {}
        for name, pid in (("dead", dead.pid), ("live", live.pid)):  # made after both processes started
            leftovers[name] = scratch / f".quantize.edgetok-{pid}-k3x9.tmp"
            (leftovers[name] / "fp8_input.onnx").parent.mkdir()
            (leftovers[name] / "fp8_input.onnx").write_bytes(b"copy")
        model, train = plugin_model
        code = main(["quantize", model, "--calibrate", train, "--samples", "8", "-o", str(tmp_path / "q.onnx")])
        assert code == 0, capsys.readouterr().err
        assert not leftovers["dead"].exists()
        assert sorted(scratch.iterdir()) == [leftovers["live"]]  # and nothing of this run's (nor ONNX Runtime's)
        assert tempfile.tempdir == str(scratch)
    finally:
        live.kill()
        live.wait()
