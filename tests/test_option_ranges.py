"""Every option's range checked before the work it would spoil, and every ordinary failure (a folder we may
not write, a file in the way, a tampered pair manifest) one line naming its cause, never "please report it"."""

import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from cli_assertions import assert_one_line_error, run_cli
from transformers import LlamaConfig

from edgetok import cli
from edgetok.errors import EdgetokError, os_error_message
from edgetok.llm.pair import MANIFEST, export_pair

SHIPPED_TOKENIZER = Path(__file__).parents[1] / "edgetok" / "assets" / "spec_pair" / "target"
MODEL = "edgetok_digits_vit"  # 65 tokens, 12 blocks


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def no_export(monkeypatch):
    """Any export, evaluation or comparison that starts fails the test: the refusal must come first."""
    import edgetok.workflows.comparison
    import edgetok.vit.export

    def ran(*args, **kwargs):
        raise AssertionError("the expensive work ran before the refusal")

    monkeypatch.setattr(edgetok.vit.export, "export_vit", ran)
    monkeypatch.setattr(edgetok.workflows.comparison, "compare", ran)


def assert_ordinary(code, err, *needles):
    assert_one_line_error(code, err, *needles)
    assert "internal error" not in err and "please report" not in err, err


# 10 and 13. export options: refused before the model loads ---------------------------------------------


@pytest.mark.parametrize("args, needles", [
    (["--attention", "sparse", "--attention-block", "4194304"], ["--attention-block 4194304", ">= 16 and <= 1024"]),
    (["--attention", "sparse", "--attention-block", str(2 ** 62)], ["--attention-block", "power of two >= 16 and <= 1024"]),
    (["--attention", "sparse", "--attention-block", "48"], ["--attention-block 48"]),
    (["--attention", "sparse", "--attention-mass", "nan"], ["--attention-mass nan"]),
    (["--attention", "sparse", "--attention-keep", "1.5"], ["--attention-keep 1.5"]),
    (["--attention", "sparse", "--attention-keep", "0.5", "--attention-mass", "0.5"],
     ["--attention-keep", "--attention-mass", "not both"]),
    (["--method", "ats", "--ats-budget", "inf"], ["--ats-budget inf", "token count"]),
    (["--method", "ats", "--ats-budget", "nan"], ["--ats-budget nan"]),
    (["--method", "ats", "--ats-budget", "2.5"], ["--ats-budget 2.5"]),
    (["--method", "gtp", "--propagate", "8", "--alpha", "1e30"], ["--alpha 1e+30", "[0, 1]"]),
    (["--method", "gtp", "--propagate", "8", "--alpha", "-0.1"], ["--alpha -0.1"]),
])
def test_export_option_out_of_range_is_refused_before_anything_runs(capsys, in_tmp, no_export, args, needles):
    code, _, err = run_cli(capsys, "export", "vit", MODEL, *args, "-o", "out/m.onnx")
    assert_ordinary(code, err, *needles)
    assert not Path("out").exists()


def test_recipe_attention_options_are_checked_too(capsys, in_tmp, no_export):
    Path("r.yaml").write_text("export:\n  model: edgetok_digits_vit\n  attention: sparse\n  attention_block: 4194304\n"
                              "  output: out/m.onnx\n")
    code, _, err = run_cli(capsys, "export", "--recipe", "r.yaml")
    assert_ordinary(code, err, "recipe r.yaml: export --attention-block 4194304")
    assert not Path("out").exists()


def test_cli_bounds_match_the_library():
    from edgetok.plugins import block_sparse_attention as bsa
    from edgetok.vit.methods import gtp_torch as gtp

    assert (cli.MIN_ATTENTION_BLOCK, cli.MAX_ATTENTION_BLOCK) == (bsa.MIN_BLOCK, bsa.MAX_BLOCK)
    assert cli.MAX_GTP_ALPHA == gtp.MAX_ALPHA


def test_attention_block_is_bounded_by_the_models_tokens():
    from edgetok.plugins import block_sparse_attention as bsa
    from edgetok.plugins.spec import PluginError
    from edgetok.vit.attention import Sparsity

    assert [bsa.largest_block(n) for n in (1, 16, 17, 65, 197, 785, 5000)] == [16, 16, 32, 128, 256, 1024, 1024]
    Sparsity(block=128).check(65)  # one block holding all 65 tokens: allowed
    with pytest.raises(EdgetokError, match=r"--attention-block 256 is larger than the model's 65 tokens need .* 16\.\.128"):
        Sparsity(block=256).check(65)
    # the plugin itself (an ONNX from elsewhere)
    with pytest.raises(PluginError, match="block=2048 must be a power of two >= 16 and <= 1024"):
        bsa.SPEC.check([(1, 2, 65, 32), (1, 2, 65, 32), (1, 2, 65, 32), (1, 65, 1)],
                       {"scale": 0.0, "block": 2048, "mass": 0.9, "keep": 0.0, "prefix": 1})


def test_ats_blocks_refusal_names_ats_blocks(capsys, in_tmp, no_export):
    code, _, err = run_cli(capsys, "export", "vit", MODEL, "--method", "ats", "--ats-blocks", "x", "-o", "m.onnx")
    assert_ordinary(code, err, "--ats-blocks 'x'")
    assert "--keep-layers" not in err


@pytest.mark.parametrize("spec", ["(1e308,-1)", "(1e308,0.5)", "(1e200,-1e200)"])
def test_r_schedule_that_overflows_is_one_line(spec):
    from edgetok.vit.methods.tome_torch import parse_r_schedule

    with pytest.raises(EdgetokError, match="finite number of tokens"):
        parse_r_schedule(spec, 12)
    assert parse_r_schedule("(8,-1)", 12)[0][:3] == [16, 14, 13]  # the reference's linear schedule still parses


def test_r_schedule_overflow_through_the_cli(capsys, in_tmp):
    code, _, err = run_cli(capsys, "export", "vit", MODEL, "--method", "tome", "--r-schedule", "(1e308,-1)",
                           "-o", "m.onnx")
    assert_ordinary(code, err, "r schedule '(1e308,-1)'")
    assert not Path("m.onnx").exists()


def test_gtp_alpha_is_bounded_in_the_library():
    from edgetok.vit.methods.gtp_torch import GTP

    with pytest.raises(EdgetokError, match=r"--alpha 1e\+30 must be a finite number >= 0 and <= 1"):
        GTP([8] * 12, 1e30, "spatial")
    assert GTP([8] * 12, 1.0, "spatial").alpha == 1.0


def test_head_variance_inf_is_strict_json_and_reads_back(tmp_path):
    """0,inf keeps every head; the sidecar writes the unbounded HIGH as "inf" (strict JSON has no Infinity),
    and what it records parses back to the same bounds (the torch runner rebuilds the method from it)."""
    from edgetok import sidecar
    from edgetok.vit.methods import make_method
    from edgetok.vit.methods.zerotprune_torch import parse_head_variance

    method = make_method("zerotprune", 12, r=4, head_variance="0,inf", tokens=65)
    sidecar.write(tmp_path / "z.edgetok.json", {"reduction": method.params([4] * 12)})

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    recorded = json.loads((tmp_path / "z.edgetok.json").read_text(), parse_constant=refuse)["reduction"]
    assert recorded["head_variance"] == [0.0, "inf"]
    assert parse_head_variance(recorded["head_variance"]) == (0.0, math.inf)


def test_sidecars_are_strict_json(tmp_path):
    from edgetok import sidecar

    sidecar.write(tmp_path / "x.edgetok.json", {"a": [float("-inf"), float("nan"), 1.5], "b": {"c": float("inf")}})
    text = (tmp_path / "x.edgetok.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"a": ["-inf", "nan", 1.5], "b": {"c": "inf"}}


# 11. compare: its own options and images before 11 exports ---------------------------------------------


@pytest.fixture()
def heldout(tmp_path):
    folder = tmp_path / "heldout"
    (folder / "0").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "0" / "a.png")
    return folder


@pytest.mark.parametrize("args, needles", [
    (["--batch", "0"], ["--batch 0"]),
    (["--duration", "nan"], ["--duration nan"]),
    (["--duration", "-1"], ["--duration -1"]),
    (["--rounds", "0"], ["--rounds 0"]),
])
def test_compare_options_are_refused_before_any_export(capsys, in_tmp, heldout, no_export, args, needles):
    code, _, err = run_cli(capsys, "compare", MODEL, "--data", str(heldout), *args, "-o", "cmp")
    assert_ordinary(code, err, *needles)
    assert not Path("cmp").exists()


@pytest.mark.parametrize("layout", ["empty", "empty class"])
def test_compare_refuses_a_folder_without_images_before_any_export(capsys, in_tmp, no_export, layout):
    Path("data").mkdir()
    if layout == "empty class":
        Path("data/0").mkdir()
    code, _, err = run_cli(capsys, "compare", MODEL, "--data", "data", "-o", "cmp")
    assert_ordinary(code, err, "--data data")
    assert not Path("cmp").exists()


# 12. ordinary OS failures: one line naming the path --------------------------------------------------------


@pytest.mark.parametrize("output", ["/proc/edgetok-test-out", "/sys/edgetok-test-out"])
def test_output_in_a_pseudo_filesystem_is_one_line(capsys, in_tmp, output):
    code, _, err = run_cli(capsys, "data", "digits", "-o", output)
    assert_ordinary(code, err, output, "pseudo-filesystem")


def test_output_under_a_regular_file_is_one_line(capsys, in_tmp):
    Path("afile").write_text("x")
    code, _, err = run_cli(capsys, "data", "digits", "-o", "afile/sub")
    assert_ordinary(code, err, "afile")


@pytest.mark.parametrize("output, needles", [
    ("afile/m.onnx", ["-o afile/m.onnx: afile is a file, not a folder"]),
    ("afile/sub/m.onnx", ["afile is a file, not a folder"]),
    ("/proc/m.onnx", ["-o /proc/m.onnx is in /proc"]),
    ("/sys/kernel/m.onnx", ["-o /sys/kernel/m.onnx is in /sys"]),
])
def test_export_output_place_is_checked_before_the_export(capsys, in_tmp, no_export, output, needles):
    Path("afile").write_text("x")
    code, _, err = run_cli(capsys, "export", "vit", MODEL, "-o", output)
    assert_ordinary(code, err, *needles)
    assert Path("afile").read_text() == "x"


def test_compare_output_under_a_file_is_refused_before_any_export(capsys, in_tmp, heldout, no_export):
    Path("afile").write_text("x")
    code, _, err = run_cli(capsys, "compare", MODEL, "--data", str(heldout), "-o", "afile/cmp")
    assert_ordinary(code, err, "afile is a file, not a folder")


@pytest.fixture()
def no_build_or_profile(monkeypatch):
    """Any engine build or profile that starts fails the test: an output place is refused before it."""
    import edgetok.engine.build
    import edgetok.llm.profile
    import edgetok.profile.profiler

    def ran(*args, **kwargs):
        raise AssertionError("the build or profile ran before the refusal")

    monkeypatch.setattr(edgetok.engine.build, "build_engine", ran)
    monkeypatch.setattr(edgetok.profile.profiler, "profile", ran)
    monkeypatch.setattr(edgetok.llm.profile, "profile_pair", ran)


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["logits"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("args, needles", [
    (["build-engine", "m.onnx", "-o", "/proc/m.engine"], ["-o /proc/m.engine is in /proc"]),
    (["build-engine", "m.onnx", "-o", "/sys/kernel/m.engine"], ["-o /sys/kernel/m.engine is in /sys"]),
    (["build-engine", "m.onnx", "-o", "afile/m.engine"], ["-o afile/m.engine: afile is a file, not a folder"]),
    (["profile", "m.onnx", "-o", "/proc/edgetok-prof"], ["-o /proc/edgetok-prof/profile.json is in /proc"]),
    (["profile", "m.onnx", "-o", "afile/prof"], ["afile is a file, not a folder"]),
    (["profile", "m.onnx", "--report-json", "/sys/r.json"], ["--report-json /sys/r.json is in /sys"]),
    (["profile", "m.onnx", "--report-json", "afile/r.json"], ["--report-json afile/r.json: afile is a file"]),
    (["profile", "--pair", "PAIR", "-o", "/proc/edgetok-prof"], ["is in /proc"]),
    (["profile", "--pair", "PAIR", "--report-json", "afile/r.json"], ["afile is a file, not a folder"]),
])
def test_build_and_profile_outputs_are_checked_before_the_work(capsys, in_tmp, tiny_pair, no_build_or_profile,
                                                               args, needles):
    _tiny_onnx(in_tmp / "m.onnx")
    Path("afile").write_text("x")
    code, _, err = run_cli(capsys, *[str(tiny_pair) if a == "PAIR" else a for a in args])
    assert_ordinary(code, err, *needles)
    assert Path("afile").read_text() == "x"
    assert sorted(p.name for p in in_tmp.iterdir()) == ["afile", "m.onnx"]  # nothing made


def test_report_json_to_stdout_is_not_an_output_place(capsys, in_tmp, no_build_or_profile):
    """/proc/self/fd/1 names standard output, which a report is written into: not refused as a /proc path."""
    _tiny_onnx(in_tmp / "m.onnx")
    code, _, err = run_cli(capsys, "profile", "m.onnx", "--report-json", "/proc/self/fd/1")
    assert code == 1 and "the build or profile ran" in err  # it got past the checks, to the (stubbed) profile


def test_a_name_of_240_characters_is_written(capsys, in_tmp):
    """The staging name (.NAME.edgetok-PID-XXXX.tmp) of a long name is shortened, so any name that fits the
    filesystem's 255 bytes can be written."""
    name = "d" * 240
    code, _, err = run_cli(capsys, "data", "digits", "-o", name)
    assert code == 0, err
    assert Path(name).is_dir() and not [p for p in Path(".").iterdir() if p.name.startswith(".")]


def test_temp_names_of_long_outputs_fit_and_are_swept(tmp_path):
    from edgetok import atomic

    name = "n" * 250 + ".onnx"
    prefix = atomic._temp_prefix(name)
    assert len((prefix + "abcdefgh.tmp").encode()) <= 255
    assert atomic._TEMP.match(prefix + "abcdefgh.tmp")  # still recognised as ours by the next run's sweep
    atomic.write_text(tmp_path / name, "x")
    assert (tmp_path / name).read_text() == "x"


def test_unwritable_folder_is_one_line_naming_the_output(capsys, in_tmp, monkeypatch):
    """As root no folder is unwritable, so the OS error is raised where the writer would meet it."""
    import edgetok.vit.digits

    def denied(path, split):
        raise PermissionError(errno.EACCES, "Permission denied", f"{path}/../.digits.edgetok-123-abcd1234.tmp")

    monkeypatch.setattr(edgetok.vit.digits, "write_heldout_folder", denied)
    code, _, err = run_cli(capsys, "data", "digits", "-o", "ro/digits")
    assert_ordinary(code, err, "permission denied for ro/digits/../digits", "choose a folder you can write")


@pytest.mark.parametrize("exc, needles", [
    (OSError(errno.ENOSPC, "No space left on device", "out/.m.onnx.edgetok-9-abc.tmp"),
     ["no space left", "out/m.onnx"]),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/m.onnx"), ["read-only filesystem", "/mnt/ro/m.onnx"]),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "out/m.onnx"), ["out/m.onnx is a folder"]),
    (OSError(errno.ENAMETOOLONG, "File name too long", "out/" + "n" * 300), ["too long", "shorter name"]),
])
def test_ordinary_os_errors_name_the_path(exc, needles):
    message = os_error_message(exc)
    assert message and all(n in message for n in needles), message


def test_cache_that_is_a_file_names_edgetok_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cachefile"
    cache.write_text("x")
    monkeypatch.setenv("EDGETOK_CACHE", str(cache))
    exc = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(cache / "cubins" / "3.0-abc"))
    message = os_error_message(exc)
    assert f"{cache} is a file" in message and f"EDGETOK_CACHE={cache}" in message


def test_a_bug_is_still_reported_as_one(capsys, monkeypatch):
    """Not every OSError is the user's: one naming no path stays an internal error (with the debug hint)."""
    import edgetok.vit.digits

    def broken(path, split):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(edgetok.vit.digits, "write_heldout_folder", broken)
    code, _, err = run_cli(capsys, "data", "digits", "-o", "x")
    assert code == 1 and "internal error OSError" in err


# 12. tampered pair manifests; generate --seed; build-engine PAIR all or nothing ------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(root / "t")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED_TOKENIZER / f, root / "t" / f)
    export_pair(str(root / "t"), "layer-skip:1", str(root / "pair"))
    return root / "pair"


def _tampered(tiny_pair, tmp_path, change) -> Path:
    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    manifest = json.loads((pair / MANIFEST).read_text())
    manifest = change(manifest) or manifest
    (pair / MANIFEST).write_text(json.dumps(manifest))
    return pair


def _set(section, key, value):
    def change(m):
        where = m if section is None else m[section]
        if value is KeyError:
            del where[key]
        else:
            where[key] = value
    return change


@pytest.mark.parametrize("change, needles", [
    (_set("target", "num_hidden_layers", 3), ["target.num_hidden_layers is 3", "2 layers of KV cache"]),
    (_set("draft", "num_hidden_layers", 5), ["draft.num_hidden_layers is 5"]),
    (_set("target", "num_key_value_heads", 4), ["target.num_key_value_heads is 4", "2 KV heads"]),
    (_set("target", "head_size", 16), ["target.head_size is 16"]),
    (lambda m: [m[r].update(vocab_size=100) for r in ("target", "draft")] and m.update(vocab_size=100),
     ["target.vocab_size is 100", "258 logits"]),
    (_set(None, "vocab_size", 100), ["vocab_size"]),
    (_set("target", "num_hidden_layers", KeyError), ["target.num_hidden_layers is missing"]),
    (_set("target", "num_hidden_layers", "two"), ['target.num_hidden_layers is "two"', "positive integer"]),
    (_set(None, "target", [1]), ["target is [1], not an object"]),
    (_set(None, "max_length", "x"), ["max_length"]),
    (_set(None, "special_tokens", 5), ["special_tokens is 5"]),
    (lambda m: [1, 2], ["the manifest is [1, 2]"]),
])
def test_tampered_manifest_is_one_line_naming_the_field(capsys, tiny_pair, tmp_path, change, needles):
    pair = _tampered(tiny_pair, tmp_path, change)
    code, _, err = run_cli(capsys, "generate", str(pair), "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
    assert_ordinary(code, err, *needles)


def test_untampered_pair_still_generates(capsys, tiny_pair):
    code, out, err = run_cli(capsys, "generate", str(tiny_pair), "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
    assert code == 0, err


def test_negative_seed_is_refused(capsys, tiny_pair):
    code, _, err = run_cli(capsys, "generate", str(tiny_pair), "--prompt-ids", "1,2", "--temperature", "0.5",
                           "--seed", "-1")
    assert_ordinary(code, err, "--seed -1")


def test_pair_build_failing_on_the_draft_leaves_no_engines(capsys, tiny_pair, tmp_path, monkeypatch):
    """Every engine is staged and published only when all built: a draft that fails leaves the folder as it
    was (no target engines, the manifest unchanged)."""
    import edgetok.engine.build

    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    before = {p.relative_to(pair): p.read_bytes() for p in pair.rglob("*") if p.is_file()}
    built = []

    def fake_build(opts, say, reuse=False):
        if "draft" in opts.onnx:
            raise EdgetokError("the draft's build failed (as a test)")
        Path(opts.output).write_bytes(b"engine")
        Path(opts.output).with_suffix(".json").write_text("{}")
        built.append(opts.output)
        return {"backend": {"name": "tensorrt", "version": "0"}, "precision": "fp32", "profiles": [],
                "build_seconds": 0}

    monkeypatch.setattr(edgetok.engine.build, "build_engine", fake_build)
    monkeypatch.setattr(edgetok.engine.build, "progress", lambda tty: _Say())
    code, _, err = run_cli(capsys, "build-engine", str(pair))
    assert_ordinary(code, err, "the draft's build failed")
    assert len(built) == 2  # the target and its tree variant were built, then the draft failed
    after = {p.relative_to(pair): p.read_bytes() for p in pair.rglob("*") if p.is_file()}
    assert after == before


def test_pair_build_publishes_every_engine_when_all_build(capsys, tiny_pair, tmp_path, monkeypatch):
    import edgetok.engine.build

    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)

    def fake_build(opts, say, reuse=False):
        Path(opts.output).write_bytes(b"engine")
        return {"backend": {"name": "tensorrt", "version": "0"}, "precision": "fp32", "profiles": [],
                "build_seconds": 0}

    monkeypatch.setattr(edgetok.engine.build, "build_engine", fake_build)
    monkeypatch.setattr(edgetok.engine.build, "progress", lambda tty: _Say())
    code, _, err = run_cli(capsys, "build-engine", str(pair))
    assert code == 0, err
    assert sorted(p.name for p in pair.rglob("*.engine")) == ["model.fp32.engine", "model.fp32.engine",
                                                              "tree.fp32.engine"]
    assert not [p for p in pair.rglob(".*")]  # no staging folder left
    recorded = json.loads((pair / MANIFEST).read_text())["engines"]
    assert {r: recorded[r]["file"] for r in ("target", "target_tree", "draft")} == {
        "target": "target/model.fp32.engine", "target_tree": "target/tree.fp32.engine",
        "draft": "draft/model.fp32.engine"}


@pytest.mark.parametrize("built_before", [True, False])
def test_pair_build_failing_to_publish_in_draft_leaves_the_old_engines_and_manifest(capsys, tiny_pair, tmp_path,
                                                                                      monkeypatch, built_before):
    """The engines of target/ and draft/ and the manifest recording them are one set: a rename that fails in
    draft/ after target/'s engines were renamed puts target/'s old engines back (or removes the new ones), and
    the manifest stays the old one."""
    import edgetok.engine.build
    from edgetok import atomic

    pair = tmp_path / "pair"
    shutil.copytree(tiny_pair, pair)
    generation = ["old"]

    def fake_build(opts, say, reuse=False):
        Path(opts.output).write_text(f"{generation[0]} engine of {opts.onnx}")
        Path(opts.output).with_suffix(".json").write_text(f'{{"generation": "{generation[0]}"}}')
        return {"backend": {"name": "tensorrt", "version": generation[0]}, "precision": "fp32", "profiles": [],
                "build_seconds": 0}

    monkeypatch.setattr(edgetok.engine.build, "build_engine", fake_build)
    monkeypatch.setattr(edgetok.engine.build, "progress", lambda tty: _Say())
    if built_before:
        code, _, err = run_cli(capsys, "build-engine", str(pair))
        assert code == 0, err
    before = {p.relative_to(pair): p.read_bytes() for p in pair.rglob("*") if p.is_file()}
    assert len([p for p in before if p.suffix == ".engine"]) == (3 if built_before else 0)
    generation[0] = "new"
    real, renamed = os.replace, []

    def replace(src, dst):
        staged = Path(src).parent != Path(dst).parent  # not a temp file or a backup put back in its folder
        if staged and Path(dst).parent.name == "draft":
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
        if staged:
            renamed.append(Path(dst).relative_to(pair))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    code, _, err = run_cli(capsys, "build-engine", str(pair))
    assert code != 0 and "injected" in err
    assert {p.parent.name for p in renamed} == {"target"}  # target/'s engines were in place when draft/ failed
    after = {p.relative_to(pair): p.read_bytes() for p in pair.rglob("*") if p.is_file()}
    assert after == before  # no new engine, no new manifest, no leftover


class _Say:
    def __enter__(self):
        return lambda message: None

    def __exit__(self, *exc):
        return False
