"""`edgetok build-engine DIR` and `edgetok profile DIR --vlm` for a VLM folder from `export vlm`: real TensorRT-RTX
CPU builds of every graph (the vision towers, a dtome tower with its plugin, the embedding, the decoders) with the
profiles the manifest implies; the profile's dense and reduced rows are the pipeline's own generations (equal to
`generate` and to Hugging Face's) and its KV-cache bytes are the cache's; bad input is one line, nothing written."""

import json
import shutil
from pathlib import Path

import pytest
from cli_assertions import assert_one_line_error, run_cli
from vlm_fixtures import EOS, IMAGE_TOKEN, VOCAB, llava_folders, save_image, test_images  # noqa: F401  (fixtures)

from edgetok.vlm.export import MANIFEST, read_manifest

TOME_R = 3
PROMPT = [1, 7, 8, IMAGE_TOKEN, 9, 10, 11]
NEW = 8


@pytest.fixture(scope="module")
def folders(llava_folders, tmp_path_factory):  # noqa: F811
    """CLIP + Llama exported with ToMe r=3 (vision.onnx reduced, vision_dense.onnx beside it) and with dtome."""
    root = tmp_path_factory.mktemp("vlm_engines")
    model = str(llava_folders["clip-llama"])
    (root / "calibrate" / "any").mkdir(parents=True)
    for i in range(4):
        save_image(root / "calibrate" / "any" / f"{i}.png", seed=100 + i)
    from edgetok.cli import main

    assert main(["export", "vlm", model, "--method", "tome", "--r", str(TOME_R), "-o", str(root / "tome")]) == 0
    assert main(["export", "vlm", model, "--method", "dtome", "--r", "3", "--calibrate", str(root / "calibrate"),
                 "-o", str(root / "dtome")]) == 0
    return {"tome": root / "tome", "dtome": root / "dtome"}


def profile(capsys, folder, image, *extra) -> dict:
    code, out, err = run_cli(capsys, "profile", str(folder), "--vlm", "--image", str(image), "--prompt-ids",
                             ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW), "--iterations", "2",
                             "-o", str(Path(folder).parent / "profile"), "--report-json", "-", *extra)
    assert code == 0, err
    return json.loads(out)


def test_profile_rows_are_the_pipelines_generations_and_caches(capsys, folders, llava_folders, test_images):  # noqa: F811
    """Dense and reduced side by side: visual tokens as planned, tokens equal to `generate` (reduced tower) and to
    Hugging Face's greedy generation (dense tower), KV-cache bytes measured on the cache equal to
    2 · layers · KV heads · head size · 4 per cached token."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from edgetok.vlm.runtime import generate

    folder, image = folders["tome"], test_images[0]
    manifest = read_manifest(str(folder))
    report = profile(capsys, folder, image)
    assert report["kind"] == "vlm-profile" and set(report["towers"]) == {"dense", "reduced"}
    dense, reduced = report["towers"]["dense"], report["towers"]["reduced"]
    assert (dense["vision_file"], reduced["vision_file"]) == ("vision_dense.onnx", "vision.onnx")
    tokens = manifest["vision"]["tokens"]
    assert dense["visual_tokens"] == tokens["dense"] == 16
    assert reduced["visual_tokens"] == tokens["planned"] < 16
    d = manifest["decoder"]
    per_token = 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * 4
    for row in (dense, reduced):
        kv = row["kv_cache"]
        assert row["prompt_tokens"] == len(PROMPT) - 1 + row["visual_tokens"]
        assert row["new_tokens"] == NEW and len(row["tokens"]) == NEW and row["deterministic"]
        assert kv["bytes_per_token"] == per_token and kv["prompt_bytes"] == per_token * row["prompt_tokens"]
        assert kv["visual_bytes"] == per_token * row["visual_tokens"]
        assert kv["end_tokens"] == row["prompt_tokens"] + NEW - 1  # the last token generated is never fed
        assert kv["end_bytes"] == per_token * kv["end_tokens"]  # measured on the decoder's arrays
        for key in ("vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s"):
            assert row[key] > 0
        assert row["time_to_first_token_ms"] > row["prefill_ms"]
    ratio = reduced["vs_dense"]
    assert ratio["visual_tokens"] == reduced["visual_tokens"] / 16
    assert ratio["kv_cache_prompt"] == reduced["prompt_tokens"] / dense["prompt_tokens"]
    assert ratio["tokens_equal_dense"] == (dense["tokens"] == reduced["tokens"])
    # the reduced row is `generate`'s greedy run (which stops at EOS; the profile decodes on)
    want = generate(str(folder), str(image), prompt_ids=PROMPT, max_new_tokens=NEW, mode="target")
    assert want["visual_tokens"] == reduced["visual_tokens"]
    assert reduced["tokens"][:len(want["tokens"])] == want["tokens"]
    # the dense row is the unreduced model's: Hugging Face's greedy generation on the processor's pixels
    model = LlavaForConditionalGeneration.from_pretrained(llava_folders["clip-llama"], attn_implementation="eager")
    pixels = AutoImageProcessor.from_pretrained(llava_folders["clip-llama"])(
        images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    at = PROMPT.index(IMAGE_TOKEN)
    ids = torch.tensor([PROMPT[:at] + [IMAGE_TOKEN] * 16 + PROMPT[at + 1:]])
    with torch.no_grad():
        out = model.float().eval().generate(input_ids=ids, pixel_values=pixels, do_sample=False, max_new_tokens=NEW,
                                            eos_token_id=EOS, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert dense["tokens"][:len(out)] == out
    written = json.loads((folder.parent / "profile" / "vlm_profile.json").read_text())
    assert written["towers"]["dense"]["tokens"] == dense["tokens"]
    assert "| dense | 16 |" in (folder.parent / "profile" / "vlm_profile.md").read_text()


def test_profile_of_a_dtome_tower_counts_this_images_tokens(capsys, folders, test_images):  # noqa: F811
    from edgetok.vlm.runtime import generate

    folder = folders["dtome"]
    for image in test_images[:2]:
        report = profile(capsys, folder, image)
        reduced = report["towers"]["reduced"]
        assert report["method"]["data_dependent"] and report["towers"]["dense"]["visual_tokens"] == 16
        want = generate(str(folder), str(image), prompt_ids=PROMPT, max_new_tokens=NEW, mode="target")
        assert reduced["visual_tokens"] == want["visual_tokens"] <= 16
        assert reduced["kv_cache"]["end_bytes"] == reduced["kv_cache"]["bytes_per_token"] * (
            len(PROMPT) - 1 + want["visual_tokens"] + NEW - 1)


@pytest.mark.slow
def test_tensorrt_rtx_builds_every_graph_of_a_vlm_folder(capsys, folders, tmp_path, test_images):  # noqa: F811
    """build-engine DIR: both vision towers, the embedding, the decoder and its tree variant, with the profiles
    the manifest implies (inputs_embeds over the decoder's query range), recorded in the manifest, which still
    verifies; then the engines' refusals on a machine without a GPU, and a fp16 request refused whole."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install tensorrt-rtx) builds the engines")
    folder = tmp_path / "tome"
    shutil.copytree(folders["tome"], folder)
    code, out, err = run_cli(capsys, "build-engine", str(folder), "--backend", "tensorrt-rtx", "--tokens", "8")
    assert code == 0, err
    manifest = read_manifest(str(folder))  # fields and every exported file's SHA-256 still hold
    engines, length = manifest["engines"], manifest["max_length"]
    d = manifest["decoder"]
    assert engines["max_length"] == length == 256 and engines["batch"] == [1, 1, 1]
    assert set(engines) == {"max_length", "batch", "vision", "vision_dense", "embedding", "decoder", "decoder_tree"}
    assert "built 5 engines" in out
    profiles = {}
    for role, e in engines.items():
        if isinstance(e, dict):
            assert (folder / e["file"]).is_file() and e["backend"]["name"] == "tensorrt-rtx" and e["plugins"] == []
            profiles[role] = {p["name"]: p for p in e["profiles"][0]}
            report = json.loads((folder / (e["file"] + ".build.json")).read_text())
            assert report["source_onnx"]["sha256"] == manifest["files"][report["source_onnx"]["path"].split(
                str(folder.resolve()) + "/")[1]]
            outputs = {o["name"]: o["shape"] for o in report["network_outputs"]}
            if role.startswith("vision"):
                tokens = manifest["vision"]["tokens"]["dense" if role == "vision_dense" else "planned"]
                assert outputs["image_embeds"][1:] == [tokens, d["hidden_size"]]
            elif role == "embedding":
                assert outputs["inputs_embeds"] == [-1, -1, d["hidden_size"]]
            else:
                assert outputs["logits"] == [-1, -1, VOCAB]
    for role in ("vision", "vision_dense"):
        assert profiles[role]["pixel_values"]["min"] == profiles[role]["pixel_values"]["max"] == [1, 3, 32, 32]
    assert profiles["embedding"]["input_ids"] == {"name": "input_ids", "min": [1, 1], "opt": [1, 1],
                                                  "max": [1, length]}
    hidden = d["hidden_size"]
    for role, query_opt in (("decoder", 1), ("decoder_tree", 9)):
        embeds, key = profiles[role]["inputs_embeds"], profiles[role]["past_key_values.1.value"]
        assert (embeds["min"], embeds["opt"], embeds["max"]) == ([1, 1, hidden], [1, query_opt, hidden],
                                                                 [1, length, hidden])
        assert key["min"] == [1, d["num_key_value_heads"], 0, d["head_size"]]
        assert key["max"] == [1, d["num_key_value_heads"], length - 1, d["head_size"]]
        assert "input_ids" not in profiles[role]
    assert profiles["decoder"]["attention_mask"]["max"] == [1, length]
    assert profiles["decoder_tree"]["attention_mask"]["max"] == [1, 1, length, length]
    # fp16 and --k: refused before any work; the engines and their record stay as they were
    for extra, needles in ((["--precision", "fp16"], ["--precision fp16", "fp32 engines only"]),
                           (["--k", "3"], ["drop --k"])):
        code, _, err = run_cli(capsys, "build-engine", str(folder), "--backend", "tensorrt-rtx", *extra)
        assert_one_line_error(code, err, *needles)
        assert read_manifest(str(folder))["engines"] == engines
    import torch

    if not torch.cuda.is_available():  # the engines run on a CUDA GPU only: one line here
        code, _, err = run_cli(capsys, "profile", str(folder), "--vlm", "--image", str(test_images[0]), "--backend",
                               "tensorrt", "-o", str(tmp_path / "p"))
        assert_one_line_error(code, err, "no CUDA GPU")


@pytest.mark.slow
def test_tensorrt_rtx_builds_a_dtome_tower_with_its_plugin(capsys, folders, tmp_path):
    """A data-dependent tower (dtome's TokenPrune nodes): built with edgetok's plugin, its kernels beside the
    engine, the per-image count outputs reported, as `build-engine MODEL.onnx` builds a dtome ViT."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (pip install tensorrt-rtx) builds the engines")
    folder = tmp_path / "dtome"
    shutil.copytree(folders["dtome"], folder)
    code, out, err = run_cli(capsys, "build-engine", str(folder), "--backend", "tensorrt-rtx", "--target", "sm86")
    assert code == 0, err
    engines = read_manifest(str(folder))["engines"]
    assert engines["vision"]["plugins"] == ["TokenPrune"] and engines["vision_dense"]["plugins"] == []
    report = json.loads((folder / "vision.fp32.engine.build.json").read_text())
    assert (folder / report["edgetok_plugins"]["cubins"]["file"]).is_file()
    assert report["token_count_outputs"] and "plugins TokenPrune" in out
    outputs = {o["name"]: o["shape"] for o in report["network_outputs"]}
    assert outputs["visual_tokens"] == [-1] and outputs["image_embeds"][1] == -1  # the count follows the image


def test_bad_inputs_are_one_line_and_write_nothing(capsys, folders, tmp_path, test_images):  # noqa: F811
    folder, image = folders["tome"], str(test_images[0])
    before = sorted(p.name for p in folder.rglob("*"))
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "plain").mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["profile", str(tmp_path / "plain"), "--vlm", "--image", image], ["is not a VLM folder", "export vlm"]),
        (["profile", str(folder), "--vlm"], ["--vlm needs --image IMG"]),
        (["profile", str(folder), "--image", image], ["--image", "add --vlm"]),
        (["profile", str(folder)], ["is a VLM folder", "--vlm --image"]),
        (["profile", str(folder), "--vlm", "--image", str(tmp_path / "missing.png")], ["missing.png is not a file"]),
        (["profile", str(folder), "--vlm", "--image", str(tmp_path / "not-an-image.png")], ["not-an-image.png"]),
        (["profile", str(folder), "--vlm", "--image", image, "--max-new-tokens", "1000"],
         ["--max-new-tokens 1000", "max length 256"]),
        (["profile", str(folder), "--vlm", "--image", image, "--prompt-ids", "1,2,3"], ["no image token"]),
        (["profile", str(folder), "--vlm", "--image", image, "--pair"], ["drop --pair"]),
        (["profile", str(folder), "--vlm", "--image", image, "--backend", "tensorrt"],
         ["has no engines", "edgetok build-engine"]),
        (["profile", str(folder), "--vlm", "--image", image, "--backend", "torch"], ["--backend 'torch'"]),
        (["build-engine", str(folder), "--precision", "fp16"], ["fp32 engines only"]),
        (["build-engine", str(folder), "-o", str(tmp_path / "x.engine")], ["drop -o/--shapes"]),
        (["build-engine", str(folder), "--k", "3"], ["drop --k"]),
        (["build-engine", str(folder), "--tokens", "0"], ["--tokens 0 must be >= 1"]),
    ]
    for args, needles in cases:
        code, _, err = run_cli(capsys, *args, *(["-o", out] if args[0] == "profile" else []))
        assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in folder.rglob("*")) == before and not (tmp_path / "out").exists()
    assert not list((tmp_path / "plain").iterdir())
