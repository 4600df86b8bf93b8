"""The vision side of `edgetok export vlm` (edgetok/vlm/llava.py, preprocess.py, vision.py) on tiny random LLaVA
folders (tests/vlm_fixtures.py): the tower as LLaVA's own get_image_features computes it, reduced by the methods
of the registry (the patched PyTorch model is the reference), exported to ONNX and checked in ONNX Runtime, and
the model's own image processor.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from vlm_fixtures import IMAGE_SIZE, PATCH_SIZE, llava_folders, save_image, save_llava, test_images  # noqa: F401

from edgetok.errors import EdgetokError
from edgetok.vlm.llava import load_llava, patched_llava, reduce_tower, tower_vit
from edgetok.vlm.preprocess import image_processor, pixel_values
from edgetok.vlm.vision import export_vision

GRID = (IMAGE_SIZE // PATCH_SIZE) ** 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory, llava_folders) -> dict[str, str]:  # noqa: F811
    """The fixture's folders (CLIP layer -2 "default", SigLIP layer -2 "full") plus SigLIP at the last layer
    (-1, as LLaVA checkpoints with a SigLIP tower take it), SigLIP with "default" selection (transformers drops
    its first row, a patch), CLIP at a non-negative feature layer and at two feature layers."""
    root = tmp_path_factory.mktemp("vis-llava")
    return {"clip": str(llava_folders["clip-llama"]), "siglip": str(llava_folders["siglip-qwen2"]),
            "siglip-last": str(save_llava(root / "siglip-last", "siglip-qwen2", vision_feature_layer=-1, seed=1)),
            "siglip-default": str(save_llava(root / "siglip-default", "siglip-qwen2", seed=4,
                                             vision_feature_select_strategy="default")),
            "clip-layer1": str(save_llava(root / "clip-layer1", "clip-llama", vision_feature_layer=1, seed=2)),
            "clip-layers": str(save_llava(root / "clip-layers", "clip-llama", vision_feature_layer=[-2, -3], seed=3))}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> str:
    """An image folder (one class) for dtome's thresholds, apart from the images the checks run on."""
    root = tmp_path_factory.mktemp("vis-calibrate")
    (root / "any").mkdir()
    for i in range(6):
        save_image(root / "any" / f"{i}.png", seed=10 + i, size=(40 + 4 * i, 36))
    return str(root)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("vis-images")
    return [str(save_image(root / f"{i}.png", seed=100 + i, size=(48, 40 + 8 * i))) for i in range(4)]


def _features(model, pixels: torch.Tensor) -> torch.Tensor:
    """LLaVA's own visual tokens (get_image_features' pooler_output: one [N, H_text] per image), stacked."""
    with torch.no_grad():
        return torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output))


def _pixels(folder: str, paths: list[str]) -> torch.Tensor:
    processor = image_processor(folder)
    return torch.from_numpy(np.concatenate([pixel_values(processor, p) for p in paths]))


# -- check_folder: one line each, before torch ----------------------------------------------------------------------

CHECK_IN_A_CHILD = """
import json, sys
from edgetok.errors import EdgetokError
from edgetok.vlm.llava import check_folder
out = []
for folder, method in json.loads(sys.argv[1]):
    try:
        out.append(["ok", check_folder(folder, method)])
    except EdgetokError as exc:
        out.append(["refused", str(exc)])
print(json.dumps({"results": out, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def _config(folder, **config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_check_folder_refuses_in_one_line_before_torch(tmp_path):
    llava = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
             "vision_config": {"model_type": "clip_vision_model", "num_hidden_layers": 3}}
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing"), "none"], "is not a folder"),
        ([str(tmp_path / "empty"), "none"], "has no config.json"),
        ([_config(tmp_path / "llama", architectures=["LlamaForCausalLM"], model_type="llama"), "none"],
         "holds a LlamaForCausalLM, not a LlavaForConditionalGeneration"),
        ([_config(tmp_path / "pixtral", **{**llava, "vision_config": {"model_type": "pixtral"}}), "none"],
         "the vision tower is a 'pixtral'"),
        ([_config(tmp_path / "layers", **llava, vision_feature_layer=[-2, -3]), "tome"],
         "vision_feature_layer [-2, -3] concatenates several layers"),
        ([_config(tmp_path / "deep", **llava, vision_feature_layer=-5), "none"],
         "vision_feature_layer -5 is outside the tower's 4 hidden states"),
        ([_config(tmp_path / "strategy", **llava, vision_feature_select_strategy="cls"), "none"],
         "vision_feature_select_strategy 'cls' is unknown"),
        ([_config(tmp_path / "ats", **llava), "ats"], "--method ats attends with its reference's own softmax"),
        ([_config(tmp_path / "siglip", **{**llava, "vision_config": {"model_type": "siglip_vision_model"}}), "evit"],
         "--method evit scores tokens by the class token's attention, and"),
        ([_config(tmp_path / "clip-evit", **llava), "evit"], None),
        ([_config(tmp_path / "good", **llava, vision_feature_layer=[-2, -3]), "none"], None),
    ]
    proc = subprocess.run([sys.executable, "-c", CHECK_IN_A_CHILD, json.dumps([c for c, _ in cases])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["torch"] and not report["transformers"]
    for (args, expected), (status, value) in zip(cases, report["results"]):
        if expected is None:
            assert status == "ok", value
            layer = [-2, -3] if args[0].endswith("good") else -2
            assert value == {"tower": "clip", "feature_layer": layer, "select": "default",
                             "image_token_id": 32000, "text_model_type": "llama"}
        else:
            assert status == "refused", (args, value)
            assert expected in value and "\n" not in value, value


EXPORT_IN_A_CHILD = """
import contextlib, io, json, sys
from edgetok.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    out.append([code, err.getvalue()])
print(json.dumps({"results": out, "torch": "torch" in sys.modules}))
"""


def test_export_vlm_refuses_a_method_the_tower_cannot_take_before_torch(folders, tmp_path):
    """`edgetok export vlm` with evit on a SigLIP tower, or ats on any tower: one line, before torch, nothing written."""
    runs = [["export", "vlm", folders["siglip"], "--method", "evit", "--keep-rate", "0.5", "-o", str(tmp_path / "a")],
            ["export", "vlm", folders["clip"], "--method", "ats", "-o", str(tmp_path / "b")]]
    proc = subprocess.run([sys.executable, "-c", EXPORT_IN_A_CHILD, json.dumps(runs)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["torch"]
    for (code, err), needle in zip(report["results"], ["--method evit scores tokens by the class token's attention",
                                                       "--method ats attends with its reference's own softmax"]):
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- the tower at zero reduction is LLaVA's get_image_features ---------------------------------------------------------

@pytest.mark.parametrize("name, tokens, run", [("clip", GRID, 2), ("siglip-last", GRID, 3), ("clip-layer1", GRID, 1),
                                               ("clip-layers", GRID, 2), ("siglip-default", GRID - 1, 2)])
def test_tower_equals_get_image_features(folders, name, tokens, run):
    """CLIP at layer -2 with "default" (class row dropped), SigLIP at -1 with "full", CLIP at layer 1 and at
    layers [-2, -3] (concatenated): the same visual tokens; only the layers up to the feature layer run."""
    llava = load_llava(folders[name])
    tower = tower_vit(llava)
    calls = [0] * len(llava.model.model.vision_tower.encoder.layers)
    for i, layer in enumerate(llava.model.model.vision_tower.encoder.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = tower.module(pixels)
    assert calls[:run] == [1] * run and not any(calls[run:])
    assert tower.depth == run and tower.output_names == ["image_embeds"]
    expected = _features(llava.model, pixels)
    assert embeds.shape == expected.shape == (3, tokens, llava.config.text_config.hidden_size)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-5)


# -- reduction through the registry: the patched LLaVA is the reference ------------------------------------------------

# every fixed-count method of the registry (evit needs a class token: CLIP only); SigLIP at its last layer, so the
# reduction runs in all three layers there and in two of three for CLIP (feature layer -2)
FIXED_COUNT = [("tome", {"r": 3}), ("pitome", {"r": 3}), ("pitome", {"r": 3, "pitome_variant": "protected"}),
               ("zerotprune", {"r": 3}), ("gtp", {"propagate": "3"}), ("evit", {"keep_rate": 0.5})]


@pytest.mark.parametrize("name, method, options",
                         [("clip", m, o) for m, o in FIXED_COUNT]
                         + [("siglip-last", m, o) for m, o in FIXED_COUNT if m != "evit"]
                         + [("siglip-default", "tome", {"r": 3})],
                         ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_fixed_count_method_is_the_plan_and_equals_patched_llava_and_onnx_runtime(folders, images, tmp_path, name,
                                                                                   method, options):
    """The tower reduced by ``method`` keeps the plan's visual tokens and equals LLaVA's own get_image_features
    with the same layers patched (only those that run); vision.onnx equals it in ONNX Runtime on real images."""
    from edgetok.onnx.validate import ort_session

    llava = load_llava(folders[name])
    prefix = llava.prefix_tokens
    tower, plan = reduce_tower(llava, method, dict(options))
    assert tower.prefix_tokens == prefix and tower.class_token == bool(prefix)
    assert plan.tokens[0][0] == GRID + prefix and len(plan.tokens) == llava.layers_run
    planned = plan.tokens[-1][1] - llava.dropped  # "default" drops the first row (CLIP's class token)
    assert planned < GRID + prefix - llava.dropped
    if method == "tome":
        assert planned == GRID + prefix - 3 * llava.layers_run - llava.dropped
    pixels = _pixels(folders[name], images)
    with torch.no_grad():
        embeds = tower.module(pixels)
    assert embeds.shape == (len(images), planned, llava.config.text_config.hidden_size)
    reference = patched_llava(folders[name], method, **options)
    layer = "CLIPEncoderLayer" if name.startswith("clip") else "SiglipEncoderLayer"
    patched = [type(block).__name__ for block in reference.model.vision_tower.encoder.layers]
    assert patched == ["Reducing" + layer] * llava.layers_run + [layer] * (3 - llava.layers_run)  # only those that run
    expected = _features(reference, pixels)  # hidden states recorded through the swapped classes
    assert expected.shape == embeds.shape
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(embeds, _features(load_llava(folders[name]).model, pixels)[:, :planned])

    validation = export_vision(tower, tmp_path / "vision.onnx")
    assert validation["passed"] and validation["max_abs_diff"] <= 1e-4 and "visual_tokens" not in validation
    session = ort_session(str(tmp_path / "vision.onnx"))
    assert [o.name for o in session.get_outputs()] == ["image_embeds"]
    assert session.get_outputs()[0].shape == ["batch", planned, llava.config.text_config.hidden_size]
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]  # images the export never saw
    np.testing.assert_allclose(got, embeds.numpy(), rtol=0, atol=1e-4)


def test_class_token_methods_are_refused_for_siglip_after_torch_too(folders):
    """check_folder refuses them before torch (test above); reduce_tower checks again for a caller that skipped it."""
    with pytest.raises(EdgetokError, match=r"^--method evit scores tokens by the class token's attention, and .* \(siglip "
                                           r"tower\) has no class token; use --method tome \(or pitome, zerotprune, gtp, "
                                           r"dtome\)$"):
        reduce_tower(load_llava(folders["siglip"]), "evit", {"keep_rate": 0.7})


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_dtome_counts_follow_the_image_and_equal_patched_llava(folders, calibration, images, name):
    llava = load_llava(folders[name])
    tower, plan = reduce_tower(llava, "dtome", {"r": 3}, calibrate=calibration)
    assert tower.output_names == ["image_embeds", "visual_tokens"]
    assert plan.params["calibration"]["samples"] == 6 and all(t is not None for t in plan.params["thresholds"])
    pixels = _pixels(folders[name], images)
    with torch.no_grad():
        embeds, counts = tower.module(pixels)
    counts = counts.tolist()
    assert len(set(counts)) > 1, counts  # the count follows the image
    assert embeds.shape[1] == max(counts) and max(counts) < GRID
    reference = patched_llava(folders[name], "dtome", r=3, calibrate=calibration)
    for i, count in enumerate(counts):
        alone = _features(reference, pixels[i:i + 1])[0]  # one image: no padding
        assert alone.shape[0] == count
        torch.testing.assert_close(embeds[i, :count], alone, rtol=0, atol=1e-5)
        assert not embeds[i, count:].any()  # padding rows
    # the calibration is deterministic: thresholds given back rebuild the same model without calibrating
    again, _ = reduce_tower(load_llava(folders[name]), "dtome", {"r": 3, "thresholds": plan.params["thresholds"]})
    with torch.no_grad():
        assert again.module(pixels)[1].tolist() == counts


# -- vision.onnx ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clip", "siglip-last"])
def test_dtome_vision_onnx_counts_and_rows_match_pytorch_in_onnx_runtime(folders, calibration, images, tmp_path, name):
    import onnx

    from edgetok.onnx.lint import lint
    from edgetok.onnx.validate import ort_session

    tower, plan = reduce_tower(load_llava(folders[name]), "dtome", {"r": 3}, calibrate=calibration)
    path = tmp_path / "vision.onnx"
    validation = export_vision(tower, path)
    assert validation["passed"] and validation["batch"] == 3 and validation["max_abs_diff"] <= 1e-4
    model = onnx.load(str(path))
    assert lint(model) == []
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    session = ort_session(str(path))
    pixels = _pixels(folders[name], images)  # real images, never seen by the export
    got = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = tower.module(pixels)
    assert validation["visual_tokens_equal"] and len(validation["visual_tokens"]) == 3
    assert outputs == {"image_embeds": ["batch", "tokens", 32], "visual_tokens": ["batch"]}
    assert got[1].dtype == np.int64 and got[1].tolist() == expected[1].tolist() and len(set(got[1].tolist())) > 1
    np.testing.assert_allclose(got[0], expected[0].numpy(), rtol=0, atol=1e-4)
    single = session.run(None, {"pixel_values": pixels[:1].numpy()})  # batch 1: no padding at all
    assert single[0].shape[1] == int(single[1][0]) == int(got[1][0])


def test_export_vision_of_a_llava_is_its_dense_tower(folders, tmp_path):
    llava = load_llava(folders["clip"])
    validation = export_vision(llava, tmp_path / "vision_dense.onnx")
    assert validation["passed"] and "visual_tokens" not in validation


# -- the model's own image processor ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family, tower, mean", [("clip-llama", "CLIPImageProcessor", 0.48145466),
                                                 ("siglip-qwen2", "SiglipImageProcessor", 0.5)])
def test_processor_from_the_folder_or_derived_from_the_vision_config(tmp_path, images, family, tower, mean):
    from transformers import AutoImageProcessor

    shipped = save_llava(tmp_path / "shipped", family)
    bare = save_llava(tmp_path / "bare", family, processor=False)
    assert not (bare / "preprocessor_config.json").exists()
    derived = image_processor(bare)
    assert type(derived).__name__ == tower and derived.image_mean[0] == pytest.approx(mean)
    own = image_processor(shipped)
    direct = AutoImageProcessor.from_pretrained(str(shipped))
    for path in images:
        pixels = pixel_values(own, path)
        assert pixels.dtype == np.float32 and pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
        from PIL import Image

        np.testing.assert_array_equal(pixels, direct(images=Image.open(path).convert("RGB"),
                                                      return_tensors="np")["pixel_values"])
        np.testing.assert_array_equal(pixel_values(derived, path), pixels)  # the family's defaults are what it ships
    export = tmp_path / "export"
    (export / "preprocessor").mkdir(parents=True)
    own.save_pretrained(export / "preprocessor")  # an export folder: its preprocessor/
    np.testing.assert_array_equal(pixel_values(image_processor(export), images[0]), pixel_values(own, images[0]))


def test_an_undecodable_image_and_a_wrong_processor_size_are_one_line(tmp_path, folders):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(EdgetokError, match=rf"^cannot read image {broken}: .*; remove it"):
        pixel_values(image_processor(folders["clip"]), broken)
    from transformers import CLIPImageProcessor

    folder = save_llava(tmp_path / "odd", "clip-llama", processor=False)
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(folder)
    with pytest.raises(EdgetokError, match=r"preprocessor_config.json makes 48x48 images but the vision tower takes "
                                           r"32x32 \(vision_config.image_size\); fix its size/crop_size$"):
        image_processor(folder)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_tower_preprocessing_reads_image_folders_as_the_processor(folders, calibration, name):
    """LoadedViT.preprocessing in timm's terms: edgetok.images.image_folder (dtome's --calibrate of `export vit`,
    eval's --data) makes what the processor makes, up to a rounding step of the resize."""
    from edgetok.images import image_folder

    tower = tower_vit(load_llava(folders[name]))
    dataset = image_folder(calibration, tower.preprocessing, "--calibrate")
    processor = image_processor(folders[name])
    for i in (2, 3):  # sizes whose centre crop starts at a whole pixel in both (timm rounds, transformers floors)
        got, path = dataset[i][0].numpy(), dataset.samples[i][0]
        expected = pixel_values(processor, path)[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 0.05 and np.abs(got - expected).mean() < 1e-3


def test_dtome_calibrates_through_image_folder_too(folders, calibration):
    """`export vit`'s calibration (edgetok.images.image_folder with the tower's preprocessing) runs on the tower as
    well: every block that merges gets a cosine threshold, and the merges are measured on the folder."""
    from edgetok.vit import methods
    from edgetok.vit.methods.dtome_torch import calibrate
    from edgetok.vit.reduction import reduce_vit

    tower = tower_vit(load_llava(folders["clip"]))
    method = methods.make_method("dtome", tower.depth, tokens=tower.num_tokens, r=3)
    reduce_vit(tower, method)
    thresholds = calibrate(tower, method, calibration)
    assert len(thresholds) == 2 and all(0 <= t < 1 for t in thresholds)
    assert method.calibration["samples"] == 6 and len(method.calibration["measured"]["mean_tokens_per_layer"]) == 2
