"""The reference VLM (edgetok/assets/digits_vlm) and VLM eval: the shipped folder is a LLaVA transformers loads,
its held-out accuracy is what its training record says (recomputed here in PyTorch), its vision tower started as
the digits ViT (the conversion is exact), `data digits-vlm` writes what `eval` reads, eval of an export answers as
PyTorch does, and bad --data is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_assertions import assert_one_line_error, run_cli
from edgetok.cli import main
from edgetok.vlm import digits
from edgetok.vlm.evaluate import FIRST, read_data, score, torch_answers

ASSET = str(digits.ASSET)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """`edgetok data digits-vlm` (held-out split), through the command line."""
    out = tmp_path_factory.mktemp("vlm-data") / "heldout"
    assert main(["data", "digits-vlm", "-o", str(out)]) == 0
    return out


def _first(folder: Path, n: int, dst: Path) -> Path:
    """A copy of a data folder's questions file holding its first n questions (the images are linked, not
    copied): what eval reads, made smaller."""
    dst.mkdir()
    (dst / "images").symlink_to(folder / "images", target_is_directory=True)
    lines = (folder / "questions.jsonl").read_text().splitlines(keepends=True)[:n]
    (dst / "questions.jsonl").write_text("".join(lines))
    return dst


def test_shipped_folder_is_a_llava_whose_first_heldout_answers_score_as_recorded(heldout):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ASSET, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.vision_feature_select_strategy == "default"
    processor = AutoProcessor.from_pretrained(ASSET)
    assert (processor(text=digits.prompt("sum-top-row"), return_tensors="pt", images=np.zeros((32, 32, 3), np.uint8))
            ["input_ids"] == model.config.image_token_id).sum() == 64  # 8x8 patches, CLS dropped
    record = json.loads((digits.ASSET / "TRAINING.json").read_text())
    rows = read_data(str(heldout))[:FIRST]
    accuracy = score(rows, torch_answers(ASSET, heldout, rows))
    assert accuracy == record[f"heldout_accuracy_first_{FIRST}"]
    assert accuracy > 0.5  # trained: chance is about 1 in 10 (a digit) to 1 in 19 (a sum)


def test_converted_tower_starts_as_the_digits_vit():
    """The CLIP tower at the start of training computes the timm ViT's blocks (patch bias folded into the
    position embeddings); only pre_layrnorm, which timm lacks, is new: bypassed here."""
    import timm

    from edgetok.vit import digits as vit_digits

    model = digits.initial_model(digits.tokenizer()).eval()
    tower = model.model.vision_tower
    norm = tower.vision_model.pre_layrnorm if hasattr(tower, "vision_model") else tower.pre_layrnorm
    assert torch.equal(norm.weight, torch.ones(96)) and torch.equal(norm.bias, torch.zeros(96))
    if hasattr(tower, "vision_model"):
        tower.vision_model.pre_layrnorm = torch.nn.Identity()
    else:
        tower.pre_layrnorm = torch.nn.Identity()
    vit = timm.create_model(vit_digits.NAME, checkpoint_path=str(vit_digits.WEIGHTS)).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tower(x, output_hidden_states=True).hidden_states
        tokens = vit._pos_embed(vit.patch_embed(x))
        torch.testing.assert_close(hidden[0], tokens, rtol=0, atol=1e-6)
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            torch.testing.assert_close(hidden[i + 1], tokens, rtol=0, atol=1e-4)
    assert len(hidden) == len(vit.blocks) + 1


def test_data_digits_vlm_writes_grids_and_questions_of_its_split(heldout, capsys, tmp_path):
    from PIL import Image

    from edgetok.images import walk
    from edgetok.vit.digits import split_indices

    cells, labels = digits.digit_cells()
    train, held = split_indices(len(labels))
    rows = read_data(str(heldout))
    grids = sorted({r["image"] for r in rows})
    assert len(rows) == len(grids) * len(digits.QUESTIONS) and len(grids) == len(held) // 4
    used = [i for r in rows[:: len(digits.QUESTIONS)] for i in r["digits"]]
    assert len(set(used)) == len(used) and set(used) <= set(held.tolist())  # held-out digits, each once
    for row in rows[:16]:
        image = np.asarray(Image.open(heldout / row["image"]))
        assert image.shape == (32, 32, 3)
        assert np.array_equal(image[..., 0], digits.grid_pixels(cells[row["digits"]]))
        assert row["answer"] == str(sum(labels[row["digits"][c]] for c in digits.QUESTIONS[row["question"]]))
        assert row["prompt"] == f"<image> {row['question']}"
    found = walk(heldout, "--calibrate")  # the same folder is an ImageFolder: dtome's --calibrate
    assert found.classes == ["images"] and len(found.samples) == len(grids)

    code, out, err = run_cli(capsys, "data", "digits-vlm", "--split", "train", "-o", str(tmp_path / "train"))
    assert code == 0, err
    trained = {i for r in read_data(str(tmp_path / "train")) for i in r["digits"]}
    assert trained <= set(train.tolist()) and not trained & set(held.tolist())

    code, out, err = run_cli(capsys, "data", "digits-vlm", "-o", str(tmp_path / "train"))
    assert_one_line_error(code, err, "not empty")


def test_eval_of_the_shipped_folder_reads_what_data_wrote(heldout, capsys, tmp_path):
    small = _first(heldout, FIRST, tmp_path / "first")
    code, out, err = run_cli(capsys, "eval", ASSET, "--data", str(small), "--json")
    assert code == 0, err
    result = json.loads(out)
    record = json.loads((digits.ASSET / "TRAINING.json").read_text())
    assert result["accuracy"] == record[f"heldout_accuracy_first_{FIRST}"]
    assert result["questions"] == FIRST and result["images"] == FIRST // len(digits.QUESTIONS)
    assert result["visual_tokens"] == {"mean": 64, "min": 64, "max": 64} and result["backend"] == "torch"
    assert set(result["by_question"]) == set(digits.QUESTIONS)


def test_eval_of_an_export_answers_as_pytorch_does(heldout, capsys, tmp_path):
    pytest.importorskip("edgetok.vlm.runtime")
    from edgetok.vlm.evaluate import export_answers

    export = tmp_path / "export"
    code, out, err = run_cli(capsys, "export", "vlm", ASSET, "-o", str(export))
    assert code == 0, err
    rows = read_data(str(heldout))[:32]
    counts = []
    assert export_answers(str(export), heldout, rows, counts=counts) == torch_answers(ASSET, heldout, rows)
    assert counts == [64] * len(rows)
    small = _first(heldout, 32, tmp_path / "first")
    code, out, err = run_cli(capsys, "eval", str(export), "--data", str(small), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["backend"] == "onnxruntime" and result["questions"] == 32
    assert result["accuracy"] == score(rows, torch_answers(ASSET, heldout, rows))


@pytest.mark.parametrize("case", ["missing", "no-questions", "not-json", "no-answer", "image-outside", "reference"])
def test_bad_vlm_eval_input_is_one_line(case, heldout, capsys, tmp_path):
    data = tmp_path / "data"
    args = []
    if case != "missing":
        data.mkdir()
    if case in ("not-json", "no-answer", "image-outside", "reference"):
        (data / "images").mkdir()
        from PIL import Image

        Image.new("RGB", (32, 32)).save(data / "images" / "0.png")
        line = {"not-json": "{oops", "no-answer": json.dumps({"image": "images/0.png", "prompt": "<image> sum-top-row"}),
                "image-outside": json.dumps({"image": "../x.png", "prompt": "<image> sum-top-row", "answer": "1"}),
                "reference": json.dumps({"image": "images/0.png", "prompt": "<image> sum-top-row", "answer": "1"})}[case]
        (data / "questions.jsonl").write_text(line + "\n")
    if case == "reference":
        args = ["--reference", "x.onnx"]
    code, out, err = run_cli(capsys, "eval", ASSET, "--data", str(data), *args)
    needle = {"missing": "does not exist", "no-questions": "no questions.jsonl", "not-json": "line 1 is not JSON",
              "no-answer": "no string answer", "image-outside": "not a file inside", "reference": "--reference"}[case]
    assert_one_line_error(code, err, needle)
    assert out == ""
