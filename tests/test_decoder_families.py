"""Every common Hugging Face decoder family exports as a KV-cache decoder that passes the phase checks (prefill,
decode, verify, crop-and-continue, unseen batch and lengths, and the tree-verify variant), scores a tree as it
scores each branch alone, and generates losslessly: speculative, lookahead and prompt lookup all equal the
target's own greedy output. The ALiBi families (BLOOM, MPT, Falcon with alibi=True) take every key's position
from the cache and position_ids, so a tree node is biased by its depth. Families that cannot be exported are
refused in one line naming the type and the reason."""

import numpy as np
import pytest
import torch
from cli_assertions import assert_one_line_error, run_cli
from transformers import (
    BloomConfig,
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MambaConfig,
    MistralConfig,
    MptConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from edgetok.llm.decoder import CausalLM, DecoderWithCache, DecoderWithTree, attention
from edgetok.llm.pair import export_pair
from edgetok.llm.kv_decoder import tree_inputs
from edgetok.llm.runtime import (
    generate_draft_free,
    generate_speculative,
    generate_target,
    open_decoder,
    open_pair,
)

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
    # Falcon-7B's layout (rotary, multi-query: one cached head), Falcon-40B/Falcon2-11B's (new_decoder_architecture,
    # its keys broadcast to every head before caching) and Falcon-RW-1B's (ALiBi, one cached head per head)
    "falcon": (FalconConfig, dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2)),
    "falcon_new_arch": (FalconConfig, dict(hidden_size=32, num_attention_heads=4, num_kv_heads=2,
                                           num_hidden_layers=2, new_decoder_architecture=True)),
    "falcon_alibi": (FalconConfig, dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, alibi=True,
                                        multi_query=False, parallel_attn=False)),
    "bloom": (BloomConfig, dict(hidden_size=32, n_head=4, n_layer=2)),
    "mpt": (MptConfig, dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=128)),
}
ALIBI = ("falcon_alibi", "bloom", "mpt")


def _config(cls, kw):
    kw = {**COMMON, **kw}
    if cls in (GPT2Config, BloomConfig, MptConfig):  # n_positions; none (ALiBi); max_seq_len
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


def test_a_tree_call_scores_each_branch_as_run_alone(family_pair):
    """One tree call equals the plain decoder run on each branch by itself, and the cache kept for the accepted
    path is that branch's own: for ALiBi the bias must follow a node's depth, not its index in the tree."""
    name, pair, _ = family_pair
    manifest, target, _ = open_pair(str(pair))
    tree = open_decoder(str(pair), manifest, "target_tree")
    prompt = [5, 17, 3, 88, 41, 7]
    parents, tokens = [-1, -1, 0, 2, 1], [11, 12, 13, 14, 15]  # root 9; 11, 12 under it; 13 under 11; ...
    for d in (target, tree):
        d.reset()
        d.feed(prompt)
    got = tree.feed_tree(9, tokens, parents)
    for path in ([0, 2, 3], [1, 4]):
        target.crop(len(prompt))
        want = target.feed([9, *[tokens[i] for i in path]])
        assert np.abs(got[[0, *[i + 1 for i in path]]] - want).max() < 1e-5, name
    tree.keep(list(range(len(prompt) + 1)) + [len(prompt) + 1 + i for i in (1, 4)])  # accept 12, 15
    target.crop(len(prompt))
    target.feed([9, 12, 15])
    assert np.abs(tree.feed([14]) - target.feed([14])).max() < 1e-5, name


def _lm(name):
    cls, kw = FAMILIES[name]
    config = _config(cls, kw)
    config._attn_implementation = attention(config)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return CausalLM(AutoModelForCausalLM.from_config(config).eval(), name, "random")


@pytest.mark.parametrize("name", ALIBI)
def test_alibi_tree_in_pytorch_follows_depth_where_transformers_does_not(name):
    """transformers given the tree's 4-D mask: BLOOM and Falcon stop, MPT biases nodes by their index (wrong);
    ours equals transformers on each branch alone."""
    lm = _lm(name)
    ours, theirs = DecoderWithTree(lm), DecoderWithCache(lm, reference=True)
    prompt = torch.tensor([[5, 17, 3, 88]])
    with torch.no_grad():
        _, *cache = theirs(prompt, torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None])
        parents, tokens = [-1, -1, 1, 1], [11, 12, 13, 14]  # root 9; 11 and 12 under it; 13, 14 under 12
        mask, positions = tree_inputs(4, parents)
        ids = torch.tensor([[9, *tokens]])
        got = ours(ids, torch.from_numpy(mask), torch.from_numpy(positions)[None], *cache)[0][0]
        for path in ([0], [1, 2], [1, 3]):
            branch = torch.tensor([[9, *[tokens[i] for i in path]]])
            n = branch.shape[1]
            want = theirs(branch, torch.ones(1, 4 + n, dtype=torch.long), torch.arange(4, 4 + n)[None], *cache)[0][0]
            assert (got[[0, *[i + 1 for i in path]]] - want).abs().max() < 1e-5
        additive = torch.zeros(mask.shape).masked_fill(torch.from_numpy(~mask), torch.finfo(torch.float32).min)
        if name == "mpt":
            plain = theirs(ids, additive, torch.from_numpy(positions)[None], *cache)[0][0]
            assert (plain[4] - got[4]).abs().max() > 1e-3  # node 14 at index 4, depth 2: transformers is off
        else:
            with pytest.raises(ValueError):
                theirs(ids, additive, torch.from_numpy(positions)[None], *cache)


@pytest.mark.parametrize("name", ALIBI)
def test_alibi_with_left_padding_equals_transformers(name):
    """A padded batch: the cache's positions come from the mask by the family's own rule (BLOOM, Falcon: the
    unmasked keys before it; MPT: the index), the new tokens' from position_ids by the same rule."""
    lm = _lm(name)
    ours, theirs = DecoderWithCache(lm), DecoderWithCache(lm, reference=True)
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    index = name == "mpt"
    pos = (torch.arange(5).expand(2, 5) if index else (mask.cumsum(1) - 1) * mask).contiguous()
    with torch.no_grad():
        got, *cache = ours(ids, mask, pos)
        want, *ref_cache = theirs(ids, mask, pos)
        assert (got[0, 2:] - want[0, 2:]).abs().max() < 1e-5 and (got[1] - want[1]).abs().max() < 1e-5
        step = torch.tensor([[10, 11], [12, 13]])
        mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
        pos = (torch.arange(5, 7).expand(2, 2) if index else pos[:, -1:] + torch.arange(1, 3)).contiguous()
        got = ours(step, mask, pos, *cache)[0]
        want = theirs(step, mask, pos, *ref_cache)[0]
        assert (got - want).abs().max() < 1e-5


def test_falcon_alibi_biases_once_as_falcon_rw_does():
    """Falcon-RW's attention (the authors' modelling_RW.py): softmax((QK^T + alibi) / sqrt(d) + mask) V, the bias
    added once. transformers 5.24's eager path adds it a second time through the mask, so Falcon with ALiBi is
    loaded with its SDPA path; here one layer's attention, as loaded, against that formula written out."""
    lm = _lm("falcon_alibi")
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    layer = lm.model.transformer.h[0].self_attention
    seen = {}
    layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out[0]))
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([[5, 17, 3, 88, 41, 7]]))
        q, k, v = (t.transpose(1, 2) for t in layer._split_heads(layer.query_key_value(seen["x"])))
        n, d = q.shape[2], q.shape[3]
        alibi = build_alibi_tensor(torch.ones(1, n, dtype=torch.long), 4, torch.float32).view(1, 4, 1, n)
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = ((q @ k.transpose(-1, -2) + alibi) / d**0.5).masked_fill(future, float("-inf"))
        want = layer.dense((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, n, 4 * d))
    assert lm.model.config._attn_implementation == "sdpa"
    assert (seen["out"] - want).abs().max() < 1e-5


def test_falcon_caches_the_heads_its_attention_stores():
    """The root cause of "Sizes of tensors must match ... Expected size 4 but got size 1": the cache's heads were
    guessed from config names (Falcon has no num_key_value_heads); they are now read from the model."""
    assert _lm("falcon").kv_heads == 1  # multi_query
    assert _lm("falcon_new_arch").kv_heads == 4  # keys broadcast to every head before caching
    assert _lm("falcon_alibi").kv_heads == 4 and _lm("falcon_alibi").head_size == 8


def test_a_family_without_position_ids_is_refused_in_one_line(capsys, tmp_path):
    MambaConfig(vocab_size=96, hidden_size=32, state_size=4, num_hidden_layers=2).save_pretrained(tmp_path / "mamba")
    code, _, err = run_cli(capsys, "export", "spec-pair", "--target", str(tmp_path / "mamba"), "--draft", "none",
                           "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "mamba cannot be exported as a KV-cache decoder: its forward takes no position_ids")
    assert not (tmp_path / "out").exists()
