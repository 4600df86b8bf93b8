"""Publishing: an artifact set appears whole or not at all, under the artifact's lock; outputs never replace a
device, FIFO or link; readers refuse a sidecar that describes another model; two exports to one folder cannot
both succeed."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
from cli_assertions import assert_one_line_error, run_cli
from filelock import FileLock, Timeout
from onnx import TensorProto, helper

from edgetok import atomic, sidecar


def _stage(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _fail_on_call(monkeypatch, n: int):
    """os.replace raising on its ``n``-th call (a full disk, an I/O error), working again afterwards."""
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == n:
            raise OSError(5, "Input/output error (injected)")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


# A publish that fails part-way leaves the old set whole ------------------------------------------------------


def test_a_publish_failing_at_the_second_file_leaves_the_old_set_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_text("old model")
    (out / "m.edgetok.json").write_text("old sidecar")
    stage = _stage(tmp_path / "stage", {"m.onnx": "new model", "m.edgetok.json": "new sidecar",
                                        "m.onnx.cubins.zip": "new bundle"})
    calls = _fail_on_call(monkeypatch, 2)
    with pytest.raises(OSError, match="injected"):
        atomic.publish(stage, out)
    assert calls[:2] == ["m.edgetok.json", "m.onnx.cubins.zip"]  # the model is renamed last
    assert _contents(out) == {"m.edgetok.json": "old sidecar", "m.onnx": "old model"}  # no new sidecar, no bundle


def test_a_publish_failing_at_the_model_restores_the_sidecar(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_text("old model")
    (out / "m.edgetok.json").write_text("old sidecar")
    stage = _stage(tmp_path / "stage", {"m.onnx": "new model", "m.edgetok.json": "new sidecar"})
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(OSError, match="injected"):
        atomic.publish(stage, out)
    assert _contents(out) == {"m.edgetok.json": "old sidecar", "m.onnx": "old model"}
    monkeypatch.undo()
    stage = _stage(tmp_path / "again", {"m.onnx": "new model", "m.edgetok.json": "new sidecar"})
    atomic.publish(stage, out)  # undisturbed, the new set replaces the old one, with nothing left beside it
    assert _contents(out) == {"m.edgetok.json": "new sidecar", "m.onnx": "new model"}


def test_the_artifacts_lock_is_held_while_its_files_are_renamed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    stage = _stage(tmp_path / "stage", {"m.onnx": "model", "m.edgetok.json": "sidecar"})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real, held = os.replace, []

    def replace(src, dst):
        other = FileLock(str(atomic.lock_path(out / "m.onnx")))  # what eval's sidecar.update would wait for
        try:
            other.acquire(timeout=0)
            other.release()
            held.append(False)
        except Timeout:
            held.append(True)
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.publish(stage, out)
    assert held == [True, True]


# Outputs never replace a device, a FIFO or a link -----------------------------------------------------------


@pytest.fixture
def specials(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kept = tmp_path / "kept.json"
    kept.write_text("the user's file")
    link = tmp_path / "link.json"
    link.symlink_to(kept)
    return {"fifo": fifo, "link": link, "kept": kept}


@pytest.mark.parametrize("what, needle", [("fifo", "is a FIFO"), ("link", "is a symbolic link")])
def test_writes_refuse_a_fifo_and_a_symlink(specials, what, needle):
    with pytest.raises(sidecar.EdgetokError, match=needle) as info:
        sidecar.write(specials[what], {"a": 1})
    assert "\n" not in str(info.value)
    assert specials["fifo"].is_fifo() and specials["link"].is_symlink()
    assert specials["kept"].read_text() == "the user's file"
    assert [p.name for p in specials["fifo"].parent.iterdir() if ".tmp" in p.name] == []


@pytest.mark.parametrize("what", ["fifo", "link"])
def test_publish_refuses_a_fifo_or_symlink_among_the_targets_before_renaming_anything(tmp_path, specials, what):
    folder = specials["fifo"].parent
    name = specials[what].name
    stage = _stage(tmp_path / "stage", {name: "new", "m.onnx": "new model"})
    with pytest.raises(sidecar.EdgetokError, match=f"{name} is a "):
        atomic.publish(stage, folder)
    assert not (folder / "m.onnx").exists() and specials["kept"].read_text() == "the user's file"
    assert specials["fifo"].is_fifo() and specials["link"].is_symlink()


def test_a_pair_folder_is_never_published_into_a_nonempty_folder_or_a_link(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "theirs").write_text("x")
    with atomic.staging_dir(taken) as stage:
        (stage / "target").mkdir()
        with pytest.raises(sidecar.EdgetokError, match="exists and is not empty"):
            atomic.publish_folder(stage, taken)
    assert sorted(p.name for p in taken.iterdir()) == ["theirs"]  # shutil.move would have nested target/ here
    (tmp_path / "link").symlink_to(taken)
    with pytest.raises(sidecar.EdgetokError, match="is a symbolic link"):
        with atomic.staging_dir(tmp_path / "link"):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic.staging_dir(empty) as stage:
        (stage / "f").write_text("new")
        atomic.publish_folder(stage, empty)
    assert (empty / "f").read_text() == "new" and oct(empty.stat().st_mode & 0o777) != "0o700"


# Readers check the sidecar's SHA-256 of the model -----------------------------------------------------------


@pytest.fixture
def relu_onnx(tmp_path):
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["logits"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return path


def _mismatched_sidecar(model: Path) -> str:
    other = hashlib.sha256(b"another export").hexdigest()
    sidecar.write(sidecar.sidecar_path(model), {"kind": "vit", "onnx": {"file": model.name, "sha256": other},
                                                "flops": {"dense_gmacs": 17.6, "reduced_gmacs": 8.8},
                                                "preprocessing": {"input_size": [3, 8, 8]}})
    return other


def test_profile_refuses_a_sidecar_whose_hash_is_another_models(capsys, relu_onnx, tmp_path):
    other = _mismatched_sidecar(relu_onnx)
    code, out, err = run_cli(capsys, "profile", str(relu_onnx), "--duration", "0.1", "--warmup", "0",
                             "-o", str(tmp_path / "prof"))
    assert_one_line_error(code, err, "m.edgetok.json records the SHA-256 " + other[:12], "export the model again")
    assert not (tmp_path / "prof").exists()


def test_eval_and_build_engine_refuse_it_and_quantize_redoes_it(capsys, relu_onnx, tmp_path):
    _mismatched_sidecar(relu_onnx)
    (tmp_path / "data" / "0").mkdir(parents=True)
    code, out, err = run_cli(capsys, "eval", str(relu_onnx), "--data", str(tmp_path / "data"))
    assert_one_line_error(code, err, "records the SHA-256")
    code, out, err = run_cli(capsys, "build-engine", str(relu_onnx), "-o", str(tmp_path / "m.engine"))
    assert_one_line_error(code, err, "records the SHA-256")
    assert not (tmp_path / "m.engine").exists()
    from edgetok.workflows.quantize import QuantizeOptions, stale_reason

    assert "records the SHA-256" in stale_reason(QuantizeOptions(model=str(relu_onnx), calibrate=str(tmp_path),
                                                                 output=str(relu_onnx)))  # quantize again
    side = json.loads(sidecar.sidecar_path(relu_onnx).read_text())
    side["onnx"]["sha256"] = sidecar.file_sha256(relu_onnx)
    sidecar.write(sidecar.sidecar_path(relu_onnx), side)
    assert sidecar.read(relu_onnx)["flops"]["dense_gmacs"] == 17.6  # the matching sidecar is read


# --report-json: stdout and streams are written into, files replaced whole -----------------------------------


PROFILE = ["--duration", "0.05", "--warmup", "0"]


@pytest.mark.slow
def test_report_json_dash_writes_only_json_to_stdout(capsys, relu_onnx, tmp_path):
    code, out, err = run_cli(capsys, "profile", str(relu_onnx), *PROFILE, "-o", str(tmp_path / "p"),
                             "--report-json", "-")
    assert code == 0, err
    assert json.loads(out)["kind"] == "profile"  # the summary table went to stderr
    assert "| " in err


@pytest.mark.slow
def test_report_json_into_a_fifo_and_dev_null(capsys, relu_onnx, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    code, out, err = run_cli(capsys, "profile", str(relu_onnx), *PROFILE, "-o", str(tmp_path / "p"),
                             "--report-json", str(fifo))
    reader.join(timeout=60)
    assert code == 0, err
    assert json.loads(got[0])["kind"] == "profile" and fifo.is_fifo()
    code, out, err = run_cli(capsys, "profile", str(relu_onnx), *PROFILE, "-o", str(tmp_path / "p"),
                             "--report-json", os.devnull)
    assert code == 0, err
    assert Path(os.devnull).is_char_device()


def test_report_json_to_a_link_is_refused_before_the_timing(capsys, relu_onnx, specials, tmp_path):
    code, out, err = run_cli(capsys, "profile", str(relu_onnx), *PROFILE, "-o", str(tmp_path / "p"),
                             "--report-json", str(specials["link"]))
    assert_one_line_error(code, err, "link.json is a symbolic link")
    assert not (tmp_path / "p").exists() and specials["kept"].read_text() == "the user's file"


def test_a_full_stream_is_one_line(tmp_path):
    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full here")
    with pytest.raises(sidecar.EdgetokError, match="could not be written"):
        atomic.write_report("/dev/full", "{}\n")


# Two exports to one folder -----------------------------------------------------------------------------------


HELD_PAIR = """
import os, sys
from pathlib import Path
reached, go = int(sys.argv[1]), int(sys.argv[2])
import edgetok.llm.decoder as decoder
def export_decoder(lm, path, tree=False):  # the long export, stood in for: the file says whose it is
    Path(path).write_text(lm.source)
decoder.export_decoder = export_decoder
decoder.check_decoder = lambda lm, path, tree=False: {"max_abs_diff": {"prefill": 0.0}, "passed": True}
from edgetok import sidecar
write = sidecar.write
def held(path, data):  # the pair is staged whole: stop until the test lets both exports publish
    write(path, data)
    if Path(path).name == "edgetok_pair.json":
        os.write(reached, b"1")
        os.read(go, 1)
sidecar.write = held
from edgetok.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_two_spec_pair_exports_to_one_folder_cannot_both_succeed(tmp_path):
    from transformers import LlamaConfig

    for name in ("a", "b"):  # equal layer counts: a mix would load without complaint
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2).save_pretrained(tmp_path / name)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = []
    for name in ("a", "b"):
        reached_r, reached_w = os.pipe()
        go_r, go_w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-c", HELD_PAIR, str(reached_w), str(go_r), "export", "spec-pair",
                                 "--target", name, "--draft", "layer-skip:1", "-o", "out"],
                                pass_fds=(reached_w, go_r), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        os.close(reached_w)
        os.close(go_r)
        procs.append((proc, reached_r, go_w))
    try:
        for proc, reached_r, _ in procs:  # both passed the early emptiness check and staged everything
            assert os.read(reached_r, 1) == b"1", proc.communicate(timeout=60)
        for _, _, go_w in procs:
            os.write(go_w, b"1")
        results = [(proc.wait(timeout=300), *proc.communicate()) for proc, _, _ in procs]
    finally:
        for proc, reached_r, go_w in procs:
            os.close(reached_r)
            os.close(go_w)
            if proc.poll() is None:
                proc.kill()
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, _, err in results if code == 1)
    assert_one_line_error(1, loser, "out exists and is not empty")
    out = tmp_path / "out"
    manifest = json.loads((out / "edgetok_pair.json").read_text())
    assert (out / "target" / "model.onnx").read_text() == manifest["target"]["source"]  # one export's files
    assert sorted(p.name for p in (out / "target").iterdir()) == ["model.onnx", "tree.onnx"]  # nothing nested
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# quantize publishes its set under the lock, all or nothing ---------------------------------------------------


@pytest.mark.slow
def test_quantize_refuses_a_fifo_and_publishes_under_the_lock_all_or_nothing(tmp_path, monkeypatch, capsys):
    from edgetok.vit.digits import NAME, write_heldout_folder
    from edgetok.vit.export import ViTExportOptions, export_vit
    from edgetok.workflows.quantize import QuantizeOptions, quantize

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = write_heldout_folder(tmp_path / "train", split="train")["path"]
    source = export_vit(ViTExportOptions(model=NAME, output=str(tmp_path / "fp32.onnx")))["path"]
    os.mkfifo(tmp_path / "q.onnx")
    code, out, err = run_cli(capsys, "quantize", source, "--calibrate", data, "--samples", "16", "-o",
                             str(tmp_path / "q.onnx"))
    assert_one_line_error(code, err, "q.onnx is a FIFO")
    assert (tmp_path / "q.onnx").is_fifo()
    (tmp_path / "q.onnx").unlink()

    out = tmp_path / "q.onnx"
    first = quantize(QuantizeOptions(model=source, calibrate=data, samples=16, output=str(out)))
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("q.")}
    real, held, staged = os.replace, [], []

    def replace(src, dst):
        if Path(dst).parent == tmp_path and Path(src).parent != tmp_path:  # a staged file, not a backup put back
            try:
                other = FileLock(str(atomic.lock_path(out)))  # what eval's sidecar.update would wait for
                other.acquire(timeout=0)
                other.release()
                held.append(False)
            except Timeout:
                held.append(True)
            staged.append(Path(dst).name)
            if len(staged) == 2:  # the sidecar is in place, the model not yet
                raise OSError(28, "No space left on device (injected)")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        quantize(QuantizeOptions(model=source, calibrate=data, samples=32, output=str(out)))
    assert staged == ["q.edgetok.json", "q.onnx"] and held == [True, True]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("q.")} == old
    assert sidecar.read(out)["quantization"]["calibration"]["samples_asked"] == 16 == \
        first["quantization"]["calibration"]["samples_asked"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# A pair's engines in target/ and draft/ and its manifest are one set ----------------------------------------


def test_a_set_over_two_folders_failing_in_the_second_leaves_both_old(tmp_path, monkeypatch):
    pair = tmp_path / "pair"
    for role in ("target", "draft"):
        (pair / role).mkdir(parents=True)
        (pair / role / "model.fp32.engine").write_text(f"old {role}")
    (pair / "edgetok_pair.json").write_text("old manifest")
    before = {p.relative_to(pair): p.read_text() for p in pair.rglob("*") if p.is_file()}
    stages = [(_stage(tmp_path / f"stage-{role}", {"model.fp32.engine": f"new {role}", "model.fp32.json": "report"}),
               pair / role) for role in ("target", "draft")]
    stages.append((_stage(tmp_path / "stage-manifest", {"edgetok_pair.json": "new manifest"}), pair))
    calls = _fail_on_call(monkeypatch, 3)  # target/'s report and engine renamed, then draft/'s report fails
    with pytest.raises(OSError, match="injected"):
        atomic.publish_sets(stages, lock=pair)
    assert calls[:3] == ["model.fp32.json", "model.fp32.engine", "model.fp32.json"]
    assert {p.relative_to(pair): p.read_text() for p in pair.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    atomic.publish_sets(stages, lock=pair)
    assert (pair / "draft" / "model.fp32.engine").read_text() == "new draft"
    assert (pair / "edgetok_pair.json").read_text() == "new manifest"


# A data folder is published with one rename, as a pair folder is ---------------------------------------------


HELD_DIGITS = """
import os, sys
reached, go, out = int(sys.argv[1]), int(sys.argv[2]), os.path.abspath(sys.argv[3])
rename = os.rename
def held(src, dst, *args, **kwargs):  # the folder is written and checked: stop just before it is made visible
    if os.path.abspath(dst) == out:
        os.write(reached, b"1")
        os.read(go, 1)
    return rename(src, dst, *args, **kwargs)
os.rename = held
from edgetok.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.slow
def test_two_data_digits_writes_to_one_folder_cannot_both_succeed_or_nest(tmp_path):
    """A is held after its emptiness check, at the rename that publishes its folder; B (another cache home,
    so another lock, as for two users writing one shared folder) writes the same folder meanwhile. The
    kernel's rename onto a folder that is no longer empty refuses A in one line."""
    reached_r, reached_w = os.pipe()
    go_r, go_w = os.pipe()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache-a")}
    a = subprocess.Popen([sys.executable, "-c", HELD_DIGITS, str(reached_w), str(go_r), "out", "data", "digits",
                          "--split", "train", "-o", "out"], pass_fds=(reached_w, go_r), cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(reached_w)
    os.close(go_r)
    try:
        assert os.read(reached_r, 1) == b"1", a.communicate(timeout=60)
        b = subprocess.run([sys.executable, "-c", "import sys; from edgetok.cli import main; sys.exit(main(sys.argv[1:]))",
                            "data", "digits", "--split", "heldout", "-o", "out"],
                           cwd=tmp_path, env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache-b")},
                           capture_output=True, text=True, timeout=300)
        os.write(go_w, b"1")
        code, _, err = a.wait(timeout=300), *a.communicate()
    finally:
        os.close(reached_r)
        os.close(go_w)
        if a.poll() is None:
            a.kill()
    assert b.returncode == 0, b.stderr
    assert_one_line_error(code, err, "out exists and is not empty")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.txt", *map(str, range(10))])  # nothing nested
    assert len(list(out.rglob("*.png"))) == 539 and "held-out" in (out / "README.txt").read_text()  # B's alone
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


# The sidecar's hashes cover the external data file ----------------------------------------------------------


@pytest.fixture
def external_data_onnx(tmp_path):
    """A model whose weight lives in m.onnx.data beside it, with the sidecar an export records for it."""
    import numpy as np

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])
    weight = onnx.numpy_helper.from_array(np.full((1, 3, 8, 8), 0.5, np.float32), "weight")
    graph = helper.make_graph([helper.make_node("Add", ["pixel_values", "weight"], ["logits"])], "g", [x], [y],
                              initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").is_file()
    sidecar.write(sidecar.sidecar_path(path), {"kind": "vit", "onnx": {"file": path.name, "external_data": True,
                                                                        **sidecar.model_hashes(path)},
                                               "flops": {"dense_gmacs": 1.0, "reduced_gmacs": 1.0},
                                               "preprocessing": {"input_size": [3, 8, 8]}})
    return path


def _swap_weights(model: Path) -> None:
    """Another export's weights, same size, same graph: the .onnx is byte-identical."""
    import numpy as np

    data = Path(f"{model}.data")
    data.write_bytes(np.full((1, 3, 8, 8), 7.0, np.float32).tobytes())


def test_the_sidecar_records_the_external_data_files_hash(external_data_onnx):
    recorded = json.loads(sidecar.sidecar_path(external_data_onnx).read_text())["onnx"]
    assert recorded["data_sha256"] == hashlib.sha256(Path(f"{external_data_onnx}.data").read_bytes()).hexdigest()
    assert recorded["sha256"] == hashlib.sha256(external_data_onnx.read_bytes()).hexdigest()
    assert sidecar.read(external_data_onnx)["onnx"] == recorded  # the untouched pair is read


def test_profile_and_eval_refuse_swapped_external_data(capsys, external_data_onnx, tmp_path):
    data_hash = json.loads(sidecar.sidecar_path(external_data_onnx).read_text())["onnx"]["data_sha256"]
    _swap_weights(external_data_onnx)
    code, out, err = run_cli(capsys, "profile", str(external_data_onnx), "--duration", "0.1", "--warmup", "0",
                             "-o", str(tmp_path / "prof"))
    assert_one_line_error(code, err, f"records the SHA-256 {data_hash[:12]}", "m.onnx.data is", "export the model again")
    assert not (tmp_path / "prof").exists()
    (tmp_path / "data" / "0").mkdir(parents=True)
    code, out, err = run_cli(capsys, "eval", str(external_data_onnx), "--data", str(tmp_path / "data"))
    assert_one_line_error(code, err, f"records the SHA-256 {data_hash[:12]}", "m.onnx.data is")


def test_a_sidecar_from_before_the_data_hash_is_still_read(external_data_onnx):
    path = sidecar.sidecar_path(external_data_onnx)
    side = json.loads(path.read_text())
    del side["onnx"]["data_sha256"]
    sidecar.write(path, side)
    _swap_weights(external_data_onnx)
    assert sidecar.read(external_data_onnx)["flops"]["dense_gmacs"] == 1.0  # the .onnx alone is checked, as then
