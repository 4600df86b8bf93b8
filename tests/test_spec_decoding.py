"""Speculative decoding: KV-cache decoders equal to PyTorch, lossless greedy and sampled generation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from edgetok.llm.pair import MANIFEST, export_pair
from edgetok.llm.runtime import (
    generate,
    generate_draft_free,
    generate_speculative,
    generate_target,
    open_decoder,
    open_pair,
)

SHIPPED = Path(__file__).parents[1] / "edgetok" / "assets" / "spec_pair"
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)


def save_config(folder: Path, cls=LlamaConfig, **kw) -> Path:
    cls(**{**SMALL, **kw}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_pairs(tmp_path_factory):
    """Target (3 layers, untied head) with three drafts: layer-skip, itself, and its negated head."""
    root = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(**SMALL, num_hidden_layers=3, tie_word_embeddings=False))
    target.save_pretrained(root / "target")
    contrary = LlamaForCausalLM(target.config)
    contrary.load_state_dict(target.state_dict())
    with torch.no_grad():
        contrary.lm_head.weight.neg_()  # its argmax is the target's argmin: every proposal is rejected
    contrary.save_pretrained(root / "contrary")
    pairs = {}
    for name, draft in [("layer_skip", "layer-skip:1"), ("same", str(root / "target")),
                        ("contrary", str(root / "contrary"))]:
        export_pair(str(root / "target"), draft, str(root / f"pair_{name}"))
        pairs[name] = root / f"pair_{name}"
    return pairs


@pytest.mark.parametrize("arch", [LlamaConfig, Qwen2Config], ids=["llama", "qwen2"])
def test_export_checks_every_phase_for_two_architectures(tmp_path, arch):
    save_config(tmp_path / "t", arch, num_hidden_layers=2)
    save_config(tmp_path / "d", arch, num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                num_key_value_heads=1)
    manifest = export_pair(str(tmp_path / "t"), str(tmp_path / "d"), str(tmp_path / "pair"))
    for role in ("target", "draft"):
        checks = manifest[role]["validation"]["max_abs_diff"]
        assert set(checks) == {"prefill", "decode", "verify_k+1", "crop_and_continue", "other_shapes"}
        assert max(checks.values()) < 1e-5
    on_disk = json.loads((tmp_path / "pair" / MANIFEST).read_text())
    assert on_disk["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert on_disk["outputs"]["present_value_names"] == "present.%d.value"
    assert on_disk["draft"]["head_size"] == 8 and on_disk["target"]["num_key_value_heads"] == 2
    assert on_disk["max_length"] == 128 and on_disk["vocab_size"] == 96
    import onnx

    graph = onnx.load(str(tmp_path / "pair" / "target" / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert names[:5] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                         "past_key_values.0.value"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 8]
    assert dims["attention_mask"] == ["batch", "total_sequence"]


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("draft", ["layer_skip", "same", "contrary"])
def test_greedy_speculative_equals_target_only(llama_pairs, draft, k):
    _, target, drafter = open_pair(str(llama_pairs[draft]))
    prompt = [5, 17, 3, 88, 41]
    want = generate_target(target, prompt, 30).tokens
    got = generate_speculative(target, drafter, prompt, 30, k)
    assert got.tokens == want
    if draft == "same":  # every proposal accepted; each round also yields the target's bonus token
        assert got.accepted == got.proposed and all(n == k for n in got.accepted_per_round[:-1])
    if draft == "contrary":  # every proposal rejected; each round still yields the target's own token
        assert got.accepted == 0 and got.rounds == 30


def test_the_tree_variant_equals_each_branch_run_alone(llama_pairs):
    """One tree call scores every node as the plain decoder scores its branch on its own (same cache)."""
    manifest, target, _ = open_pair(str(llama_pairs["same"]))
    tree = open_decoder(str(llama_pairs["same"]), manifest, "target_tree")
    prompt = [5, 17, 3, 88, 41, 7]
    #        root 9; 1 and 2 under it; 3 under 1; 4 under 3; 5 under 2
    parents, tokens = [-1, -1, 0, 2, 1], [11, 12, 13, 14, 15]
    for d in (target, tree):
        d.reset()
        d.feed(prompt)
    got = tree.feed_tree(9, tokens, parents)
    for leaf_path in ([0, 2, 3], [1, 4]):
        target.crop(len(prompt))
        want = target.feed([9, *[tokens[i] for i in leaf_path]])
        assert np.abs(got[[0, *[i + 1 for i in leaf_path]]] - want).max() < 1e-5
    tree.keep(list(range(len(prompt) + 1)) + [len(prompt) + 1 + i for i in (0, 2)])  # accept 11, 13
    target.crop(len(prompt))
    target.feed([9, 11, 13])
    assert np.abs(tree.feed([14]) - target.feed([14])).max() < 1e-5  # the kept cache is the branch's own


@pytest.mark.parametrize("mode", ["lookahead", "prompt-lookup"])
@pytest.mark.parametrize("prompt", [[5, 17, 3, 88, 41, 5, 17, 3], [1, 2, 3, 4, 5, 6], [7]],
                         ids=["repeats", "no_match", "shorter_than_ngram"])
def test_draft_free_greedy_equals_target_only(llama_pairs, mode, prompt):
    manifest, target, _ = open_pair(str(llama_pairs["same"]))
    decoder = open_decoder(str(llama_pairs["same"]), manifest, "target_tree") if mode == "lookahead" else target
    want = generate_target(target, prompt, 30).tokens
    for ngram, branches, tokens in ((4, 4, 16), (2, 2, 3), (1, 1, 1)):
        assert generate_draft_free(decoder, prompt, 30, mode, ngram, branches, tokens).tokens == want


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "target" / "config.json").is_file(), reason="the shipped pair is exported by tools/train_spec_pair.py")
@pytest.mark.parametrize("mode", ["lookahead", "prompt-lookup"])
def test_shipped_target_draft_free_is_lossless(tmp_path_factory, mode):
    pair = tmp_path_factory.getbasetemp() / "shipped_pair"
    if not pair.exists():
        export_pair(str(SHIPPED / "target"), str(SHIPPED / "draft"), str(pair))
    for prompt in ["import os\n\n\ndef main(", "class Parser:\n    def __init__(self"]:
        a = generate(str(pair), prompt=prompt, max_new_tokens=64, mode="target")
        b = generate(str(pair), prompt=prompt, max_new_tokens=64, mode=mode)
        assert a["tokens"] == b["tokens"] and b["draft_free"]["ngram"] == 4


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "target" / "config.json").is_file(), reason="the shipped pair is exported by tools/train_spec_pair.py")
@pytest.mark.parametrize("k", [2, 4, 7])
def test_shipped_pair_greedy_is_lossless(tmp_path_factory, k):
    pair = tmp_path_factory.getbasetemp() / "shipped_pair"
    if not pair.exists():
        export_pair(str(SHIPPED / "target"), str(SHIPPED / "draft"), str(pair))
    for prompt in ["import os\n\n\ndef main(", "class Parser:\n    def __init__(self"]:
        a = generate(str(pair), prompt=prompt, max_new_tokens=48, mode="target")
        b = generate(str(pair), prompt=prompt, max_new_tokens=48, mode="speculative", k=k)
        assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
        assert b["mean_tokens_per_round"] > 1.5  # a trained draft agrees often (a random one gives 1.0)


@pytest.mark.skipif(not (SHIPPED / "target" / "config.json").is_file(), reason="the shipped pair is exported by tools/train_spec_pair.py")
def test_shipped_target_writes_recognisable_python_for_the_readme_prompt(tmp_path_factory):
    """The README's example must show code: not whitespace, not one word repeated (what the first pair wrote)."""
    import re

    pair = tmp_path_factory.getbasetemp() / "shipped_pair"
    if not pair.exists():
        export_pair(str(SHIPPED / "target"), str(SHIPPED / "draft"), str(pair))
    text = generate(str(pair), prompt="def read_file(path):", max_new_tokens=64, mode="speculative", k=4)["text"]
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)
    assert len(text.strip()) > 32 and sum(c.isspace() for c in text) < len(text) / 2, repr(text)
    assert len(set(words)) >= 5 and max(words.count(w) for w in words) <= len(words) / 2, repr(text)
    assert "\n    " in text  # an indented body follows the signature


class Bigram:
    """A stand-in decoder whose next-token logits depend on the previous token only (exact p known)."""

    def __init__(self, table: np.ndarray):
        self.table = table
        self.reset()

    def reset(self):
        self.seq, self.calls = [], 0

    @property
    def length(self):
        return len(self.seq)

    def feed(self, tokens):
        self.seq += tokens
        self.calls += 1
        return np.stack([self.table[t] for t in tokens])

    def crop(self, n):
        self.seq = self.seq[:n]


def test_rejection_sampling_preserves_the_target_distribution():
    rng = np.random.default_rng(0)
    vocab = 4
    target = Bigram(np.log(rng.dirichlet(np.ones(vocab), vocab)))
    draft = Bigram(np.log(rng.dirichlet(np.ones(vocab) * 0.5, vocab)))  # a clearly different proposal
    p = np.exp(target.table)
    exact = np.array([[p[0, a] * p[a, b] for b in range(vocab)] for a in range(vocab)]).ravel()  # after token 0
    counts = np.zeros(vocab * vocab)
    n = 6000
    for seed in range(n):
        tokens = generate_speculative(target, draft, [0], 2, k=2, temperature=1.0, seed=seed).tokens
        counts[tokens[0] * vocab + tokens[1]] += 1
    chi2 = (((counts - n * exact) ** 2) / (n * exact)).sum()
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001
    # The draft alone would be told apart at once.
    q = np.exp(draft.table)
    draft_only = np.array([[q[0, a] * q[a, b] for b in range(vocab)] for a in range(vocab)]).ravel()
    assert (((n * draft_only - n * exact) ** 2) / (n * exact)).sum() > 1000


def test_bad_inputs(capsys, tmp_path, llama_pairs):
    save_config(tmp_path / "t", num_hidden_layers=2)
    save_config(tmp_path / "other_vocab", num_hidden_layers=1, vocab_size=100)
    (tmp_path / "broken_pair").mkdir()
    (tmp_path / "broken_pair" / MANIFEST).write_text("{not json")
    cases = [
        (["export", "spec-pair", "--target", str(tmp_path / "t"), "--draft", str(tmp_path / "other_vocab"), "-o",
          str(tmp_path / "p1")], ["vocab_size 100", "96"]),
        (["export", "spec-pair", "--target", str(tmp_path / "missing"), "--draft", "layer-skip:1", "-o",
          str(tmp_path / "p2")], ["missing", "does not exist"]),
        (["export", "spec-pair", "--target", str(tmp_path / "t"), "--draft", "layer-skip:5", "-o",
          str(tmp_path / "p3")], ["layer-skip:5"]),
        (["generate", str(llama_pairs["same"]), "--prompt-ids", "1,2", "--k", "0"], ["--k 0"]),
        (["generate", str(llama_pairs["same"]), "--prompt-ids", ",".join(["1"] * 120), "--max-new-tokens", "20"],
         ["120 tokens", "max length 128"]),
        (["generate", str(llama_pairs["same"]), "--prompt", "hello"], ["no tokenizer", "--prompt-ids"]),
        (["generate", str(tmp_path / "nowhere"), "--prompt-ids", "1"], ["nowhere", "does not exist"]),
        (["generate", str(llama_pairs["same"]), "--prompt-ids", "1,999"], ["999", "vocabulary"]),
        (["generate", str(llama_pairs["same"]), "--prompt-ids", "1,2", "--temperature", "nan"], ["--temperature nan"]),
        (["generate", str(tmp_path / "broken_pair"), "--prompt-ids", "1"], ["not valid JSON"]),
        (["generate", str(llama_pairs["same"]), "--prompt-ids", "1,2", "--mode", "lookahead", "--ngram", "0"],
         ["--ngram 0 must be >= 1"]),
        (["generate", str(llama_pairs["same"]), "--prompt-ids", "1,2", "--backend", "tensorrt"],
         ["has no engines", "edgetok build-engine"]),
        (["build-engine", str(llama_pairs["same"]), "-o", str(tmp_path / "x.engine")], ["drop -o/--shapes"]),
        (["profile", str(llama_pairs["same"]), "--pair", "--modes", "medusa"], ["--modes medusa", "offers"]),
    ]
    for args, needles in cases:
        code, out, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, *needles)
    assert not any((tmp_path / p).exists() for p in ("p1", "p2", "p3"))


def test_generate_and_pair_profile_cli(capsys, tmp_path, llama_pairs):
    code, out, err = run_cli(capsys, "generate", str(llama_pairs["same"]), "--prompt-ids", "1,2,3",
                             "--max-new-tokens", "12", "--k", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["new_tokens"] == 12 and result["acceptance_rate"] == 1.0
    code, out, err = run_cli(capsys, "profile", str(llama_pairs["layer_skip"]), "--pair", "--k", "3",
                             "--max-new-tokens", "16", "-o", str(tmp_path / "prof"))
    assert code == 0, err
    report = json.loads((tmp_path / "prof" / "pair_profile.json").read_text())
    assert report["greedy_outputs_identical"] is True
    spec = report["speculative"]
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["speedup"] > 0
    assert spec["mean_tokens_per_round"] == pytest.approx(1 + spec["mean_accepted_per_round"], rel=0.05)
    assert report["target_only"]["prefill_tokens_per_s"] > 0 and report["memory"]["peak_rss_mb"] > 0
    assert "| speculative k=3 |" in out and "| lookahead (4 branches, 16 tokens, n-gram 4) |" in out
    assert set(report["modes"]) == {"speculative", "lookahead", "prompt-lookup"}
    for mode in ("lookahead", "prompt-lookup"):  # draft-free rows: the target's own output, tokens per call >= 1
        row = report["modes"][mode]
        assert row["greedy_outputs_identical"] is True and row["mean_tokens_per_round"] >= 1 and row["speedup"] > 0


def test_a_target_alone_runs_draft_free(capsys, tmp_path, llama_pairs):
    """--draft none: the target and its tree variant only; lookahead and prompt lookup run, speculative is refused."""
    code, out, err = run_cli(capsys, "export", "spec-pair", "--target", str(llama_pairs["same"].parent / "target"),
                             "--draft", "none", "-o", str(tmp_path / "alone"))
    assert code == 0, err
    manifest = json.loads((tmp_path / "alone" / MANIFEST).read_text())
    assert manifest["draft"] is None and manifest["target"]["tree"]["file"] == "target/tree.onnx"
    assert not (tmp_path / "alone" / "draft").exists() and "no draft" in out
    results = {}
    for mode in ("target", "lookahead", "prompt-lookup"):
        code, out, err = run_cli(capsys, "generate", str(tmp_path / "alone"), "--prompt-ids", "5,17,3,5,17",
                                 "--max-new-tokens", "20", "--mode", mode, "--json")
        assert code == 0, err
        results[mode] = json.loads(out)
    assert results["lookahead"]["tokens"] == results["prompt-lookup"]["tokens"] == results["target"]["tokens"]
    assert results["lookahead"]["calls"]["draft"] == 0 and results["lookahead"]["draft_free"]["branches"] == 4
    code, out, err = run_cli(capsys, "generate", str(tmp_path / "alone"), "--prompt-ids", "5,17,3,5,17",
                             "--max-new-tokens", "20", "--json")  # no --mode: no draft, so lookahead
    assert code == 0, err
    assert json.loads(out)["mode"] == "lookahead" and json.loads(out)["tokens"] == results["target"]["tokens"]
    code, _, err = run_cli(capsys, "generate", str(tmp_path / "alone"), "--prompt-ids", "1,2", "--mode", "speculative")
    assert_one_line_error(code, err, "holds a target alone", "--mode lookahead")


def test_engines_refuse_to_run_without_a_gpu(llama_pairs, tmp_path):
    """The engine decoders need CUDA; on this CPU machine the refusal is one line (the builds are tested below)."""
    import shutil

    import torch

    from edgetok.errors import EdgetokError

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the engines can run")
    pair = tmp_path / "pair"
    shutil.copytree(llama_pairs["same"], pair)
    manifest = json.loads((pair / MANIFEST).read_text())
    manifest["engines"] = {"max_length": 128, "batch": [1, 1, 1], "target": {
        "file": "target/model.fp32.engine", "backend": {"name": "tensorrt-rtx", "version": "1"}}}
    (pair / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgetokError, match="runs on a CUDA GPU; this machine has none") as err:
        generate(str(pair), prompt_ids=[1, 2], max_new_tokens=4, mode="target", backend="tensorrt")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_tensorrt_rtx_builds_every_decoder_of_the_shipped_pair(capsys, tmp_path_factory):
    """build-engine PAIR: target, its tree variant and the draft, with the KV-cache profiles the manifest implies."""
    pytest.importorskip("tensorrt_rtx")
    if not (SHIPPED / "target" / "config.json").is_file():
        pytest.skip("the shipped pair is exported by tools/train_spec_pair.py")
    pair = tmp_path_factory.getbasetemp() / "shipped_pair"
    if not pair.exists():
        export_pair(str(SHIPPED / "target"), str(SHIPPED / "draft"), str(pair))
    code, out, err = run_cli(capsys, "build-engine", str(pair), "--backend", "tensorrt-rtx", "--k", "5")
    assert code == 0, err
    manifest = json.loads((pair / MANIFEST).read_text())
    engines, length = manifest["engines"], manifest["max_length"]
    assert engines["max_length"] == length and set(engines) >= {"target", "target_tree", "draft"}
    for role, query_opt in (("target", 6), ("target_tree", 17), ("draft", 1)):
        assert (pair / engines[role]["file"]).is_file()
        profile = {p["name"]: p for p in engines[role]["profiles"][0]}
        entry = manifest["draft" if role == "draft" else "target"]
        key = profile["past_key_values.0.key"]
        assert key["min"] == [1, entry["num_key_value_heads"], 0, entry["head_size"]]
        assert key["max"] == [1, entry["num_key_value_heads"], length - 1, entry["head_size"]]
        assert profile["input_ids"]["opt"] == [1, query_opt] and profile["input_ids"]["max"] == [1, length]
        report = json.loads((pair / (engines[role]["file"] + ".build.json")).read_text())
        assert report["network_outputs"][0]["shape"] == [-1, -1, manifest["vocab_size"]]
    assert profile["attention_mask"]["max"] == [1, length]
    tree = {p["name"]: p for p in engines["target_tree"]["profiles"][0]}["attention_mask"]
    assert tree["max"] == [1, 1, length, length] and "built 3 engines" in out
    # fp16: onnxconverter-common's conversion of these decoders is a graph ONNX Runtime rejects, so pairs are refused
    # before any work, in one line, and the fp32 engines and their record stay as they were.
    code, _, err = run_cli(capsys, "build-engine", str(pair), "--backend", "tensorrt-rtx", "--precision", "fp16")
    assert_one_line_error(code, err, "--precision fp16", "fp32 engines only")
    assert json.loads((pair / MANIFEST).read_text())["engines"] == engines


def test_pair_with_other_tokenizer_of_same_size_is_refused(capsys, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    for name, prefix in [("t", "a"), ("d", "b")]:
        save_config(tmp_path / name, num_hidden_layers=1)
        vocab = {f"{prefix}{i}": i for i in range(96)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=f"{prefix}0")))
        tok.save_pretrained(tmp_path / name)
    code, out, err = run_cli(capsys, "export", "spec-pair", "--target", str(tmp_path / "t"), "--draft",
                             str(tmp_path / "d"), "-o", str(tmp_path / "pair"))
    assert_one_line_error(code, err, "different tokenizers")
    assert not (tmp_path / "pair").exists()


def test_proposals_cut_by_eos_are_not_counted_as_accepted():
    table = np.full((4, 4), -10.0)
    table[0, 1] = table[1, 2] = table[2, 3] = table[3, 0] = 0.0  # both models: 0 -> 1 -> 2 -> 3 -> 0
    gen = generate_speculative(Bigram(table), Bigram(table.copy()), [0], 10, k=8, eos=2)
    assert gen.tokens == [1, 2]  # stops at EOS
    assert gen.accepted == 2 and gen.proposed == 8  # 8 proposed, only the 2 emitted count
