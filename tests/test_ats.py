"""ATS: the sampling equals a loop-by-loop reading of the reference code; a padded batch equals its images
run one by one; the export (TokenPrune plugin nodes) equals PyTorch in ONNX Runtime on real images."""

import numpy as np
import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from reference_ats import ats_forward, ats_keep, ats_scores

from edgetok.onnx.validate import ort_session
from edgetok.plugins.token_counts import add_count_outputs, engine_count_outputs, per_image, sizes_outputs
from edgetok.vit.methods.ats_torch import ATS
from edgetok.vit.export import ViTExportOptions, export_vit
from edgetok.vit.loading import load_vit
from edgetok.vit.methods import make_method
from edgetok.vit.reduction import reduce_vit


@pytest.mark.parametrize("tokens,n_ref,budget", [(17, 17, 1.0), (65, 65, 1.0), (65, 65, 0.5), (65, 65, 20),
                                                 (40, 65, 1.0), (12, 65, 5), (197, 197, 1.0), (120, 197, 0.7)])
def test_sampling_equals_the_reference_loops(tokens, n_ref, budget):
    rng = np.random.default_rng(tokens + n_ref)
    method = ATS([0], budget, 1, n_ref)
    for _ in range(5):
        attention = rng.dirichlet(np.ones(tokens) * 0.3, size=3) * 6  # peaky, as class attention is
        norms = rng.uniform(0.5, 2.0, (3, tokens))
        keep = method.keep(torch.from_numpy(attention), torch.from_numpy(norms), torch.ones(3, tokens, 1), 1)
        for b in range(3):
            want = ats_keep(list(attention[b]), list(norms[b]), n_ref, budget)
            assert torch.nonzero(keep[b]).flatten().tolist() == want


def _near_equal_low_scores(tokens: int, seed: int):
    """One image's q, k, v [1, 1, N, 2] whose class token attends to a few tokens and hardly at all to the rest
    (logits about -30, far below log(eps/N)): a plain softmax orders those by exp(logit), the reference's
    softmax_with_policy by their value norms (each probability about eps/N), and the two orders are reversed."""
    rng = np.random.default_rng(seed)
    q = np.zeros((tokens, 2))
    q[0] = [1.0, 0.0]
    k = np.zeros((tokens, 2))
    k[1:4, 0] = rng.uniform(2.0, 3.0, 3)  # three tokens it attends to
    k[4:, 0] = -30.0 + np.arange(tokens - 4) * 0.5  # the rest: increasing, tiny attention
    v = np.ones((tokens, 2))
    v[4:, 1] = np.linspace(3.0, 1.0, tokens - 4)  # value norms decreasing where the attention increases
    return [torch.from_numpy(t)[None, None] for t in (q, k, v)]


def test_step_samples_with_the_reference_policy_softmax():
    """The sampling step (scores from the block's own q, k, v) keeps what the reference keeps on scores from
    softmax_with_policy, which here differs from what a plain softmax would keep; an image inside a padded
    batch keeps what it keeps alone (N is the image's own count)."""
    method = ATS([0], 1.0, 1, 17)
    images = [_near_equal_low_scores(17, 0), _near_equal_low_scores(13, 1)]
    q, k, v = (torch.zeros(2, 1, 17, 2, dtype=torch.float64) for _ in range(3))
    size = torch.zeros(2, 17, 1, dtype=torch.float64)
    for b, (qi, ki, vi) in enumerate(images):
        n = qi.shape[2]
        q[b, :, :n], k[b, :, :n], v[b, :, :n], size[b, :n] = qi[0], ki[0], vi[0], 1.0
    x = torch.arange(17, dtype=torch.float64).repeat(2, 1)[..., None] * size  # each row holds its position
    pruned, pruned_size = method.reduce(1, {"q": q, "k": k, "v": v, "scale": 1.0}, x, size, 1, True)
    for b, (qi, ki, vi) in enumerate(images):
        lists = [t[0].tolist() for t in (qi, ki, vi)]
        want = ats_keep(*ats_scores(*lists, 1.0), 17, 1.0)
        plain = ats_keep(*ats_scores(*lists, 1.0, eps=0.0), 17, 1.0)
        assert want != plain, "a plain softmax should keep other tokens here"
        kept = int((pruned_size[b, :, 0] > 0).sum())
        assert pruned[b, :kept, 0].tolist() == want


EVERY_BLOCK = [1, 2, 3, 4, 5]  # the reference's config scaled to 6 blocks: the most sampling, the hardest case


def _digits_ats(budget=None):
    vit = load_vit("edgetok_digits_vit")
    reduce_vit(vit, make_method("ats", vit.depth, ats_blocks=EVERY_BLOCK, ats_budget=budget, tokens=vit.num_tokens))
    return vit


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Held-out digit images, preprocessed as eval does."""
    from edgetok.vit.digits import write_heldout_folder
    from edgetok.images import image_folder

    folder = write_heldout_folder(tmp_path_factory.mktemp("digits") / "heldout")["path"]
    dataset = image_folder(folder, load_vit("edgetok_digits_vit").preprocessing)
    return np.stack([dataset[i][0].numpy() for i in range(0, 40 * 13, 13)])  # 40 images across the classes


@pytest.mark.slow
@pytest.mark.parametrize("budget", [None, 0.6])
def test_a_padded_batch_equals_its_images_one_by_one(budget, digits):
    vit = _digits_ats(budget)
    x = torch.from_numpy(digits[:8])
    with torch.no_grad():
        batched = vit.module(x)
        kept = (vit.blocks[0]._edgetok_state.size[..., 0] > 0).sum(dim=1)
        alone = torch.cat([vit.module(x[i:i + 1]) for i in range(len(x))])
    assert len(set(kept.tolist())) > 1, "the kept count should vary across these images"
    assert (batched - alone).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("budget", [1.0, 0.6])
def test_patched_model_equals_the_reference_forward(budget, digits):
    """The patched model (float64, a padded batch) equals the reference's forward run image by image as loops
    (tests/reference_ats.py): softmax_with_policy in every block's attention, sampling in the ATS blocks."""
    vit = load_vit("edgetok_digits_vit")
    vit.module.double()
    reduce_vit(vit, make_method("ats", vit.depth, ats_blocks=EVERY_BLOCK, ats_budget=budget, tokens=vit.num_tokens))
    x = torch.from_numpy(digits[:10]).double()
    with torch.no_grad():
        got = vit.module(x)
    want, counts = ats_forward(load_vit("edgetok_digits_vit").module.double(), x, EVERY_BLOCK, budget, vit.num_tokens)
    assert len({tuple(c) for c in counts}) > 1, "the kept counts should vary across these images"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_hugging_face_vit_attends_with_the_policy_softmax():
    """A Hugging Face ViT's blocks attend with softmax_with_policy too (recomputed here from the block's own
    projections), and a padded batch equals its images one by one."""
    from transformers import ViTConfig, ViTForImageClassification

    from edgetok.vit.loading import from_hf

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, num_labels=5, initializer_range=0.3)  # peaky attention
    vit = from_hf(ViTForImageClassification(config).double(), "hf")
    reduce_vit(vit, make_method("ats", vit.depth, ats_blocks=[1, 2], tokens=vit.num_tokens))
    attention = vit.blocks[0].attention
    x = torch.randn(2, vit.num_tokens, 32, dtype=torch.float64)
    with torch.no_grad():
        got = attention(x)[0]
        q, k, v = (p(x).view(2, -1, 4, 8).transpose(1, 2) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
        logits = (q @ k.transpose(-2, -1)) * 8 ** -0.5
        e = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        probs = (e + 1e-6 / vit.num_tokens) / (e.sum(dim=-1, keepdim=True) + 1e-6)
        want = attention.o_proj((probs @ v).transpose(1, 2).reshape(2, -1, 32))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        batched = vit.module(images)
        kept = (vit.blocks[0]._edgetok_state.size[..., 0] > 0).sum(dim=1)
        alone = torch.cat([vit.module(images[i:i + 1]) for i in range(4)])
    assert len(set(kept.tolist())) > 1, "the kept count should vary across these images"
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_export_equals_pytorch_on_real_images(tmp_path, digits):
    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", method="ats", ats_blocks=EVERY_BLOCK,
                                       output=str(tmp_path / "a.onnx")))
    assert side["plugins"][0]["name"] == "TokenPrune" and side["plugins"][0]["nodes"] == len(side["reduction"]["ats_blocks"])
    session = ort_session(side["path"])
    vit = _digits_ats()
    x = digits[8:20]
    with torch.no_grad():
        want = vit.module(torch.from_numpy(x)).numpy()
    got = session.run(None, {"pixel_values": x})[0]
    assert np.abs(got - want).max() <= 1e-4
    one = np.concatenate([session.run(None, {"pixel_values": x[i:i + 1]})[0] for i in range(len(x))])
    assert np.abs(one - want).max() <= 1e-4


def test_bad_ats_options_are_one_line(capsys, tmp_path):
    out = str(tmp_path / "x.onnx")
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "ats", "--ats-budget", "100", "-o", out)
    assert_one_line_error(code, err, "--ats-budget 100 is larger than the model's 65 tokens")
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "ats", "--ats-blocks", "2,9", "-o", out)
    assert_one_line_error(code, err, "--ats-blocks [9]", "0..5")
    code, _, err = run_cli(capsys, "export", "vit", "edgetok_digits_vit", "--method", "tome", "--ats-budget", "0.5",
                           "-o", out)
    assert_one_line_error(code, err, "--ats-blocks/--ats-budget are ATS options")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ats_export_builds_with_tensorrt_rtx_and_eval_counts_tokens(capsys, tmp_path, digits, monkeypatch):
    import json

    onnx_path = str(tmp_path / "ats.onnx")
    export_vit(ViTExportOptions(model="edgetok_digits_vit", method="ats", output=onnx_path))
    code, out, err = run_cli(capsys, "build-engine", onnx_path, "--backend", "tensorrt-rtx", "--batch", "1:4:8",
                             "--target", "sm86", "-o", str(tmp_path / "ats.engine"))
    assert code == 0, err
    report = json.loads((tmp_path / "ats.engine.build.json").read_text())
    assert report["edgetok_plugins"]["plugins"][0]["name"] == "TokenPrune"
    assert report["network_outputs"][0]["shape"] == [-1, 10]  # the logits stay static; token counts inside vary
    # the engine reports what each image kept: one [batch] output per ATS block, named in the report
    counts = {"4": "edgetok.tokens_kept.block4", "5": "edgetok.tokens_kept.block5"}
    assert report["token_count_outputs"] == counts
    assert [(o["name"], o["shape"]) for o in report["network_outputs"][1:]] == [(n, [-1]) for n in counts.values()]
    assert engine_count_outputs(tmp_path / "ats.engine") == {4: counts["4"], 5: counts["5"]}

    from edgetok.vit.digits import write_heldout_folder

    folder = write_heldout_folder(tmp_path / "heldout")["path"]
    code, out, err = run_cli(capsys, "eval", onnx_path, "--data", folder, "--no-sidecar", "--json")
    assert code == 0, err
    kept = json.loads(out)["tokens_kept"]
    assert sorted(kept) == ["4", "5"]  # the reference model's own default blocks
    assert all(t["min"] < t["max"] <= 65 for t in kept.values())  # the count follows the image

    # eval of the engine (no GPU here: its graph, count outputs included, run by ONNX Runtime in its place)
    # reads the counts from the engine's outputs and reports the same tokens kept
    import onnx

    import edgetok.runtime.runners as runners

    class GraphOfTheEngine:
        def __init__(self, path, module, batch, cuda_graphs, data_transfers):
            self.count_outputs = engine_count_outputs(path)
            self.kept_outputs = engine_count_outputs(path, "attention_kept_outputs")
            model = onnx.load(onnx_path)
            add_count_outputs(model)
            onnx.save(model, str(tmp_path / "engine_graph.onnx"))
            self.session = ort_session(str(tmp_path / "engine_graph.onnx"))
            self.inputs = ["pixel_values"]

        def run(self, feed):
            return dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feed)))

    monkeypatch.setattr(runners, "TensorRTEngineRunner", GraphOfTheEngine)
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "ats.engine"), "--data", folder, "--json")
    assert code == 0, err
    assert json.loads(out)["tokens_kept"] == kept
    from edgetok.profile.profiler import tokens_kept

    runner = GraphOfTheEngine(str(tmp_path / "ats.engine"), "", 1, False, None)
    x = {"pixel_values": digits[:5]}
    found = tokens_kept(str(tmp_path / "ats.engine"), x, runner)
    assert found == tokens_kept(onnx_path, x, None) and [k["block"] for k in found["tokens_kept"]] == [4, 5]


def test_engine_with_data_dependent_shapes_refuses_cuda_graphs(tmp_path):
    import json

    from edgetok.errors import EdgetokError
    from edgetok.runtime.runners import TensorRTEngineRunner

    engine = tmp_path / "a.engine"
    engine.write_bytes(b"engine")
    used = [{"name": "TokenPrune", "namespace": "edgetok", "version": "1", "nodes": 5}]
    (tmp_path / "a.engine.build.json").write_text(json.dumps({"edgetok_plugins": {"plugins": used}}))
    with pytest.raises(EdgetokError, match=r"data-dependent shapes \(TokenPrune: the token count follows the image\), "
                                           r"which a CUDA graph cannot capture; use --no-cuda-graphs"):
        TensorRTEngineRunner(str(engine), "tensorrt_rtx", 1, True, None)


@pytest.mark.slow
def test_profile_with_an_image_folder_records_tokens_kept(capsys, tmp_path):
    import json

    from edgetok.vit.digits import write_heldout_folder

    onnx_path = str(tmp_path / "ats.onnx")
    export_vit(ViTExportOptions(model="edgetok_digits_vit", method="ats", ats_blocks=[4, 5], output=onnx_path))
    folder = write_heldout_folder(tmp_path / "heldout")["path"]
    code, out, err = run_cli(capsys, "profile", onnx_path, "--inputs", folder, "--batch", "6", "--duration", "0.05",
                             "--iterations", "2", "--warmup", "0", "-o", str(tmp_path / "prof"))
    assert code == 0, err
    report = json.loads((tmp_path / "prof" / "profile.json").read_text())["models"][0]
    kept = report["tokens_kept"]
    assert [k["block"] for k in kept] == [4, 5] and all(len(k["per_image"]) == 6 for k in kept)
    assert "tokens kept after block 5:" in out
    assert any("Python reference ops" in w for w in report["warnings"])


def test_few_candidates_sample_alike_alone_and_padded():
    """An image with two candidates left (where the reference's closing 1 matters) samples the same tokens in a
    padded batch as alone; one with none left keeps its prefix, also at batch 1."""
    method = ATS([0], 1.0, 1, 65)
    attention = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    norms = torch.ones(2, 5, dtype=torch.float64)
    size = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0] * 5], dtype=torch.float64)[..., None]
    padded = method.keep(attention, norms, size, 1)
    alone = method.keep(attention[:1, :3], norms[:1, :3], size[:1, :3], 1)
    assert (padded[0, :3] * size[0, :3, 0]).tolist() == alone[0].tolist()
    assert alone[0].tolist() == [1.0] + [float(j) for j in [i in ats_keep([0.5, 0.3, 0.2], [1.0] * 3, 65, 1.0)
                                                        for i in (1, 2)]]
    only_prefix = method.keep(torch.ones(1, 1), torch.ones(1, 1), torch.ones(1, 1, 1), 1)
    assert only_prefix.tolist() == [[1.0]]


def test_scores_come_from_the_blocks_own_attention_and_values(monkeypatch):
    """The class attention and value norms ATS scores with are the block's own, recomputed here from its
    weights by hand with the reference's softmax_with_policy (a wrong tap, e.g. keys for values, would change
    them)."""
    vit = _digits_ats()
    seen, inputs = {}, {}
    keep = ATS.keep

    def spy(self, cls_attention, value_norm, size, prefix):
        seen.setdefault("args", (cls_attention, value_norm))
        return keep(self, cls_attention, value_norm, size, prefix)

    monkeypatch.setattr(ATS, "keep", spy)
    block = vit.blocks[1]  # the first ATS block (blocks 1..5 by default)
    block.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0]))
    with torch.no_grad():
        vit.module(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        attn = block.attn
        qkv = torch.nn.functional.linear(block.norm1(inputs["x"]), attn.qkv.weight, attn.qkv.bias)
        heads, dim = attn.num_heads, attn.head_dim
        q, k, v = qkv.view(2, -1, 3, heads, dim).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * dim ** -0.5  # no padding yet: sizes all 1
        e = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        probs = (e + 1e-6 / e.shape[-1]) / (e.sum(dim=-1, keepdim=True) + 1e-6)  # softmax_with_policy
        want_attention = probs[:, :, 0, :].sum(dim=1)
        want_norm = v.transpose(1, 2).reshape(2, -1, heads * dim).norm(dim=-1)
    got_attention, got_norm = seen["args"]
    assert torch.allclose(got_attention, want_attention, atol=1e-5)
    assert torch.allclose(got_norm, want_norm, atol=1e-5)


def test_default_blocks_come_from_the_model_else_the_reference_config_scaled():
    """The reference model declares where ATS samples (chosen on its training split, bench/ats_blocks.py); other
    models get the reference's DeiT-S config (blocks 3..11 of 12) scaled to their depth; --ats-blocks wins."""
    from edgetok.vit.loading import load_vit
    from edgetok.vit.methods import make_method
    from edgetok.vit.reduction import plan

    digits = load_vit("edgetok_digits_vit")
    assert digits.method_defaults == {"ats_blocks": [4, 5]}
    params = plan(digits, make_method("ats", 6, tokens=65, defaults=digits.method_defaults)).params
    assert (params["ats_blocks"], params["ats_blocks_from"]) == ([4, 5], "the model's own default")
    assert make_method("ats", 12, tokens=197).blocks == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert make_method("ats", 6, tokens=65).blocks == [1, 2, 3, 4, 5]
    given = make_method("ats", 6, ats_blocks=[2], tokens=65, defaults=digits.method_defaults)
    assert (given.blocks, given.source) == ([2], "--ats-blocks")


@pytest.mark.slow
def test_count_outputs_equal_the_padded_sizes_in_onnx_runtime(tmp_path, digits):
    """The per-image counts build-engine adds to the graph (standard ops) equal the rows of size > 0 of each
    TokenPrune's padded output, on a batch whose images keep different counts; the logits are untouched."""
    import onnx

    side = export_vit(ViTExportOptions(model="edgetok_digits_vit", method="ats", ats_blocks=EVERY_BLOCK,
                                       output=str(tmp_path / "a.onnx")))
    sizes = sizes_outputs(side["path"])
    model = onnx.load(side["path"])
    counts = add_count_outputs(model)
    assert sorted(counts) == EVERY_BLOCK
    onnx.save(model, str(tmp_path / "counted.onnx"))
    x = digits[:12]
    want = ort_session(side["path"], extra_outputs=tuple(sizes.values())).run(None, {"pixel_values": x})
    got = ort_session(str(tmp_path / "counted.onnx")).run(None, {"pixel_values": x})
    assert np.array_equal(got[0], want[0])
    for i, block in enumerate(sizes):
        assert got[1 + i].dtype == np.float32 and got[1 + i].shape == (12,)
        assert got[1 + i].astype(int).tolist() == per_image(want[1 + i])
    assert len(set(got[-1].tolist())) > 1, "the kept count should vary across these images"
