"""`edgetok export`: the success paths write ONNX + sidecar; every bad input is one line, no file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from cli_assertions import assert_one_line_error, run_cli
from PIL import Image


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def files_written(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


TINY = "deit_tiny_patch16_224"


@pytest.mark.slow
def test_export_vit_writes_onnx_and_sidecar(capsys, in_tmp):
    code, out, err = run_cli(capsys, "export", "vit", TINY, "--method", "evit", "--keep-rate", "0.7",
                             "--img-size", "96", "-o", "m/evit.onnx")
    assert code == 0, err
    assert files_written(in_tmp) == ["m/evit.edgetok.json", "m/evit.onnx"]
    side = json.loads((in_tmp / "m/evit.edgetok.json").read_text())
    assert side["model"]["weights"] == "random" and "weights: random" in out
    assert side["reduction"]["method"] == "evit" and side["reduction"]["keep_layers"] == [3, 6, 9]
    # 36 patches + cls; keep ceil(0.7 * 36) = 26 (+ fused) at block 3, ceil(0.7 * 27) = 19 at 6, 14 at 9
    assert [t[1] for t in side["reduction"]["tokens_per_layer"]] == [37] * 3 + [28] * 3 + [21] * 3 + [16] * 3
    assert side["validation"]["passed"] and side["validation"]["batch"] == 2
    assert side["onnx"]["inputs"][0] == {"name": "pixel_values", "shape": ["batch", 3, 96, 96], "dtype": "float32"}
    assert side["flops"]["speedup_bound"] > 1.0 and side["onnx"]["opset"] == 17


@pytest.mark.slow
def test_export_with_checkpoint_records_weights(capsys, in_tmp):
    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False)
    torch.save(model.state_dict(), "w.pth")
    code, out, err = run_cli(capsys, "export", "vit", TINY, "--checkpoint", "w.pth", "--method", "tome",
                             "--r-schedule", "(8, -1)", "-o", "t.onnx")
    assert code == 0, err
    side = json.loads(Path("t.edgetok.json").read_text())
    assert side["model"]["weights"] == str(in_tmp / "w.pth")
    # ToMe (r, inflect) = (8, -1): int(16 - i·16/11), from 2r down to 0
    assert side["reduction"]["r_per_layer"] == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]


def test_export_hf_folder(capsys, in_tmp):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=5, architectures=["ViTForImageClassification"])
    config.save_pretrained("cfg-only")
    ViTForImageClassification(config).save_pretrained("with-weights")
    for folder, weights in [("cfg-only", "random"), ("with-weights", str(in_tmp / "with-weights"))]:
        code, out, err = run_cli(capsys, "export", "vit", folder, "--method", "tome", "--r", "12", "-o", f"{folder}.onnx")
        assert code == 0, err
        side = json.loads(Path(f"{folder}.edgetok.json").read_text())
        assert side["model"]["weights"] == weights and side["model"]["family"] == "hf"
        assert [t[1] for t in side["reduction"]["tokens_per_layer"]] == [53, 41]


HF_SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128)


@pytest.mark.parametrize(
    "case, classifier",
    [("num_labels", True), ("id2label", True), ("no_labels", False), ("classifier_weights", True),
     ("encoder_weights", False)],
)
def test_hf_folder_without_architectures_gets_the_head_its_config_means(capsys, in_tmp, case, classifier):
    """No `architectures`: labels in config.json (or classifier.* weights) mean a classifier, else an encoder;
    the summary and sidecar say which head was exported and why."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    labels = {"num_labels": dict(num_labels=7), "id2label": dict(id2label={i: f"c{i}" for i in range(7)})}
    config = ViTConfig(**HF_SMALL, **labels.get(case, {}))
    if case == "classifier_weights":
        ViTForImageClassification(ViTConfig(**HF_SMALL, num_labels=7)).save_pretrained("m")
    elif case == "encoder_weights":
        ViTModel(config).save_pretrained("m")
    else:
        config.save_pretrained("m")
    raw = json.loads(Path("m/config.json").read_text())
    raw.pop("architectures", None)
    Path("m/config.json").write_text(json.dumps(raw))
    code, out, err = run_cli(capsys, "export", "vit", "m", "-o", "m.onnx")
    assert code == 0, err
    side = json.loads(Path("m.edgetok.json").read_text())
    outputs = [o["name"] for o in side["onnx"]["outputs"]]
    head_line = next(line for line in out.splitlines() if line.strip().startswith("head"))
    if classifier:
        assert outputs == ["logits"] and side["onnx"]["outputs"][0]["shape"] == ["batch", 7]
        assert side["model"]["head"].startswith("classifier: ViTForImageClassification, 7 classes")
        assert "classifier" in head_line
    else:
        assert outputs[0] == "last_hidden_state" and side["model"]["num_classes"] == 0
        assert side["onnx"]["outputs"][0]["shape"] == ["batch", 17, 64]  # not the exporter's node-named dims
        assert side["model"]["head"].startswith("encoder: ViTModel") and "no class logits" in head_line


def test_eval_refuses_a_model_without_class_logits(capsys, in_tmp):
    """An encoder's features are not class scores: one line, not numpy's broadcast error."""
    from transformers import ViTConfig

    ViTConfig(**HF_SMALL).save_pretrained("enc")
    assert run_cli(capsys, "export", "vit", "enc", "-o", "enc.onnx")[0] == 0
    for cls in range(3):
        Path(f"data/{cls}").mkdir(parents=True)
        Image.new("RGB", (32, 32), (cls * 80, 0, 0)).save(f"data/{cls}/x.png")
    code, out, err = run_cli(capsys, "eval", "enc.onnx", "--data", "data")
    assert_one_line_error(code, err, "enc.onnx has no class logits", "last_hidden_state", "num_labels")
    code, out, err = run_cli(capsys, "eval", "enc", "--data", "data")  # the folder itself, in PyTorch
    assert_one_line_error(code, err, "has no class logits", "encoder: ViTModel")


BAD_INPUTS = {
    "unknown_model": (["export", "vit", "deit_smal_patch16_224"], ["deit_smal_patch16_224", "deit_small_patch16_224"]),
    "not_a_vit": (["export", "vit", "resnet18"], ["resnet18", "not a timm VisionTransformer"]),
    "r_too_large": (["export", "vit", TINY, "--method", "tome", "--r", "99"], ["r=99", "at most 98"]),
    "r_list_too_large": (["export", "vit", TINY, "--method", "tome", "--r-schedule", "90,90"], ["r=90", "block 1"]),
    "r_schedule_garbage": (["export", "vit", TINY, "--method", "tome", "--r-schedule", "fast"], ["'fast'"]),
    "keep_rate_zero": (["export", "vit", TINY, "--method", "evit", "--keep-rate", "0"], ["--keep-rate 0.0", "(0, 1]"]),
    "keep_rate_above_one": (["export", "vit", TINY, "--method", "evit", "--keep-rate", "1.5"], ["--keep-rate 1.5"]),
    "keep_layer_out_of_range": (["export", "vit", TINY, "--method", "evit", "--keep-rate", "0.5", "--keep-layers",
                                 "3,12"], ["[12]", "0..11"]),
    "img_size_not_divisible": (["export", "vit", TINY, "--img-size", "100"], ["--img-size 100", "patch size 16", "96"]),
    "missing_checkpoint": (["export", "vit", TINY, "--checkpoint", "nope.pth"], ["nope.pth", "does not exist"]),
    "r_not_an_int": (["export", "vit", TINY, "--method", "tome", "--r", "many"], ["'many'"]),
    "unknown_recipe": (["export", "--recipe", "no_such_recipe"], ["no_such_recipe", "deit_small_tome_r13", "default"]),
    "tome_without_r": (["export", "vit", TINY, "--method", "tome"], ["--r"]),
    "bad_output_suffix": (["export", "vit", TINY, "-o", "model.trt"], ["model.trt", ".onnx"]),
    "img_size_zero": (["export", "vit", TINY, "--img-size", "0"], ["--img-size 0"]),
    "evit_option_for_tome": (["export", "vit", TINY, "--method", "tome", "--r", "4", "--keep-rate", "0.5"],
                             ["--keep-rate", "EViT"]),
    "tome_option_for_evit": (["export", "vit", TINY, "--method", "evit", "--keep-rate", "0.5", "--r", "4"], ["--r"]),
    "empty_keep_layers": (["export", "vit", TINY, "--method", "evit", "--keep-rate", "0.5", "--keep-layers", ""],
                          ["--keep-layers is empty"]),
    "r_schedule_float": (["export", "vit", TINY, "--method", "tome", "--r-schedule", "1.5"], ["'1.5'"]),
    "r_schedule_long_tuple": (["export", "vit", TINY, "--method", "tome", "--r-schedule", "(8,-1,3)"], ["(r, inflect)"]),
    "opset_too_new": (["export", "vit", TINY, "--opset", "99", "-o", "new/dir/m.onnx"], ["--opset 99"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_writes_nothing(capsys, in_tmp, case):
    args, needles = BAD_INPUTS[case]
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, *needles)
    assert not (in_tmp / "edgetok-out").exists() and not list(in_tmp.glob("*.onnx")) and not (in_tmp / "new").exists()


def test_unreadable_checkpoint(capsys, in_tmp):
    Path("junk.pth").write_bytes(b"\x00not a checkpoint" * 10)
    code, out, err = run_cli(capsys, "export", "vit", TINY, "--checkpoint", "junk.pth", "-o", "x.onnx")
    assert_one_line_error(code, err, "junk.pth", "cannot read")
    assert files_written(in_tmp) == ["junk.pth"]


@pytest.mark.parametrize("state", ["other_model", "foreign_keys"])
def test_checkpoint_that_does_not_match(capsys, in_tmp, state):
    if state == "other_model":
        torch.save(timm.create_model("deit_small_patch16_224", pretrained=False).state_dict(), "c.pth")
    else:
        torch.save({"backbone.weight": torch.zeros(3)}, "c.pth")
    code, out, err = run_cli(capsys, "export", "vit", TINY, "--checkpoint", "c.pth", "-o", "x.onnx")
    assert_one_line_error(code, err, "c.pth", "does not")
    assert files_written(in_tmp) == ["c.pth"]


def _scatter_merge(t, x, size, weight):
    """ToMe's original scatter_reduce merge: correct in PyTorch, rejected by TensorRT."""
    from edgetok.vit.token_transform import gather_tokens

    out = gather_tokens(x * weight, t.keep)
    w = gather_tokens(weight, t.keep)
    dst = t.dst.unsqueeze(-1)
    out = out.scatter_reduce(1, dst.expand(-1, -1, x.shape[-1]), gather_tokens(x * weight, t.src), reduce="sum")
    w = w.scatter_reduce(1, dst, gather_tokens(weight, t.src), reduce="sum")
    return out / w, w


@pytest.mark.slow
def test_graph_trt_rejects_is_refused_unless_allowed(capsys, in_tmp, monkeypatch):
    monkeypatch.setattr("edgetok.vit.patch.apply_transform", _scatter_merge)
    args = ["export", "vit", TINY, "--img-size", "64", "--method", "tome", "--r", "4", "-o", "s.onnx"]
    code, out, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "ScatterElements", "--allow-unsupported-ops")
    assert files_written(in_tmp) == []
    code, out, err = run_cli(capsys, *args, "--allow-unsupported-ops")
    assert code == 0, err
    side = json.loads(Path("s.edgetok.json").read_text())
    # 17 tokens: r=4 merges in blocks 0-4 (17→13→9→5→3→2), two scatters each
    assert len(side["lint"]["unsupported_ops"]) == 10 and side["validation"]["passed"]


def test_recipe_with_unknown_key(capsys, in_tmp):
    Path("r.yaml").write_text("export:\n  model: deit_tiny_patch16_224\n  ratio: 3\n")
    code, out, err = run_cli(capsys, "export", "--recipe", "r.yaml")
    assert_one_line_error(code, err, "export.ratio")


@pytest.mark.slow
def test_default_export_through_the_console_script(in_tmp):
    """The README's main job: `edgetok export` with no arguments, as a real process."""
    exe = Path(sys.executable).with_name("edgetok")
    proc = subprocess.run([str(exe), "export"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert files_written(in_tmp) == ["edgetok-out/digits_vit_tome_r8.edgetok.json",
                                     "edgetok-out/digits_vit_tome_r8.onnx"]
    assert "FLOPs speedup bound 1.66x" in proc.stdout and "digits_vit/model.safetensors" in proc.stdout


def test_pair_summary_counts_layers_in_english():
    from edgetok.llm.pair import summary

    def entry(layers):
        return {"source": "m", "model_type": "llama", "num_hidden_layers": layers, "hidden_size": 8, "weights": "random",
                "validation": {"max_abs_diff": {"prefill": 1e-7}}}

    text = summary({"path": "p", "target": entry(6), "draft": entry(1), "tokenizer": None, "vocab_size": 9,
                    "max_length": 16})
    assert "(llama, 6 layers," in text and "(llama, 1 layer," in text


# What a new user hits on a fresh clone ------------------------------------------------------------------

REFUSE_IN_A_CHILD = """
import sys
import edgetok.cli
edgetok.cli._gpu_problem = lambda: "no NVIDIA driver here (libcuda.so.1 is not found)"  # as on a GPU-less machine
code = edgetok.cli.main(sys.argv[1:])
print("torch imported" if "torch" in sys.modules else "torch not imported")
sys.exit(code)
"""

EARLY_REFUSALS = {
    "keep_rate": (["export", "vit", TINY, "--method", "evit", "--keep-rate", "1.5"], ["--keep-rate 1.5", "(0, 1]"]),
    "batch": (["export", "vit", TINY, "--batch", "65"], ["--batch 65", "1..64"]),
    "gtp_sparsity": (["export", "vit", TINY, "--method", "gtp", "--propagate", "4", "--sparsity", "1.5"],
                     ["--sparsity 1.5", "(0, 1]"]),
    "checkpoint": (["export", "vit", TINY, "--checkpoint", "nope.pth"], ["--checkpoint nope.pth does not exist"]),
    "export_recipe": (["export", "--recipe", "nope"], ["'nope' is not a built-in recipe"]),
    "build_recipe": (["build-engine", "--recipe", "nope"], ["'nope' is not a built-in recipe"]),
    "profile_recipe": (["profile", "--recipe", "nope"], ["'nope' is not a built-in recipe"]),
    "dtome_recipe_calibration": (["export", "--recipe", "digits_dtome"],
                                 ["export --calibrate edgetok-out/digits-train", "does not exist",
                                  "`edgetok data digits --split train`"]),
    "dtome_calibration_elsewhere": (["export", "vit", "edgetok_digits_vit", "--method", "dtome", "--r", "8",
                                     "--calibrate", "cal/digits-train"],
                                    ["`edgetok data digits --split train -o cal/digits-train`"]),
    "quantize_recipe_calibration": (["build-engine", "--recipe", "digits_tome_int8"],
                                    ["quantize --calibrate edgetok-out/digits-train", "--split train"]),
    "quantize_missing_model": (["quantize", "missing.onnx", "--calibrate", "cal"], ["missing.onnx does not exist"]),
    "eval_checkpoint": (["eval", TINY, "--data", "cal", "--checkpoint", "nope.pth"], ["--checkpoint nope.pth"]),
    "compare_checkpoint": (["compare", TINY, "--data", "cal", "--checkpoint", "nope.pth"], ["--checkpoint nope.pth"]),
    "torch_on_cuda_without_driver": (["profile", TINY, "--backend", "torch", "--device", "cuda"],
                                     ["--device cuda: no NVIDIA driver here", "--device cpu"]),
    "cuda_graphs_on_cpu": (["profile", TINY, "--backend", "torch", "--cuda-graphs"], ["--cuda-graphs", "--device cpu"]),
    "cuda_graphs_in_onnxruntime": (["profile", "m.onnx", "--device", "cuda", "--cuda-graphs"],
                                   ["--cuda-graphs", "ONNX Runtime"]),
    "pair_fp16": (["build-engine", "pair", "--precision", "fp16"], ["--precision fp16", "fp32 engines only"]),
}


@pytest.mark.parametrize("case", EARLY_REFUSALS, ids=list(EARLY_REFUSALS))
def test_model_free_refusals_come_before_torch_and_any_model(in_tmp, case):
    """Bad options and paths are refused before torch is imported (so before any model can load): one line,
    in a second rather than the 12-20 s of loading one. Run as a real process, whose modules are its own."""
    args, needles = EARLY_REFUSALS[case]
    Path("cal/0").mkdir(parents=True)  # an image folder, so that only the bad value is wrong
    Path("pair").mkdir()
    Path("pair/edgetok_pair.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-c", REFUSE_IN_A_CHILD, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert_one_line_error(proc.returncode, proc.stderr, *needles)
    assert proc.stdout.strip().splitlines()[-1] == "torch not imported", proc.stdout
    assert not Path("edgetok-out").exists()


def test_early_export_checks_use_the_exporters_limits():
    from edgetok.cli import MAX_EXPORT_BATCH
    from edgetok.vit.export import MAX_EXPORT_BATCH as exporter

    assert MAX_EXPORT_BATCH == exporter


def test_gpu_probe_asks_the_driver(monkeypatch):
    """No driver library, a driver that fails to initialise, one that sees no GPU, and one that sees a GPU."""
    import ctypes

    from edgetok.cli import _gpu_problem

    class Driver:
        def __init__(self, init, count):
            self.init, self.count = init, count

        def cuInit(self, flags):
            return self.init

        def cuDeviceGetCount(self, ref):
            ref._obj.value = self.count
            return 0

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert _gpu_problem() == "no NVIDIA driver here (libcuda.so.1 is not found)"
    for driver, expected in [(Driver(100, 0), "the NVIDIA driver sees no GPU (CUDA error 100)"),
                             (Driver(0, 0), "the NVIDIA driver sees no GPU"), (Driver(0, 1), None)]:
        monkeypatch.setattr(ctypes, "CDLL", lambda name, d=driver: d)
        assert _gpu_problem() == expected


@pytest.fixture(scope="module")
def target_alone(tmp_path_factory):
    """A tiny random Llama exported with --draft none (target and tree variant only)."""
    import shutil

    from transformers import LlamaConfig

    from edgetok.llm.pair import export_pair

    root = tmp_path_factory.mktemp("alone")
    LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(root / "t")
    shipped = Path(__file__).parents[1] / "edgetok" / "assets" / "spec_pair" / "target"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shipped / name, root / "t" / name)
    export_pair(str(root / "t"), "none", str(root / "alone"))
    return root / "alone"


@pytest.mark.slow
def test_generate_defaults_to_lookahead_without_a_draft(capsys, target_alone):
    args = ["generate", str(target_alone), "--prompt-ids", "5,17,3,5,17", "--max-new-tokens", "12", "--json"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "--mode lookahead: " in err and "has no draft model" in err
    chosen = json.loads(out)
    code, out, err = run_cli(capsys, *args, "--mode", "target")
    assert code == 0, err
    assert chosen["mode"] == "lookahead" and chosen["tokens"] == json.loads(out)["tokens"]  # lossless, as always


@pytest.mark.slow
def test_fp16_conversion_refusal_is_whole_and_names_the_users_file(target_alone):
    """The decoders' fp16 conversion is a graph ONNX Runtime will not load: the refusal names the user's ONNX
    and ONNX Runtime's whole complaint, not the staging folder the converted file was in."""
    pytest.importorskip("tensorrt_rtx")
    from edgetok.engine.build import build_engine
    from edgetok.engine.options import BuildOptions
    from edgetok.errors import EdgetokError
    from edgetok.llm.engines import decoder_shapes
    from edgetok.llm.pair import read_manifest

    manifest = read_manifest(str(target_alone))
    onnx_path = str(target_alone / "target" / "model.onnx")
    opts = BuildOptions(onnx=onnx_path, backend="tensorrt-rtx", precision="fp16", output="e/t.engine",
                        shapes=decoder_shapes(manifest["target"], manifest["max_length"], 2, (1, 1, 1)))
    with pytest.raises(EdgetokError) as caught:
        build_engine(opts)
    message = str(caught.value)
    assert message.startswith(f"the fp16 conversion of {onnx_path} is a graph ONNX Runtime will not load (")
    assert message.endswith("); build it with --precision fp32") and "\n" not in message
    assert ".tmp" not in message and "/work/" not in message and "Load model from" not in message
    assert "does not match expected type" in message  # ONNX Runtime's sentence, to its end
    assert not Path("e").exists()


def _relu_onnx(path: Path, quantized: str | None) -> Path:
    """One Relu on a [batch, 4] input, with a sidecar that says what quantize made of it."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    path.with_suffix(".edgetok.json").write_text(json.dumps({"quantization": {"mode": quantized}} if quantized else {}))
    return path


@pytest.mark.parametrize("quantized, precision, name", [
    (None, "fp32", "m.tensorrt-rtx.fp32.engine"), ("int8", "fp32", "m.tensorrt-rtx.int8.engine"),
    ("fp8", "fp32", "m.tensorrt-rtx.fp8.engine"), ("int8", "fp16", "m.tensorrt-rtx.int8+fp16.engine")])
def test_engine_name_says_the_quantization(capsys, in_tmp, monkeypatch, quantized, precision, name):
    """A Q/DQ model's engine is named by its mode (as profile labels it), not .fp32.engine."""
    pytest.importorskip("tensorrt_rtx")
    from edgetok.errors import EdgetokError

    def stop(request, workdir, say):  # where the builder would write: enough, no build needed
        raise EdgetokError(f"would build {Path(request['engine']).name}")

    monkeypatch.setattr("edgetok.engine.build._run_worker", stop)
    monkeypatch.setattr("edgetok.onnx.fp16.compare_precisions", lambda *a: {"cosine": 1.0, "max_abs_diff": 0.0})
    _relu_onnx(in_tmp / "m.onnx", quantized)
    code, out, err = run_cli(capsys, "build-engine", "m.onnx", "--backend", "tensorrt-rtx", "--batch", "1",
                             "--precision", precision)
    assert_one_line_error(code, err, f"would build {name}")


def test_build_summary_lists_targets_as_text():
    from edgetok.engine.build import summary

    report = {"path": "m.engine", "engine": {"bytes": 2e6}, "backend": {"name": "tensorrt-rtx", "version": "1.7"},
              "precision": "fp32", "strongly_typed": True, "build_seconds": 1.0, "network_layers": {"count": 3},
              "profiles": [[{"name": "x", "min": [1, 4], "opt": [1, 4], "max": [1, 4]}]], "fp16_conversion": None,
              "engine_layers": [], "targets": ["sm86", "sm89"]}
    assert "  targets    sm86, sm89" in summary(report).splitlines()
    report["targets"] = "default (SM 8.0, 8.6, 8.9, 12.0)"
    assert "  targets    default (SM 8.0, 8.6, 8.9, 12.0)" in summary(report).splitlines()


def test_plugin_cubins_from_the_cache_are_not_announced_as_compiled(monkeypatch, tmp_path):
    from edgetok.engine import build
    from edgetok.plugins import cubins

    said, compiled = [], []
    monkeypatch.setattr(cubins, "write_bundle", lambda path, archs, say: compiled.append(list(archs)))
    monkeypatch.setattr(cubins, "cached_archs", lambda: ["sm87", "sm89"])
    build._stage_bundle({"archs": ["sm87", "sm89"]}, tmp_path / "m.onnx", tmp_path / "b.cubins.zip", said.append)
    assert said == ["plugin cubins for sm87, sm89 from the cache"]
    said.clear()
    build._stage_bundle({"archs": ["sm87", "sm110"]}, tmp_path / "m.onnx", tmp_path / "b.cubins.zip", said.append)
    assert said == ["compiling the plugin kernels for sm110 (sm87 from the cache)"]
    assert compiled == [["sm87", "sm89"], ["sm87", "sm110"]]  # the bundle is written either way


def test_plugins_build_without_output_says_no_bundle_was_written(capsys, monkeypatch, tmp_path):
    from edgetok.plugins import cubins

    manifest = {"triton": "3", "format": 1, "ptx_version": "8.7", "kernels": {},
                "archs": {"sm87": {"target": "cuda:87", "ptx_version": "8.7"}}}
    (tmp_path / cubins.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(cubins, "build", lambda archs, say: tmp_path)
    code, out, err = run_cli(capsys, "plugins", "build", "--arch", "sm87")
    assert code == 0, err
    assert f"cubins in the cache {tmp_path}; no bundle written: -o NAME.cubins.zip writes one" in err


def test_plugins_check_summary_has_aligned_columns_in_english():
    from edgetok.plugins.check import KernelResult, summary

    results = [KernelResult("TokenPrune", "prune_scan", "B=1", 1e-7, False, True),
               KernelResult("TokenPrune", "prune_count", "B=1", 1.0, True, False),
               KernelResult("TokenPrune", "prune_count", "B=2", 0.0, True, True),
               KernelResult("TokenPrune", "prune_gather", "B=2", 0.0, True, True)]
    rows = [line for line in summary(results).splitlines() if line.startswith("  prune_")]
    assert [r.split()[0] for r in rows] == ["prune_scan", "prune_count", "prune_gather"]
    assert "1 mismatched index " in rows[1] and "over 2 runs" in rows[1] and "over 1 run " in rows[0]

    def measure_column(row):
        after = row[2 + len(row.split()[0]):]
        return len(row) - len(after.lstrip())

    # every column starts at the same place in every row
    assert len({measure_column(r) for r in rows}) == 1
    assert len({r.index(" over ") for r in rows}) == 1 and len({r.index("(worst") for r in rows}) == 1


def test_recipe_file_is_named_once(capsys, in_tmp):
    Path("r.yaml").write_text("export:\n  model: deit_tiny_patch16_224\n  keep_rate: 3\n  method: evit\n")
    code, out, err = run_cli(capsys, "export", "--recipe", "r.yaml")
    assert_one_line_error(code, err, "recipe r.yaml: export --keep-rate 3 is out of range")
    assert err.splitlines()[0] == "· recipe r.yaml"
