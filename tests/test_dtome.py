"""DyMU's dynamic ToMe (edgetok/vit/methods/dtome_torch.py): the step and the patched models equal the loop reference
(tests/reference_impl.py), a padded batch equals its images run one by one, calibration follows the
reference's rule and hits the target mean r, the cap holds, and +inf thresholds are the dense model.

Inputs are random at a scale where similarities are well separated; every comparison with the loop
reference first checks the reference's smallest decision gap, so a failure is a real difference."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
from reference_impl import attention, dtome_forward, dtome_merge, embedded

from edgetok.errors import EdgetokError
from edgetok.vit import digits
from edgetok.vit.methods.dtome_torch import DToMe, calibrate, calibrate_batches, make_dtome
from edgetok.vit.loading import from_timm, load_vit
from edgetok.vit.reduction import plan, reduce_vit
from edgetok.vit.token_transform import TokenTransform, apply_transform

MIN_GAP = 1e-7
INF = math.inf


def deit(seed: int = 0, dtype=torch.float64, img_size: int = 96, depth: int = 4, **kwargs):
    """A tiny timm DeiT (36 patches + class token) with all weights redrawn at unit scale."""
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=depth,
                              embed_dim=64, num_heads=4, num_classes=10, **kwargs).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "token" in name or "pos_embed" in name:
                p.copy_(0.5 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1.0 + 0.2 * noise)
    return model


def images(n: int, seed: int = 1, dtype=torch.float64, size: int = 96) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def calibrated(model, r: int, calib: torch.Tensor, cap=None, name: str = "deit"):
    """A patched copy of ``model`` and its dtome, calibrated on ``calib`` (one batch)."""
    vit = from_timm(copy.deepcopy(model), name)
    method = DToMe([r] * vit.depth, cap=cap)
    reduce_vit(vit, method)
    calibrate_batches(vit, method, lambda: iter([calib]), measure=False)
    return vit, method


# -- the token-transform padding convention ------------------------------------------------------------


def test_pad_row_is_zero_and_merges_nothing():
    x = torch.arange(12, dtype=torch.float64).reshape(1, 4, 3) + 1
    size = torch.tensor([[[1.0], [2.0], [1.0], [0.0]]], dtype=torch.float64)  # row 3: padding
    t = TokenTransform(keep=torch.tensor([[0, 1, 4, 4]]), src=torch.tensor([[2, 4]]), dst=torch.tensor([[1, 0]]),
                       pad=True)
    out, out_size = apply_transform(t, x, size, size)
    assert torch.equal(out[0, 0], x[0, 0])  # the zero row (src 4 -> dst 0) adds nothing
    assert torch.allclose(out[0, 1], (2 * x[0, 1] + x[0, 2]) / 3)
    assert torch.equal(out[0, 2:], torch.zeros(2, 3, dtype=torch.float64))  # keep 4: the zero row, 0/0 -> 0
    assert out_size[0, :, 0].tolist() == [1.0, 3.0, 0.0, 0.0]
    pruned, pruned_size = apply_transform(TokenTransform(keep=torch.tensor([[1, 4]]), pad=True), x, size, size)
    assert torch.equal(pruned[0, 1], torch.zeros(3, dtype=torch.float64)) and pruned_size[0, :, 0].tolist() == [2.0, 0.0]


# -- one step against the loop reference ----------------------------------------------------------------


def padded_inputs(counts: list[int], prefix: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, n = len(counts), max(counts)
    x = torch.randn(batch, n, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, 3, n, 6, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, n, 1), generator=gen).to(torch.float64)
    for i, c in enumerate(counts):
        size[i, c:] = 0  # padding: garbage x and k, size 0
    return x, k, size


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("cap", [None, 5])
def test_step_equals_loop_reference(prefix, cap):
    counts = [23, 19, 16, 22, 11]
    x, k, size = padded_inputs(counts, prefix, seed=prefix)
    threshold = 0.6
    method = DToMe([0], thresholds=[threshold], cap=cap)
    t, weight = method.transform(1, None, k, None, prefix, prefix > 0, size=size)
    assert weight is None and t.pad
    out, out_size = apply_transform(t, x, size, size)
    merged = []
    for i, c in enumerate(counts):
        stats = {}
        rows, sizes, n_merged = dtome_merge(x[i, :c], size[i, :c, 0].tolist(), k[i, :, :c], threshold, prefix, cap,
                                            stats)
        assert stats["min_gap"] > MIN_GAP
        left = rows.shape[0]
        torch.testing.assert_close(out[i, :left], rows, rtol=0, atol=1e-12)
        assert out_size[i, :left, 0].tolist() == sizes
        assert torch.all(out[i, left:] == 0) and torch.all(out_size[i, left:] == 0)  # padding
        assert int(method.merges[0][i]) == n_merged and int(method.tokens[0][i]) == left
        merged.append(n_merged)
    assert len(set(merged)) > 1, merged  # the count follows the image
    assert out.shape[1] == max(c - m for c, m in zip(counts, merged))  # padded to the batch maximum
    if cap is not None:
        assert max(merged) <= cap


@pytest.mark.parametrize("cap", [None, 0])
def test_an_image_that_merges_nothing_keeps_its_order(cap):
    """In a padded batch where the others merge, an image none of whose pairs exceeds the threshold keeps its
    tokens in place (DyMU's per-image step returns do_nothing), in both forms of the step (token transform,
    and the export form with TokenPrune). With a cap of 0 nothing merges anywhere, but the images with a pair
    above the threshold are still re-laid out as prefix, A, B, as DyMU's step is (it caps after that test)."""
    counts = [23, 19, 16]
    x, k, size = padded_inputs(counts, 1, seed=3)
    k[1, :, 0::2] = torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64)  # image 1: A tokens along one axis,
    k[1, :, 1::2] = torch.tensor([0, 1.0, 0, 0, 0, 0], dtype=torch.float64)  # B along another: similarity 0
    k[1, :, 1:, 2] += 0.01 * torch.arange(1, k.shape[2], dtype=torch.float64)  # (distinct, still far below)
    threshold = 0.6
    method = DToMe([0], thresholds=[threshold], cap=cap)
    t, _ = method.transform(1, None, k, None, 1, True, size=size)
    out, out_size = apply_transform(t, x, size, size)
    export_form = DToMe([0], thresholds=[threshold], cap=cap)
    pruned, pruned_size = export_form.reduce(1, {"q": None, "k": k}, x, size, 1, True)
    merged = []
    for i, c in enumerate(counts):
        stats = {}
        rows, sizes, n_merged = dtome_merge(x[i, :c], size[i, :c, 0].tolist(), k[i, :, :c], threshold, 1, cap, stats)
        assert stats["min_gap"] > MIN_GAP
        for got, got_size in ((out, out_size), (pruned, pruned_size)):
            torch.testing.assert_close(got[i, :rows.shape[0]], rows, rtol=0, atol=1e-12)
            assert got_size[i, :rows.shape[0], 0].tolist() == sizes
        merged.append(n_merged)
    torch.testing.assert_close(out[1, :counts[1]], x[1, :counts[1]], rtol=0, atol=1e-12)  # image 1 in place
    assert merged[1] == 0 and (cap == 0 or min(merged[0], merged[2]) > 0), merged
    if cap == 0:
        assert not torch.allclose(out[0, :counts[0]], x[0, :counts[0]])  # image 0: nothing merged, re-laid out


def test_cap_keeps_the_best_matches():
    counts = [25, 25, 21]
    x, k, size = padded_inputs(counts, 1, seed=7)
    free = DToMe([0], thresholds=[0.2])
    free.transform(1, None, k, None, 1, True, size=size)
    capped = DToMe([0], thresholds=[0.2], cap=2)
    capped.transform(1, None, k, None, 1, True, size=size)
    assert free.merges[0].min() > 2
    assert capped.merges[0].tolist() == [2, 2, 2]
    nothing = DToMe([0], thresholds=[0.2], cap=0)
    assert nothing.transform(1, None, k, None, 1, True, size=size)[0].src is None


# -- calibration: the reference's rule ------------------------------------------------------------------


def test_calibration_sample_is_the_best_unmerged_similarity():
    """Batch-level merging of the r·B best edges; the sample is the next one (index r·B), clamped >= 0;
    the threshold is the mean of the batches' samples."""
    from edgetok.vit.methods.tome_torch import bipartite_match

    counts = [21, 21, 17]
    method = DToMe([2])
    method.begin_calibration()
    samples = []
    for seed in (5, 6):
        x, k, size = padded_inputs(counts, 1, seed=seed)
        method.transform(1, None, k, None, 1, True, size=size)
        best = bipartite_match(k.mean(dim=1), 1, size[..., 0] > 0).best.flatten()
        ranked = torch.sort(best, descending=True).values
        samples.append(max(float(ranked[2 * 3]), 0.0))
        assert method._samples[0] == samples
        assert int(method.merges[0].sum()) == 2 * 3  # r·B over the batch ...
        assert len(set(method.merges[0].tolist())) > 1  # ... not r per image
    assert method.end_calibration() == [sum(samples) / 2]
    everything = DToMe([0], thresholds=[-INF])  # every real A token with a real B token merges
    everything.transform(1, None, k, None, 1, True, size=size)
    assert int(everything.merges[0].sum()) == int(torch.isfinite(best).sum())


def test_calibration_clamps_negative_samples_to_zero():
    k = torch.zeros(2, 1, 9, 2, dtype=torch.float64)
    k[..., 0::2, 0], k[..., 1::2, 0] = 1.0, -1.0  # every A/B similarity is -1
    method = DToMe([1])
    method.begin_calibration()
    method.transform(1, None, k, None, 1, True)
    assert method.end_calibration() == [0.0]


@pytest.mark.slow
def test_calibration_hits_the_target_mean_r(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(32):
        folder = tmp_path / "data" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    vit = from_timm(deit(dtype=torch.float32), "deit")
    r = 3
    method = make_dtome(vit.depth, r=r)
    thresholds = calibrate(vit, method, str(tmp_path / "data"), batch=8)
    assert thresholds == method.thresholds and len(thresholds) == vit.depth
    assert all(0 <= t < 1 for t in thresholds)
    measured = method.calibration["measured"]
    assert method.calibration["batches"] == 4 and measured["samples"] == 32
    mean = measured["mean_merges_per_layer"]
    assert all(abs(m - r) <= 0.2 * r for m in mean), mean
    assert abs(sum(mean) / len(mean) - r) <= 0.1 * r, mean
    # One batch holding every image: its thresholds merge exactly r per image on average in the first block.
    # Not in later ones: an image that merges nothing keeps its token order when run (DyMU's per-image path)
    # but is re-laid out while calibrating (its batched path), so the next blocks split A/B differently.
    exact = make_dtome(vit.depth, r=r)
    calibrate(from_timm(deit(dtype=torch.float32), "deit"), exact, str(tmp_path / "data"), batch=32)
    exact_mean = exact.calibration["measured"]["mean_merges_per_layer"]
    assert exact_mean[0] == float(r) and all(abs(m - r) <= 0.2 * r for m in exact_mean), exact_mean
    # The plan holds the upper bound; the expected mean comes from the measurement.
    result = plan(vit, method)
    assert [a == b for a, b in result.tokens] == [True] * vit.depth and not result.reduces
    assert result.amounts == [1, 2, 3, 4]
    expected = result.params["expected_tokens_per_layer"]
    assert expected[0][0] == vit.num_tokens and expected[-1][1] == pytest.approx(vit.num_tokens - sum(mean), abs=0.02)
    json.dumps(result.params, allow_nan=False)


def test_calibrate_refuses_a_missing_or_empty_folder(tmp_path):
    vit = from_timm(deit(dtype=torch.float32, depth=2), "deit")
    method = make_dtome(vit.depth, r=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    for folder in ("missing", "empty", "no_images"):
        with pytest.raises(EdgetokError) as err:
            calibrate(vit, method, str(tmp_path / folder), batch=4)
        assert "\n" not in str(err.value) and folder in str(err.value)
    with pytest.raises(EdgetokError, match="r > 0"):
        calibrate(vit, make_dtome(vit.depth, r=0), str(tmp_path / "no_images"), batch=4)


# -- the patched models ---------------------------------------------------------------------------------


def test_patched_deit_equals_loop_reference_and_padding_equals_one_by_one():
    model = deit()
    vit, method = calibrated(model, r=5, calib=images(8, seed=2))
    x = images(5, seed=3)
    with torch.no_grad():
        batched = vit.module(x)
    per_image = torch.stack(list(method.tokens.values()), dim=1).tolist()  # [image][block] tokens after
    assert len({tuple(c) for c in per_image}) > 1, per_image  # counts differ per image
    reference, counts, stats = dtome_forward(model, x, method.thresholds)
    assert stats["min_gap"] > MIN_GAP
    assert counts == per_image
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-10)
    with torch.no_grad():
        alone = torch.cat([vit.module(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-10)


@torch.no_grad()
def _thresholds_where_one_image_merges_nothing(model, x, later: float):
    """Block 0's threshold between the images' largest best-match similarities there (the image with the
    smallest merges nothing, the others merge), ``later`` for the other blocks; and that image."""
    largest = []
    for image in x:
        tokens = embedded(model, image)
        _, _, k = attention(model.blocks[0], tokens, [1.0] * tokens.shape[0], proportional=True)
        metric = k.mean(dim=0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        largest.append(float((metric[2::2] @ metric[1::2].T).max()))  # A tokens but the class token, B tokens
    ranked = sorted(largest)
    return [(ranked[0] + ranked[1]) / 2] + [later] * (len(model.blocks) - 1), largest.index(ranked[0])


def test_patched_deit_where_an_image_merges_nothing_equals_loop_reference(tmp_path):
    """An image that merges nothing in block 0 (while the others of its batch do) and merges in block 1: the
    padded batch equals the loop reference (its tokens stay in place, so block 1 splits A/B on the original
    order), equals the images one by one, and its ONNX export (float32) equals PyTorch in ONNX Runtime."""
    model = deit(seed=2)
    x = images(5, seed=8)
    thresholds, still = _thresholds_where_one_image_merges_nothing(model, x, later=0.35)
    vit = from_timm(copy.deepcopy(model), "deit")
    method = DToMe([0] * vit.depth, thresholds=thresholds)
    reduce_vit(vit, method)
    with torch.no_grad():
        batched = vit.module(x)
        per_image = torch.stack(list(method.tokens.values()), dim=1).tolist()
        alone = torch.cat([vit.module(x[i : i + 1]) for i in range(len(x))])
    reference, counts, stats = dtome_forward(model, x, thresholds)
    assert stats["min_gap"] > MIN_GAP
    tokens = vit.num_tokens
    assert counts[still][0] == tokens and counts[still][1] < tokens, counts  # in place in block 0, merges in 1
    assert all(c[0] < tokens for i, c in enumerate(counts) if i != still), counts
    assert counts == per_image
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-10)

    from edgetok.onnx.export import export_module
    from edgetok.onnx.validate import ort_session

    single = from_timm(copy.deepcopy(model).float(), "deit")
    reduce_vit(single, DToMe([0] * vit.depth, thresholds=thresholds))
    with torch.no_grad():
        want = single.module(x.float()).numpy()
    torch.testing.assert_close(torch.from_numpy(want), reference.float(), rtol=0, atol=1e-4)
    path = tmp_path / "d.onnx"
    export_module(single.module, x[:2].float(), path, "pixel_values", ["logits"])
    got = ort_session(str(path)).run(None, {"pixel_values": x.float().numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4


def test_patched_deit_with_cap_equals_loop_reference():
    model = deit(seed=4)
    vit, method = calibrated(model, r=4, calib=images(8, seed=5), cap=5)
    x = images(4, seed=6)
    with torch.no_grad():
        batched = vit.module(x)
    assert all(int(m.max()) <= 5 for m in method.merges.values())
    reference, counts, stats = dtome_forward(model, x, method.thresholds, cap=5)
    assert stats["min_gap"] > MIN_GAP
    assert counts == torch.stack(list(method.tokens.values()), dim=1).tolist()
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_digits_model_padded_batch_equals_one_by_one(tmp_path):
    pictures, labels = digits.digit_images()
    for i in range(48):
        folder = tmp_path / "digits" / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        pictures[i].save(folder / f"{i}.png")
    dense = load_vit(digits.NAME)
    vit = load_vit(digits.NAME)
    method = make_dtome(vit.depth, r=6)
    calibrate(vit, method, str(tmp_path / "digits"), batch=16)
    assert abs(sum(method.calibration["measured"]["mean_merges_per_layer"]) / vit.depth - 6) <= 0.5
    from edgetok.images import image_folder

    data = image_folder(str(tmp_path / "digits"), vit.preprocessing)
    x = torch.stack([data[i][0] for i in range(0, 48, 5)])
    with torch.no_grad():
        batched = vit.module(x)
        per_image = torch.stack(list(method.tokens.values()), dim=1).tolist()
        alone = torch.cat([vit.module(x[i : i + 1]) for i in range(len(x))])
        reference = dense.module(x)
    assert len({tuple(c) for c in per_image}) > 1, per_image
    torch.testing.assert_close(batched, alone, rtol=0, atol=2e-5)
    assert (batched.argmax(1) == reference.argmax(1)).float().mean() >= 0.8  # still the digits model


@pytest.mark.parametrize("name", ["deit", digits.NAME])
def test_infinite_thresholds_are_the_dense_model_exactly(name):
    if name == "deit":
        dense = from_timm(deit(dtype=torch.float32), "deit")
        vit = from_timm(copy.deepcopy(dense.module), "deit")
        x = images(3, dtype=torch.float32)
    else:
        dense, vit = load_vit(name), load_vit(name)
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reduce_vit(vit, DToMe([3] * vit.depth, thresholds=[INF] * vit.depth))
    with torch.no_grad():
        assert torch.equal(vit.module(x), dense.module(x))


def test_bad_options_are_one_line():
    for kwargs in ({"r": 2, "r_schedule": "2"}, {"r": -1}, {"r": 2, "cap": -1}, {"r": 2, "thresholds": [0.5]},
                   {"r": 2, "thresholds": ["x"] * 4}):
        with pytest.raises(EdgetokError) as err:
            make_dtome(4, **kwargs)
        assert "\n" not in str(err.value)
    vit = from_timm(deit(dtype=torch.float32, depth=2), "deit")
    with pytest.raises(EdgetokError, match="too large for block 0"):
        plan(vit, make_dtome(vit.depth, r=19))


def test_without_sizes_the_padding_is_the_previous_steps():
    """Called as patch.py's transform hook (no sizes), a step takes the padding its previous step left."""
    counts = [23, 19, 16, 22, 11]
    x, k, size = padded_inputs(counts, 1, seed=1)
    first = DToMe([0, 0], thresholds=[0.4, 0.4])
    t, _ = first.transform(1, None, k, None, 1, True)  # block 0 of a forward: no padding yet
    x1, size1 = apply_transform(t, x, torch.ones_like(size), torch.ones_like(size))
    assert len(set(first.tokens[0].tolist())) > 1
    k1 = torch.randn(5, 3, x1.shape[1], 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    implicit, _ = first.transform(2, None, k1, None, 1, True)
    given = DToMe([0, 0], thresholds=[0.4, 0.4])
    explicit, _ = given.transform(2, None, k1, None, 1, True, size=size1)
    for a, b in ((implicit.keep, explicit.keep), (implicit.src, explicit.src), (implicit.dst, explicit.dst)):
        assert torch.equal(a, b)
    assert torch.equal(first.tokens[1], given.tokens[1])
    again, _ = first.transform(1, None, k, None, 1, True)  # a new forward starts afresh
    assert torch.equal(again.keep, t.keep)
