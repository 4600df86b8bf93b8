"""`edgetok export vlm` and `edgetok generate DIR --image`: greedy generation through the exported pipeline equals
Hugging Face's LlavaForConditionalGeneration.generate (dense, and with ToMe in the tower against the model patched
the same way); lookahead and prompt lookup equal target decoding; the export's pipeline check and the manifest's
field and SHA-256 checks can fail; every bad input is one line with nothing written."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from PIL import Image
from vlm_fixtures import EOS, IMAGE_TOKEN, llava_folders, save_image, test_images  # noqa: F401  (fixtures)

from edgetok.errors import EdgetokError
from edgetok.vlm.export import MANIFEST, check_pipeline, read_manifest

TOME_R = 3
# A prompt with a repeated phrase: prompt lookup and lookahead find n-grams to propose from the start.
PROMPT = [1, 7, 8, 9, 10, IMAGE_TOKEN, 7, 8, 9, 10, 7, 8, 9]


def ids_arg(ids):
    return ",".join(map(str, ids))


@pytest.fixture(scope="module")
def exported(llava_folders, tmp_path_factory):  # noqa: F811
    """Export folders, through the CLI: both families dense, and CLIP + Llama with ToMe r=3 in the tower."""
    root = tmp_path_factory.mktemp("vlm")
    return Exports(root, llava_folders)


class Exports(dict):
    """Each export made on first use, then shared by the module's tests."""

    PLANS = {"clip-llama": ("clip-llama", []), "siglip-qwen2": ("siglip-qwen2", []),
             "clip-llama-tome": ("clip-llama", ["--method", "tome", "--r", str(TOME_R)])}

    def __init__(self, root: Path, models: dict):
        super().__init__()
        self.root, self.models = root, models

    def __missing__(self, name: str) -> Path:
        family, extra = self.PLANS[name]
        with contextlib.redirect_stdout(io.StringIO()) as out:  # not into the output a test reads
            assert run_cli_plain("export", "vlm", str(self.models[family]), *extra, "-o", str(self.root / name)) == 0
        assert out.getvalue().startswith(f"wrote {self.root / name}")
        self[name] = self.root / name
        return self[name]


def run_cli_plain(*args):
    from edgetok.cli import main

    return main(list(args))


def hf_generate(model, image: Path, processor_folder: Path, visual_tokens: int, prompt=PROMPT, new=16) -> list[int]:
    """Hugging Face's greedy generation on the processor's pixels, the image token expanded to the visual count."""
    from transformers import AutoImageProcessor

    pixels = AutoImageProcessor.from_pretrained(processor_folder)(images=Image.open(image).convert("RGB"),
                                                                  return_tensors="pt")["pixel_values"]
    at = prompt.index(IMAGE_TOKEN)
    ids = torch.tensor([prompt[:at] + [IMAGE_TOKEN] * visual_tokens + prompt[at + 1:]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, do_sample=False, max_new_tokens=new,
                             eos_token_id=EOS, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def cli_generate(capsys, folder: Path, image: Path, mode: str = "target", prompt=PROMPT) -> dict:
    code, out, err = run_cli(capsys, "generate", str(folder), "--image", str(image), "--prompt-ids", ids_arg(prompt),
                             "--mode", mode, "--max-new-tokens", "16", "--json")
    assert code == 0, err
    return json.loads(out)


def load_hf(folder: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("family", ["clip-llama", "siglip-qwen2"])
def test_dense_generation_equals_hugging_face(capsys, exported, llava_folders, test_images, family):  # noqa: F811
    manifest = read_manifest(str(exported[family]))
    assert manifest["vision"]["tokens"] == {"dense": 16, "planned": 16, "min": 16, "max": 16}
    model = load_hf(llava_folders[family])
    for image in test_images[:2]:
        result = cli_generate(capsys, exported[family], image)
        assert result["visual_tokens"] == 16
        want = hf_generate(model, image, llava_folders[family], 16)
        assert len(want) == 16, want  # no EOS in these seeded models: all 16 tokens are compared
        assert result["tokens"] == want
        assert result["prompt_tokens"] == len(PROMPT) - 1 + 16


def test_tome_generation_equals_the_patched_model(capsys, exported, llava_folders, test_images):  # noqa: F811
    from edgetok.vlm.llava import load_llava, patched_llava, reduce_tower

    folder = exported["clip-llama-tome"]
    manifest = read_manifest(str(folder))
    _, plan = reduce_tower(load_llava(str(llava_folders["clip-llama"])), "tome", {"r": TOME_R})
    planned = plan.tokens[-1][1] - 1  # CLIP, "default" selection: the class token is dropped after the tower
    assert planned < 16 and manifest["vision"]["tokens"]["planned"] == planned
    assert manifest["vision"]["dense_file"] == "vision_dense.onnx"
    patched = patched_llava(str(llava_folders["clip-llama"]), "tome", r=TOME_R)
    for image in test_images[:2]:
        result = cli_generate(capsys, folder, image)
        assert result["visual_tokens"] == planned
        assert result["tokens"] == hf_generate(patched, image, llava_folders["clip-llama"], planned)
    # the dense model, given as many image tokens, is another model: the reduction is really in the tower
    assert result["tokens"] != hf_generate(load_hf(llava_folders["clip-llama"]), image, llava_folders["clip-llama"],
                                           16)


def test_dtome_counts_follow_the_image_and_equal_the_patched_model(capsys, llava_folders, tmp_path):  # noqa: F811
    from transformers import AutoImageProcessor

    from edgetok.vlm.llava import patched_llava

    model = llava_folders["clip-llama"]
    (tmp_path / "calibrate" / "any").mkdir(parents=True)
    for i in range(4):
        save_image(tmp_path / "calibrate" / "any" / f"{i}.png", seed=100 + i)
    images = [save_image(tmp_path / f"{i}.png", seed=i, size=(40 + 8 * i, 48 - 4 * i)) for i in range(3)]
    code, out, err = run_cli(capsys, "export", "vlm", str(model), "--method", "dtome", "--r", "3", "--calibrate",
                             str(tmp_path / "calibrate"), "-o", str(tmp_path / "dtome"))
    assert code == 0, err
    manifest = read_manifest(str(tmp_path / "dtome"))
    assert manifest["vision"]["data_dependent"]
    patched = patched_llava(str(model), "dtome", r=3, calibrate=str(tmp_path / "calibrate"))
    processor = AutoImageProcessor.from_pretrained(model)

    def count(image) -> int:
        pixels = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return patched.model.get_image_features(pixel_values=pixels).pooler_output[0].shape[0]

    # the manifest's min/max are the calibration images' own counts, as the patched model gives them
    calibration = [count(tmp_path / "calibrate" / "any" / f"{i}.png") for i in range(4)]
    tokens = manifest["vision"]["tokens"]
    assert (tokens["min"], tokens["max"], tokens["measured_on"]["count"]) == (min(calibration), max(calibration), 4)
    counts = []
    for image in images:
        result = cli_generate(capsys, tmp_path / "dtome", image)
        pixels = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            rows = patched.model.get_image_features(pixel_values=pixels).pooler_output[0]
        assert result["visual_tokens"] == rows.shape[0] < 16
        assert result["tokens"] == hf_generate(patched, image, model, result["visual_tokens"])
        counts.append(result["visual_tokens"])
    assert len(set(counts)) > 1, counts


@pytest.mark.parametrize("family", ["clip-llama", "siglip-qwen2", "clip-llama-tome"])
def test_draft_free_modes_equal_target(capsys, exported, test_images, family):  # noqa: F811
    target = cli_generate(capsys, exported[family], test_images[2])
    for mode in ("lookahead", "prompt-lookup"):
        result = cli_generate(capsys, exported[family], test_images[2], mode)
        assert result["tokens"] == target["tokens"], mode
        assert result["visual_tokens"] == target["visual_tokens"]
        assert result["proposed"] > 0


def test_text_prompt_through_the_copied_tokenizer(capsys, llava_folders, test_images, tmp_path):  # noqa: F811
    """A folder with a tokenizer: it is copied into the export, --prompt text (with <image>) tokenizes to the ids
    that --prompt-ids gives, and the answer is decoded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "with-tokenizer"
    shutil.copytree(llava_folders["siglip-qwen2"], model)
    words = {"<pad>": 0, "<s>": 1, "</s>": EOS, **{f"w{i}": i for i in range(3, IMAGE_TOKEN)}, "<image>": IMAGE_TOKEN}
    table = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    table.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=table, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            additional_special_tokens=["<image>"]).save_pretrained(model)
    code, out, err = run_cli(capsys, "export", "vlm", str(model), "-o", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    code, out, err = run_cli(capsys, "generate", str(tmp_path / "out"), "--image", str(test_images[0]), "--prompt",
                             "w7 w8 <image> w9 w10", "--mode", "target", "--max-new-tokens", "16", "--json")
    assert code == 0, err
    text = json.loads(out)
    assert text["prompt_ids"] == [7, 8, IMAGE_TOKEN, 9, 10]
    ids = cli_generate(capsys, tmp_path / "out", test_images[0], prompt=[7, 8, IMAGE_TOKEN, 9, 10])
    names = {i: w for w, i in words.items()}
    assert text["tokens"] == ids["tokens"] and text["text"].split() == [names[t] for t in ids["tokens"]]


def test_export_records_pipeline_validation_that_can_fail(exported, llava_folders):  # noqa: F811
    from edgetok.vlm.preprocess import image_processor

    folder = exported["clip-llama"]
    manifest = read_manifest(str(folder))
    val = manifest["validation"]
    assert val["passed"] and val["max_abs_diff"] <= val["tolerance"] == 1e-3 and val["reference"] == "PyTorch model"
    assert read_manifest(str(exported["clip-llama-tome"]))["validation"]["reference"] == "patched PyTorch model"
    processor = image_processor(str(llava_folders["clip-llama"]))
    again = check_pipeline(folder, manifest, load_hf(llava_folders["clip-llama"]), processor)
    assert again["max_abs_diff"] == val["max_abs_diff"]
    # the reduced export checked against the dense model (a different model) is refused
    with pytest.raises(EdgetokError, match="gives 10 visual tokens but PyTorch another count"):
        check_pipeline(exported["clip-llama-tome"], read_manifest(str(exported["clip-llama-tome"])),
                       load_hf(llava_folders["clip-llama"]), processor)
    # and the dense export against a model whose projector differs
    other = load_hf(llava_folders["clip-llama"])
    with torch.no_grad():
        other.model.multi_modal_projector.linear_2.bias.add_(0.5)
    with pytest.raises(EdgetokError, match="differ"):
        check_pipeline(folder, manifest, other, processor)


def _copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def test_tampered_manifest_or_file_is_one_line(capsys, exported, test_images, tmp_path):  # noqa: F811
    copy = _copy(exported["clip-llama"], tmp_path)
    data = json.loads((copy / MANIFEST).read_text())
    for field, value, needle in [("decoder.num_hidden_layers", "2", "decoder.num_hidden_layers"),
                                 ("vision.tower", "vit", "vision.tower"),
                                 ("image_token_id", 96, "image_token_id"),
                                 ("decoder.file", "../outside.onnx", "outside"),
                                 ("max_length", 10, "max_length")]:
        edited = json.loads(json.dumps(data))
        where, key = edited, field.split(".")
        for part in key[:-1]:
            where = where[part]
        where[key[-1]] = value
        (copy / MANIFEST).write_text(json.dumps(edited))
        code, out, err = run_cli(capsys, "generate", str(copy), "--image", str(test_images[0]), "--prompt-ids",
                                 ids_arg(PROMPT), "--mode", "target")
        assert_one_line_error(code, err, needle)
    (copy / MANIFEST).write_text(json.dumps(data))
    with open(copy / "decoder" / "tree.onnx", "ab") as f:
        f.write(b"\0")
    code, out, err = run_cli(capsys, "generate", str(copy), "--image", str(test_images[0]), "--prompt-ids",
                             ids_arg(PROMPT))
    assert_one_line_error(code, err, "tree.onnx", "SHA-256")


def test_generate_bad_input_is_one_line(capsys, exported, test_images, tmp_path):  # noqa: F811
    folder = str(exported["clip-llama"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    cases = [
        (["--image", str(broken), "--prompt-ids", ids_arg(PROMPT)], "broken.png"),
        (["--image", str(test_images[0]), "--prompt-ids", "1,2,3"], f"no image token (id {IMAGE_TOKEN})"),
        (["--image", str(test_images[0]), "--prompt-ids", f"1,{IMAGE_TOKEN},2,{IMAGE_TOKEN}"], "2 separate"),
        (["--prompt-ids", ids_arg(PROMPT)], "--image"),
        (["--image", str(test_images[0]), "--prompt-ids", ids_arg(PROMPT), "--mode", "speculative"], "speculative"),
        (["--image", str(test_images[0]), "--prompt-ids", ids_arg(PROMPT), "--max-new-tokens", "250"], "max length"),
        (["--image", str(test_images[0]), "--prompt", "hello"], "no tokenizer"),
    ]
    for args, needle in cases:
        code, out, err = run_cli(capsys, "generate", folder, *args)
        assert_one_line_error(code, err, needle)
    code, out, err = run_cli(capsys, "generate", str(tmp_path), "--image", str(test_images[0]), "--prompt-ids", "1")
    assert_one_line_error(code, err, "needs a VLM folder")


def test_export_bad_input_is_one_line_nothing_written(capsys, llava_folders, tmp_path):  # noqa: F811
    from transformers import LlamaConfig

    llama = tmp_path / "llama"
    LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4).save_pretrained(llama)
    full = tmp_path / "full"
    (full / "keep.txt").parent.mkdir()
    (full / "keep.txt").write_text("mine")
    model = str(llava_folders["clip-llama"])
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        ([str(llama), "-o", str(tmp_path / "a")], "LlavaForConditionalGeneration"),
        ([model, "--max-length", "12", "-o", str(tmp_path / "b")], "--max-length 12", "16 visual tokens"),
        ([model, "--max-length", "16", "-o", str(tmp_path / "b")], "--max-length 16", "16 visual tokens"),
        ([model, "--method", "tome", "--r", "3", "--max-length", "5", "-o", str(tmp_path / "b")], "--max-length 5"),
        ([model, "-o", str(full)], "not empty"),
        ([model, "--method", "tome", "--keep-rate", "0.5", "-o", str(tmp_path / "c")], "--keep-rate"),
        ([model, "--method", "dtome", "-o", str(tmp_path / "d")], "--calibrate"),
        ([str(tmp_path / "missing"), "-o", str(tmp_path / "e")], "missing"),
    ]
    for args, *needles in cases:
        code, out, err = run_cli(capsys, "export", "vlm", *args)
        assert_one_line_error(code, err, *needles)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
