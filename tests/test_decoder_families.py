"""Every common Hugging Face decoder family exports as a KV-cache decoder that passes the phase checks (prefill,
decode, verify, crop-and-continue, unseen batch and lengths, and the tree-verify variant), and generates
losslessly: speculative, lookahead and prompt lookup all equal the target's own greedy output. Families that
cannot be exported are refused in one line naming the type and the reason."""

import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from transformers import (
    BloomConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from edgetok.llm.pair import export_pair
from edgetok.llm.runtime import generate_draft_free, generate_speculative, generate_target, open_decoder, open_pair

COMMON = dict(vocab_size=96, max_position_embeddings=128)
ROPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
FAMILIES = {
    "llama": (LlamaConfig, ROPE),
    "qwen2": (Qwen2Config, ROPE),
    "qwen3": (Qwen3Config, {**ROPE, "head_dim": 8}),
    "mistral": (MistralConfig, {**ROPE, "sliding_window": None}),
    "phi3": (Phi3Config, {**ROPE, "pad_token_id": 0}),
    "gemma": (GemmaConfig, {**ROPE, "head_dim": 8}),
    "gpt_neox": (GPTNeoXConfig, dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                     num_hidden_layers=2)),
    "gpt2": (GPT2Config, dict(n_embd=32, n_head=4, n_layer=2, n_positions=128, vocab_size=96)),
    "opt": (OPTConfig, dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
                            word_embed_proj_dim=32)),
}


def _config(cls, kw):
    kw = {**COMMON, **kw}
    if cls is GPT2Config:
        kw.pop("max_position_embeddings")
    return cls(**kw)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pair(request, tmp_path_factory):
    cls, kw = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    _config(cls, kw).save_pretrained(root / "target")
    manifest = export_pair(str(root / "target"), "layer-skip:1", str(root / "pair"))
    return request.param, root / "pair", manifest


def test_every_phase_matches_pytorch(family_pair):
    _, _, manifest = family_pair
    for checks in (manifest["target"]["validation"], manifest["draft"]["validation"],
                   manifest["target"]["tree"]["validation"]):
        assert set(checks["max_abs_diff"]) == {"prefill", "decode", "verify_k+1", "crop_and_continue", "other_shapes"}
        assert max(checks["max_abs_diff"].values()) < 1e-4


def test_generation_is_the_targets_greedy(family_pair):
    _, pair, _ = family_pair
    manifest, target, draft = open_pair(str(pair))
    tree = open_decoder(str(pair), manifest, "target_tree")
    prompt = [5, 17, 3, 88, 41, 5, 17, 3]
    want = generate_target(target, prompt, 24).tokens
    assert generate_speculative(target, draft, prompt, 24, 3).tokens == want
    assert generate_draft_free(tree, prompt, 24, "lookahead", 2, 3, 6).tokens == want
    assert generate_draft_free(target, prompt, 24, "prompt-lookup", 2, 1, 4).tokens == want


def test_a_family_without_position_ids_is_refused_in_one_line(capsys, tmp_path):
    BloomConfig(vocab_size=96, hidden_size=32, n_head=4, n_layer=2).save_pretrained(tmp_path / "bloom")
    code, _, err = run_cli(capsys, "export", "spec-pair", "--target", str(tmp_path / "bloom"), "--draft", "none",
                           "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "bloom cannot be exported as a KV-cache decoder")
    assert not (tmp_path / "out").exists()
