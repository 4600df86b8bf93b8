"""Draft-free drafts: Lookahead's n-gram trie and prompt lookup (what they propose), and their verification (the
output is the target's: greedy equals target greedy, sampling follows the target's distribution)."""

import numpy as np
from test_spec_decoding import Bigram

from edgetok.llm.lookahead import Tree, TrieIndex, prompt_lookup
from edgetok.llm.runtime import generate_draft_free


def test_the_trie_proposes_the_most_frequent_continuations_best_first():
    """After the key (1, 2): 3 9 1, 4 9 1, 3 7 1. Count 2 for 3 first, then the earliest-seen nodes of count 1."""
    index = TrieIndex(ngram=2, depth=3)
    index.extend([1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 3, 7])
    index.extend([1, 2])  # arriving later extends the continuations that were still short
    tree = index.draft(branches=2, budget=5)
    assert (tree.tokens, tree.parents) == ([3, 9, 1, 4, 9], [-1, 0, 1, -1, 3])
    one = index.draft(branches=1, budget=8)  # a single branch: the chain of most frequent nodes
    assert (one.tokens, one.parents) == ([3, 9, 1], [-1, 0, 1])


def test_the_longest_matching_key_wins_and_no_match_gives_nothing():
    index = TrieIndex(ngram=3, depth=2)
    index.extend([7, 1, 2, 5, 6, 8, 2, 4])
    index.extend([1, 2])  # (7, 1, 2) never seen; (1, 2) was, followed by 5 6
    assert index.draft(4, 8).tokens == [5, 6]
    index = TrieIndex(ngram=3, depth=2)
    index.extend([1, 2, 3])
    assert len(index.draft(4, 8)) == 0  # 3 never came before anything


def test_prompt_lookup_is_hugging_faces():
    """The tail's first earlier occurrence, longest n-gram first; nothing without one; short prompts work."""
    chain = prompt_lookup([5, 6, 7, 8, 5, 6], ngram=2, tokens=3)
    assert (chain.tokens, chain.parents) == ([7, 8, 5], [-1, 0, 1]) and chain.is_chain()
    assert len(prompt_lookup([1, 2, 3], 2, 3)) == 0
    assert len(prompt_lookup([4], 3, 3)) == 0  # shorter than the n-gram, nothing earlier
    assert prompt_lookup([4, 4], 3, 3).tokens == [4]


class TreeBigram(Bigram):
    """test_spec_decoding's bigram stand-in, with the tree call and the row gather of a tree-variant decoder."""

    tree = True

    def feed(self, tokens):
        return self.feed_tree(tokens[0], tokens[1:], list(range(-1, len(tokens) - 2)))

    def feed_tree(self, root, tokens, parents):
        return super().feed([root, *tokens])

    def keep(self, rows):
        self.seq = [self.seq[i] for i in rows]


def test_greedy_is_the_targets_own_output():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((6, 6))
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]

    def target_greedy(n):
        seq = list(prompt)
        for _ in range(n):
            seq.append(int(table[seq[-1]].argmax()))
        return seq[len(prompt):]

    for mode in ("lookahead", "prompt-lookup"):
        for ngram, branches, tokens in ((1, 1, 1), (2, 3, 6), (4, 4, 16)):
            got = generate_draft_free(TreeBigram(table), prompt, 20, mode, ngram, branches, tokens)
            assert got.tokens == target_greedy(20), (mode, ngram, branches, tokens)
            assert got.rounds <= 20


def test_sampling_follows_the_targets_distribution():
    """Two sampled tokens after a prompt whose trie proposes several branches: chi-square against the exact
    bigram probabilities."""
    rng = np.random.default_rng(0)
    vocab = 4
    table = np.log(rng.dirichlet(np.ones(vocab), vocab))
    p = np.exp(table)
    prompt = [0, 1, 0, 2, 0, 3, 0, 1, 0]
    exact = np.array([[p[0, a] * p[a, b] for b in range(vocab)] for a in range(vocab)]).ravel()
    counts = np.zeros(vocab * vocab)
    n = 6000
    for seed in range(n):
        tokens = generate_draft_free(TreeBigram(table), prompt, 2, "lookahead", 2, 4, 8, temperature=1.0,
                                     seed=seed).tokens
        counts[tokens[0] * vocab + tokens[1]] += 1
    chi2 = (((counts - n * exact) ** 2) / (n * exact)).sum()
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001


def test_the_tree_helpers():
    tree = Tree([3, 9, 1, 4], [-1, 0, 1, -1])
    assert [tree.depth(i) for i in range(4)] == [1, 2, 3, 1]
    assert tree.children(-1) == [0, 3] and not tree.is_chain()


def test_the_tree_mask_and_positions():
    """Root 0; 1 and 2 under the root; 3 under 1; 4 under 3: each row sees the cache, itself and its ancestors."""
    from edgetok.llm.kv_decoder import tree_inputs

    mask, positions = tree_inputs(2, [-1, -1, 0, 2])
    rows = [[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 1, 0],
            [1, 1, 1, 1, 0, 1, 1]]
    assert mask.shape == (1, 1, 5, 7) and mask.dtype == bool and mask[0, 0].astype(int).tolist() == rows
    assert positions.tolist() == [2, 3, 3, 4, 5]
