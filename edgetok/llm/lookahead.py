"""Draft-free drafts: Lookahead's trie-based retrieval (Zhao et al., Ant Group, PainlessInferenceAcceleration) and
prompt lookup (Hugging Face's ``prompt_lookup_num_tokens``), its single-branch special case.

Both propose from the tokens seen so far (prompt and output), so they need no draft model; the target verifies
every proposal in one forward and keeps only what it would have generated itself (runtime.py), so the output is
the target's. A draft is a token tree: ``tokens[i]`` hangs under ``parents[i]`` (-1: under the last token of the
sequence, the root the verify call feeds first).

Lookahead's index: after every key of 1..``ngram`` consecutive tokens, the continuations that followed it, up to
``depth`` tokens, merged into one trie per key with a count on every node (how many occurrences pass through it).
To draft, the longest key the sequence ends with picks a trie; its most frequent nodes (equal counts: the one seen
first) are taken best-first, at most ``branches`` leaves and ``depth`` nodes in all.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class Tree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # index into tokens, -1 = the root (last token of the sequence)

    def __len__(self) -> int:
        return len(self.tokens)

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depth(self, i: int) -> int:
        d = 1
        while self.parents[i] >= 0:
            i, d = self.parents[i], d + 1
        return d

    def children(self, i: int) -> list[int]:
        return [j for j, p in enumerate(self.parents) if p == i]


class _Node:
    __slots__ = ("count", "order", "children")

    def __init__(self, order: int):
        self.count, self.order, self.children = 0, order, {}


class TrieIndex:
    """Lookahead's n-gram trie over one sequence, extended as tokens arrive."""

    def __init__(self, ngram: int, depth: int):
        self.ngram, self.depth = ngram, depth
        self.seq: list[int] = []
        self.roots: dict[tuple[int, ...], _Node] = {}
        self.filled: dict[tuple[int, int], int] = {}  # (key length, start) -> continuation tokens inserted so far
        self._order = 0

    def _node(self, parent: _Node, token: int) -> _Node:
        child = parent.children.get(token)
        if child is None:
            self._order += 1
            child = parent.children[token] = _Node(self._order)
        return child

    def extend(self, tokens: list[int]) -> None:
        """Append tokens; every continuation that can grow, grows (a node is counted once per occurrence)."""
        old = len(self.seq)
        self.seq += tokens
        for start in range(max(1, old - self.depth), len(self.seq)):  # continuations starting here may grow
            for m in range(1, min(self.ngram, start) + 1):
                done = self.filled.get((m, start), 0)
                end = min(start + self.depth, len(self.seq))
                if start + done >= end:
                    continue
                key = tuple(self.seq[start - m:start])
                node = self.roots.setdefault(key, _Node(0))
                for t in self.seq[start:start + done]:  # walk what was inserted before
                    node = node.children[t]
                for t in self.seq[start + done:end]:
                    node = self._node(node, t)
                    node.count += 1
                self.filled[(m, start)] = end - start

    def draft(self, branches: int, budget: int) -> Tree:
        """The tree for the sequence's current end (empty if no key matches)."""
        tree = Tree()
        for m in range(min(self.ngram, len(self.seq)), 0, -1):
            root = self.roots.get(tuple(self.seq[-m:]))
            if root is not None and root.children:
                break
        else:
            return tree
        heap = [(-c.count, c.order, t, c, -1) for t, c in root.children.items()]
        heapq.heapify(heap)
        leaves, has_child = 0, set()
        while heap and len(tree) < budget:
            _, _, token, node, parent = heapq.heappop(heap)
            if parent in has_child or leaves == 0:  # a new leaf
                if leaves >= branches:
                    continue
                leaves += 1
            has_child.add(parent)
            tree.tokens.append(token)
            tree.parents.append(parent)
            index = len(tree) - 1
            for t, c in node.children.items():
                heapq.heappush(heap, (-c.count, c.order, t, c, index))
        return tree


def prompt_lookup(seq: list[int], ngram: int, tokens: int) -> Tree:
    """Hugging Face's prompt lookup: the sequence's last n tokens (n = ngram down to 1) found earlier in it (the
    first occurrence), and the ``tokens`` that followed it there, as one chain."""
    for n in range(min(ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n):
            if seq[start:start + n] == tail:
                follow = seq[start + n:start + n + tokens]
                if follow:
                    return Tree(follow, list(range(-1, len(follow) - 1)))
    return Tree()
