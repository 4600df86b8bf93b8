"""What every decoder backend shares (ONNX Runtime's ``OrtDecoder`` in ``edgetok.llm.runtime``, the engines'
``TrtDecoder`` in ``edgetok.llm.trt_decoder``): the calls a generation makes on a KV-cached decoder, and the
tree variant's mask and positions.

Why a module of its own: ``runtime`` opens a TensorRT decoder when asked (``open_decoder``), so the base class
cannot live there without ``runtime`` and ``trt_decoder`` importing each other.
"""

from __future__ import annotations

import numpy as np

from edgetok.errors import EdgetokError


def tree_inputs(past: int, parents: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The tree variant's mask [1, 1, q, past + q] (row i: the cache, the root, i's ancestors and i) and
    positions [q] (past + depth) for the root and the nodes under ``parents`` (-1: the root; parents first)."""
    n = 1 + len(parents)
    seen = np.eye(n, dtype=bool)
    depth = np.zeros(n, np.int64)
    for i, parent in enumerate(parents, start=1):
        seen[i] |= seen[parent + 1]  # the parent's row already holds the parent and its ancestors
        depth[i] = depth[parent + 1] + 1
    return np.concatenate([np.ones((n, past), bool), seen], axis=1)[None, None], past + depth


class Decoder:
    """What every decoder backend shares: the calls a generation makes, built on the backend's ``_run``
    (tokens, mask, positions -> logits, the cache grown), ``_empty`` cache, ``crop`` and ``keep``."""

    tree: bool  # the tree variant: a boolean [B, 1, q, past + q] mask, explicit positions
    cache: list

    def reset(self) -> None:
        self.cache = [self._empty()] * (2 * self.layers)
        self.calls, self.seconds = 0, 0.0

    @property
    def length(self) -> int:
        return self.cache[0].shape[2]

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Run the tokens the cache lacks; returns their logits [len(tokens), vocab]; the cache grows."""
        n, past = len(tokens), self.length
        if self.tree:  # a chain is the tree whose every token hangs under the one before
            return self.feed_tree(tokens[0], tokens[1:], list(range(-1, n - 2)))
        return self._run(tokens, np.ones((1, past + n), np.int64), np.arange(past, past + n, dtype=np.int64))

    def feed_tree(self, root: int, tokens: list[int], parents: list[int]) -> np.ndarray:
        """One call for a token tree: ``root`` (the token the cache lacks) then ``tokens``, each under
        ``parents[i]`` (-1: the root); every row sees the cache, itself and its ancestors. Returns the logits
        [1 + len(tokens), vocab]; the cache grows by all of them (``keep`` picks the accepted path's rows)."""
        if not self.tree:
            raise EdgetokError("this decoder was exported without the tree mask (target/tree.onnx); export the pair "
                               "again to verify several branches in one call")
        mask, positions = tree_inputs(self.length, parents)
        return self._run([root, *tokens], mask, positions)

    def _tokens_in(self, tokens: list[int], positions: np.ndarray) -> dict:
        """The feed for the tokens themselves (``_run`` adds the mask, positions and cache); a VLM's decoder
        (edgetok.vlm.runtime) feeds their embeddings, with the image's rows spliced in, instead."""
        return {"input_ids": np.array([tokens], np.int64)}

    def _record(self, tokens: int, seconds: float) -> None:
        self.seconds += seconds
        self.calls += 1
        self.history.append((tokens, seconds))
