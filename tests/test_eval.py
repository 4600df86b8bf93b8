"""`edgetok eval` and the reference ViT: real accuracy without downloads, agreement metrics, bad folders."""

import json
from pathlib import Path

import numpy as np
import pytest
from cli_assertions import assert_one_line_error, run_cli

from edgetok.vit import digits
from edgetok.workflows.evaluate import EvalOptions, agreement, evaluate
from edgetok.vit.export import ViTExportOptions, export_vit

RECORD = digits.training_record()
needs_weights = pytest.mark.skipif(RECORD is None, reason="tools/train_digits_vit.py has not been run")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    return str(digits.write_heldout_folder(tmp_path_factory.mktemp("digits") / "heldout")["path"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_onnx")
    variants = {"dense": dict(method="none"), "tome_r2": dict(method="tome", r=2),
                "evit_0.9": dict(method="evit", keep_rate=0.9)}
    return {name: export_vit(ViTExportOptions(model=digits.NAME, output=str(root / f"{name}.onnx"), **opts))["path"]
            for name, opts in variants.items()}


def test_heldout_folder_is_an_imagefolder_of_the_split(heldout):
    folders = sorted(p.name for p in Path(heldout).iterdir() if p.is_dir())
    assert folders == [str(d) for d in range(10)]
    _, held = digits.split_indices(1797)
    assert sum(1 for _ in Path(heldout).rglob("*.png")) == len(held) == 539


@pytest.mark.slow
@needs_weights
def test_dense_eval_reproduces_the_training_accuracy_exactly(heldout, exported):
    torch_result = evaluate(EvalOptions(model=digits.NAME, data=heldout, batch=37, write_sidecar=False))
    assert torch_result["top1"] == RECORD["heldout_top1"] and torch_result["samples"] == 539
    onnx_result = evaluate(EvalOptions(model=exported["dense"], data=heldout, batch=100))
    assert onnx_result["top1"] == RECORD["heldout_top1"]
    side = json.loads(Path(exported["dense"]).with_name("dense.edgetok.json").read_text())
    assert side["accuracy"]["top1"] == RECORD["heldout_top1"] and side["model"]["weights"].endswith("model.safetensors")
    assert RECORD["heldout_top1"] > 0.9


@pytest.mark.slow
@needs_weights
@pytest.mark.parametrize("variant", ["tome_r2", "evit_0.9"])
def test_mild_reduction_keeps_accuracy(heldout, exported, variant):
    result = evaluate(EvalOptions(model=exported[variant], data=heldout, reference=exported["dense"]))
    assert result["top1"] >= RECORD["heldout_top1"] - 0.02  # stated tolerance: 2 points
    assert result["reference"]["top1_agreement"] >= 0.95 and result["reference"]["mean_kl"] < 0.1


def test_agreement_on_a_hand_built_example():
    reference = np.array([[1.0, 0.0], [0.0, 0.0]])
    model = np.array([[2.0, 0.0], [np.log(3.0), 0.0]])
    got = agreement(model, reference)
    assert got["top1_agreement"] == 1.0  # argmax 0 vs 0, and 0 vs the tie's first index 0
    e = np.e
    p1 = np.array([e, 1]) / (e + 1)
    q1 = np.array([e * e, 1]) / (e * e + 1)
    kl1 = (p1 * np.log(p1 / q1)).sum()
    kl2 = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)  # p = (1/2, 1/2), q = (3/4, 1/4)
    assert got["mean_kl"] == pytest.approx((kl1 + kl2) / 2, abs=1e-12)
    assert agreement(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))["top1_agreement"] == 0.0


@pytest.mark.slow
def test_bad_folders(capsys, tmp_path, exported):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "bad.png").write_bytes(b"not a png")
    cases = [("empty", ["is empty", "ImageFolder"]), ("flat", ["no class subfolders"]),
             ("broken", ["cannot read image", "bad.png"]), ("missing", ["is not a folder"])]
    for folder, needles in cases:
        code, out, err = run_cli(capsys, "eval", exported["dense"], "--data", str(tmp_path / folder))
        assert_one_line_error(code, err, *needles)


@pytest.mark.slow
def test_eval_cli_and_data_command(capsys, tmp_path, exported):
    code, out, err = run_cli(capsys, "data", "digits", "-o", str(tmp_path / "d"))
    assert code == 0 and "539 images" in out
    code, out, err = run_cli(capsys, "eval", exported["tome_r2"], "--data", str(tmp_path / "d"), "--reference",
                             exported["dense"], "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == 539 and "top1_agreement" in result["reference"]
    code, out, err = run_cli(capsys, "data", "digits", "-o", str(tmp_path / "d"))
    assert_one_line_error(code, err, "not empty")


@pytest.mark.slow
def test_agreement_names_its_reference_and_a_byte_identical_reexport_keeps_the_accuracy(tmp_path, heldout, exported):
    """eval records which model agreement/KL is against (path and sha256); re-exporting the same bytes keeps
    the sidecar's accuracy, exporting different bytes to the same path drops it."""
    from edgetok.sidecar import file_sha256

    dense, tome = exported["dense"], str(tmp_path / "tome.onnx")
    export_vit(ViTExportOptions(model=digits.NAME, method="tome", r=2, output=tome))
    result = evaluate(EvalOptions(model=tome, data=heldout, reference=dense))
    assert result["reference"]["model"] == dense and result["reference"]["sha256"] == file_sha256(dense)
    side = Path(tome).with_name("tome.edgetok.json")
    assert json.loads(side.read_text())["accuracy"] == result

    said, evaluated = [], file_sha256(tome)
    export_vit(ViTExportOptions(model=digits.NAME, method="tome", r=2, output=tome), said.append)
    assert file_sha256(tome) == evaluated  # the export is deterministic: the same bytes again
    assert json.loads(side.read_text())["accuracy"] == result and any("byte-identical" in s for s in said)
    export_vit(ViTExportOptions(model=digits.NAME, method="tome", r=3, output=tome))
    assert "accuracy" not in json.loads(side.read_text())


@pytest.mark.slow
def test_dtome_calibration_reports_each_batch_on_stderr(capsys, tmp_path):
    """A line per batch for each of calibration's two passes (40 training digits in batches of 16: 16, 16, 8)."""
    from edgetok.vit.methods.dtome_torch import calibrate, make_dtome
    from edgetok.vit.loading import load_vit

    images, labels = digits.digit_images()
    train, _ = digits.split_indices(len(images))
    for i in train[:40]:
        (tmp_path / "train" / str(labels[i])).mkdir(parents=True, exist_ok=True)
        images[i].save(tmp_path / "train" / str(labels[i]) / f"{i}.png")
    vit = load_vit(digits.NAME)
    calibrate(vit, make_dtome(vit.depth, r=2), str(tmp_path / "train"), batch=16)
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("· dtome")] == [
        f"· dtome {what}: batch {i}/3 ({done}/40 images)"
        for what in ("calibrating thresholds", "measuring merges") for i, done in ((1, 16), (2, 32), (3, 40))]
