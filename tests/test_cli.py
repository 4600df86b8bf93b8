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
