"""Hostile and unlucky inputs: nothing foreign runs, nothing escapes its folder, every refusal is one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_assertions import assert_one_line_error, run_cli
from transformers import LlamaConfig

from edgetok.errors import EdgetokError
from edgetok.llm.pair import MANIFEST, export_pair

SHIPPED_TOKENIZER = Path(__file__).parents[1] / "edgetok" / "assets" / "spec_pair" / "target"


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _marker_library(folder: Path, hold: bool = False) -> tuple[Path, Path]:
    """A real shared library whose constructor writes its process's PID to a marker file (proof that it
    was loaded, and by whom), then, with ``hold``, blocks: a build caught mid-way, deterministically."""
    marker = folder / "constructor-ran"
    src = folder / "x.c"
    src.write_text('#include <stdio.h>\n#include <unistd.h>\n__attribute__((constructor)) static void ran(void) {\n'
                   f'  FILE *f = fopen("{marker}.part", "w"); fprintf(f, "%d", getpid()); fclose(f);\n'
                   f'  rename("{marker}.part", "{marker}");\n' + ("  sleep(600);\n" if hold else "") + "}\n")
    lib = folder / ("hold.so" if hold else "x.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib, marker


# 1. Recipes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_recipe_name_is_not_shadowed_by_a_file_in_the_working_folder(capsys, in_tmp):
    Path("default").write_text("export:\n  model: deit_tiny_patch16_224\n  output: shadow.onnx\n")
    code, out, err = run_cli(capsys, "export", "--recipe", "default")
    assert code == 0, err
    assert "recipe default: " in err and "recipes/default.yaml (built-in)" in err
    assert Path("edgetok-out/digits_vit_tome_r8.onnx").is_file() and not Path("shadow.onnx").exists()
    # The user's own file is named by a path.
    code, out, err = run_cli(capsys, "export", "--recipe", "nope")
    assert_one_line_error(code, err, "'nope' is not a built-in recipe")
    Path("mine").write_text("export:\n  model: deit_tiny_patch16_224\n")
    code, out, err = run_cli(capsys, "export", "--recipe", "mine")
    assert_one_line_error(code, err, "'mine' is not a built-in recipe", "write ./mine")


@pytest.mark.slow
def test_recipe_plugins_load_only_when_allowed(capsys, in_tmp):
    lib, marker = _marker_library(in_tmp)
    Path("r.yaml").write_text(
        "export:\n  model: deit_tiny_patch16_224\n  img_size: 32\n  output: out/t.onnx\n"
        f"build:\n  backend: tensorrt-rtx\n  batch: '1:1:1'\n  targets: sm89\n  plugins: [{lib}]\n")
    code, out, err = run_cli(capsys, "build-engine", "--recipe", "r.yaml")
    assert_one_line_error(code, err, "asks to load plugin libraries", "--allow-recipe-plugins")
    assert not marker.exists() and not Path("out").exists()
    code, out, err = run_cli(capsys, "build-engine", "--recipe", "r.yaml", "--allow-recipe-plugins")
    assert code == 0, err
    assert marker.exists()  # loaded in the build worker, as asked


# 2. Hugging Face folders that ship their own code -----------------------------------------------------


def _remote_code_folder(folder: Path, model_type: str, marker: Path, extra: dict | None = None) -> Path:
    folder.mkdir()
    config = {"model_type": model_type, **(extra or {}),
              "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                           "AutoModel": "evil.EvilModel", "AutoModelForImageClassification": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("command", [["export", "vit", "{m}"], ["export", "spec-pair", "--target", "{m}", "--draft",
                                                                   "layer-skip:1", "-o", "pair"]])
def test_folder_with_its_own_code_is_refused_without_a_prompt(in_tmp, command):
    """Run as a user would, on a terminal-less stdin: one line, no y/N prompt, the folder's code never imported."""
    marker = in_tmp / "imported"
    folder = _remote_code_folder(in_tmp / "m", "evil_model", marker)
    args = [a.format(m=folder) for a in command]
    proc = subprocess.run([sys.executable, "-m", "edgetok", *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "ships its own model code (auto_map)" in last, proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr and not marker.exists()


def test_known_model_type_with_auto_map_uses_transformers_own_code(in_tmp):
    from edgetok.llm.decoder import load_causal_lm

    marker = in_tmp / "imported"
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2).to_dict()
    config.pop("model_type")
    folder = _remote_code_folder(in_tmp / "m", "llama", marker, config)
    lm = load_causal_lm(str(folder))
    assert type(lm.model).__module__.startswith("transformers.models.llama") and not marker.exists()


# 3. Pair manifests name only their own files ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for name in ("t", "other"):
        LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64).save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SHIPPED_TOKENIZER / f, root / name / f)
    export_pair(str(root / "t"), "layer-skip:1", str(root / "pair"))
    export_pair(str(root / "other"), "layer-skip:1", str(root / "other_pair"))
    return root


@pytest.mark.parametrize("key, value, needle", [
    ("target.file", "../../../../../../etc/passwd", "target.file '../../../../../../etc/passwd' points outside"),
    ("target.file", "{other}/target/model.onnx", "points outside the pair folder"),
    ("draft.file", "{link}", "points outside the pair folder"),
    ("tokenizer.folder", "/etc", "tokenizer.folder '/etc' points outside"),
    ("tokenizer.folder", "..", "points outside"),
    ("draft.file", None, "draft.file is None"),
])
def test_manifest_paths_must_stay_inside_the_pair(capsys, tiny_pair, tmp_path, key, value, needle):
    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair / "pair", pair)
    (pair / "escape.onnx").symlink_to(tiny_pair / "other_pair" / "draft" / "model.onnx")
    manifest = json.loads((pair / MANIFEST).read_text())
    section, field = key.split(".")
    if isinstance(value, str):
        value = value.format(other=tiny_pair / "other_pair", link="escape.onnx")
    manifest[section][field] = value
    (pair / MANIFEST).write_text(json.dumps(manifest))
    code, out, err = run_cli(capsys, "generate", str(pair), "--prompt", "def f(", "--max-new-tokens", "2")
    assert_one_line_error(code, err, needle)
    code, out, err = run_cli(capsys, "profile", str(pair), "--pair", "--max-new-tokens", "2")
    assert_one_line_error(code, err, needle)


def test_untouched_manifest_still_generates(capsys, tiny_pair):
    code, out, err = run_cli(capsys, "generate", str(tiny_pair / "pair"), "--prompt", "def f(", "--max-new-tokens", "3")
    assert code == 0, err


# 7. Lost updates -------------------------------------------------------------------------------------

WRITER = """
import sys
from edgetok import sidecar
def bump(side):
    side["count"] = side.get("count", 0) + 1
for _ in range(int(sys.argv[2])):
    sidecar.update(sys.argv[1], bump)
"""


def test_concurrent_sidecar_updates_are_not_lost(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    (tmp_path / "m.edgetok.json").write_text("{}")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(model), "150"], env=env) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert json.loads((tmp_path / "m.edgetok.json").read_text())["count"] == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.edgetok.json", "m.onnx"]  # no lock beside it


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    from edgetok.vit import digits

    return str(digits.write_heldout_folder(tmp_path_factory.mktemp("d") / "heldout")["path"])


@pytest.mark.slow
def test_eval_does_not_record_accuracy_for_a_model_replaced_meanwhile(tmp_path, digits_data):
    from edgetok.vit import digits
    from edgetok.workflows.evaluate import EvalOptions, evaluate
    from edgetok.vit.export import ViTExportOptions, export_vit

    out = str(tmp_path / "m.onnx")
    export_vit(ViTExportOptions(model=digits.NAME, output=out))  # dense
    replaced = []

    def export_meanwhile(done, total):
        if not replaced:  # after the first batch: another export takes the path
            replaced.append(export_vit(ViTExportOptions(model=digits.NAME, method="tome", r=4, output=out)))

    result = evaluate(EvalOptions(model=out, data=digits_data, batch=256), export_meanwhile)
    assert "was replaced during the evaluation" in result["not_recorded"]
    side = json.loads((tmp_path / "m.edgetok.json").read_text())
    assert side["reduction"]["method"] == "tome" and "accuracy" not in side
    # Undisturbed, the result is recorded, with the hash of the file it is about.
    result = evaluate(EvalOptions(model=out, data=digits_data, batch=256))
    side = json.loads((tmp_path / "m.edgetok.json").read_text())
    assert "not_recorded" not in result and side["accuracy"]["top1"] == result["top1"]


def test_atomic_write_syncs_before_the_rename(tmp_path, monkeypatch):
    from edgetok import atomic

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    atomic.write_text(tmp_path / "f.json", "{}")
    assert calls == ["fsync", "replace", "fsync"]  # data, then the name, then the folder entry
    assert (tmp_path / "f.json").read_text() == "{}"


# 5. Leftovers after a kill ---------------------------------------------------------------------------

HOLD = """
import pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
def hold(*args, **kwargs):  # a slow exporter, caught mid-way deterministically
    marker.write_text("held")
    time.sleep(600)
import edgetok.llm.decoder, edgetok.vit.export
edgetok.vit.export.export_module = hold
edgetok.llm.decoder.export_decoder = hold  # edgetok.llm.pair imports it when it exports
from edgetok.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _wait_for(condition, what: str, limit: float = 300.0):
    """Wait for a state the test needs (not a timing assertion: the limit only stops a hung test)."""
    import time

    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has finished; only its exit status is left


def _held(tmp: Path, args: list[str]):
    marker = tmp / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(marker), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp)
    _wait_for(lambda: marker.exists() or proc.poll() is not None, "the export to start")
    assert proc.poll() is None, proc.communicate()
    return proc


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


EXPORT = ["export", "vit", "deit_tiny_patch16_224", "--img-size", "32", "-o", "new/sub/m.onnx"]


@pytest.mark.slow
def test_sigterm_during_export_cleans_up_like_ctrl_c(tmp_path):
    proc = _held(tmp_path, EXPORT)
    assert _leftovers(tmp_path)  # the staging folder exists while it works
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1].startswith("error: terminated"), err
    assert "Traceback" not in err and not (tmp_path / "new").exists()  # nor the folders made for the run


@pytest.mark.slow
def test_sigkill_leftovers_are_removed_by_the_next_write_there(capsys, tmp_path, monkeypatch):
    proc = _held(tmp_path, EXPORT)
    proc.kill()
    proc.wait()
    stale = _leftovers(tmp_path)
    assert stale and all(s.startswith("new/sub/.m.onnx.edgetok-") for s in stale)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "export", "vit", "deit_tiny_patch16_224", "--img-size", "32", "-o",
                             "new/sub/other.onnx")
    assert code == 0, err
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "new/sub").iterdir()) == ["other.edgetok.json", "other.onnx"]


def test_a_live_writers_staging_folder_is_kept(tmp_path):
    from edgetok import atomic

    with atomic.staging_dir(tmp_path / "a.onnx") as mine:
        theirs = tmp_path / f".b.onnx.edgetok-{os.getppid()}-x.tmp"  # a live process: pytest's parent
        theirs.mkdir()
        gone = tmp_path / ".c.onnx.edgetok-999999999-x.tmp"  # no such PID
        gone.mkdir()
        assert atomic.remove_stale(tmp_path) == [gone]
        assert mine.is_dir() and theirs.is_dir() and not gone.exists()


@pytest.mark.slow
def test_sigterm_during_spec_pair_export_leaves_nothing(tmp_path):
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2).save_pretrained(tmp_path / "t")
    proc = _held(tmp_path, ["export", "spec-pair", "--target", "t", "--draft", "layer-skip:1", "-o", "out/pair"])
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from edgetok.vit.export import ViTExportOptions, export_vit

    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_vit(ViTExportOptions(model="deit_tiny_patch16_224", img_size=32, output=str(out)))
    return out


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_build_takes_its_worker_with_it(tmp_path, tiny_onnx, how):
    lib, marker = _marker_library(tmp_path, hold=True)  # the worker blocks while loading this plugin
    engine = tmp_path / "e" / "m.engine"
    proc = subprocess.Popen([sys.executable, "-m", "edgetok", "build-engine", str(tiny_onnx), "--backend",
                             "tensorrt-rtx", "--target", "sm89", "--batch", "1", "--plugins", str(lib), "-o",
                             str(engine)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: marker.exists() or proc.poll() is not None, "the worker to load the plugin")
    assert proc.poll() is None, proc.communicate()
    worker = int(marker.read_text())
    assert worker != proc.pid and _alive(worker)
    proc.send_signal(how)
    proc.communicate(timeout=120)
    _wait_for(lambda: not _alive(worker), "the orphaned worker to die", limit=60)
    if how == signal.SIGTERM:
        assert proc.returncode == 143 and not (tmp_path / "e").exists()
    else:  # nothing could clean up; the next write into that folder does
        assert _leftovers(tmp_path / "e")
        from edgetok import atomic

        atomic.write_text(tmp_path / "e" / "note.txt", "x")
        assert _leftovers(tmp_path / "e") == []
    assert not engine.exists()


# 8. Resource limits ----------------------------------------------------------------------------------


def test_export_batch_is_capped_with_the_reason(capsys, in_tmp):
    code, out, err = run_cli(capsys, "export", "vit", "deit_tiny_patch16_224", "--batch", "4096", "-o", "m.onnx")
    assert_one_line_error(code, err, "--batch 4096 is out of range: give 1..64", "only the example traced")
    assert list(in_tmp.iterdir()) == []


def test_profile_refuses_a_batch_the_machine_cannot_hold(capsys, tiny_onnx, tmp_path):
    code, out, err = run_cli(capsys, "profile", str(tiny_onnx), "--batch", "10000000", "--duration", "0.01",
                             "-o", str(tmp_path / "p"))
    assert_one_line_error(code, err, "--batch 10000000 needs about", "GiB for m.onnx", "use --batch")
    assert not (tmp_path / "p").exists()


def test_memory_estimate_counts_a_vits_activations():
    from edgetok.profile.memory import check_batch_fits, per_item_bytes

    specs = {"pixel_values": (["batch", 3, 224, 224], "float32")}
    side = {"model": {"name": "deit_small_patch16_224", "embed_dim": 384, "num_heads": 6},
            "reduction": {"tokens_per_layer": [[197, 197]] * 12}}
    item, basis = per_item_bytes(specs, side)
    assert item == 3 * 224 * 224 * 4 + 2 * 4 * (6 * 197 ** 2 + 8 * 197 * 384) and "activations at 197 tokens" in basis
    check_batch_fits("m.onnx", 1000, specs, side, "cpu", available=24 * 2**30)  # 1000 DeiT-S images: fits in 24 GiB
    with pytest.raises(EdgetokError, match=r"--batch 4096 needs about 2\d\.\d GiB .* use --batch 3\d\d\d or less"):
        check_batch_fits("m.onnx", 4096, specs, side, "cpu", available=24 * 2**30)


# 9. One-line errors where there were internal ones ---------------------------------------------------


def test_build_refuses_external_data_outside_the_models_folder(capsys, tiny_onnx, tmp_path):
    import onnx

    model = onnx.load(str(tiny_onnx))
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save_model(model, str(inner / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    (inner / "m.onnx.data").rename(tmp_path / "outside.data")
    stored = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for init in stored.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save_model(stored, str(inner / "m.onnx"))
    shutil.copy(tiny_onnx.with_name("m.edgetok.json"), inner / "m.edgetok.json")
    for precision in ("fp16", "fp32"):
        code, out, err = run_cli(capsys, "build-engine", str(inner / "m.onnx"), "--backend", "tensorrt-rtx",
                                 "--precision", precision, "--target", "sm89")
        assert_one_line_error(code, err, "keeps its data in '../outside.data', outside the model's folder")
    assert sorted(p.name for p in inner.iterdir()) == ["m.edgetok.json", "m.onnx"]
