"""How an image enters a LLaVA prompt: each image token, or each run of them (a processor that already expanded
``<image>`` to the dense count), becomes that image's visual tokens, one position each, numbered on from the
text before it; the decoder then takes the prompt's embeddings with those rows replaced by the image's.

Kept free of torch and ONNX Runtime: the runtime checks a prompt in a few milliseconds before anything loads, and
the export's pipeline check builds its prompts the same way.
"""

from __future__ import annotations

import numpy as np

from edgetok.errors import EdgetokError

SPLICE = ("each image token in the prompt (or a run of them) is replaced by the image's visual tokens, positions "
          "sequential; the decoder takes the prompt's embeddings with those rows replaced by the image's")


def image_runs(ids: list[int], image_token: int) -> list[tuple[int, int]]:
    """(start, length) of every run of ``image_token`` in ``ids``."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if t != image_token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def check_prompt(ids: list[int], image_token: int, images: int) -> None:
    """One image per run of image tokens: refused in one line naming the id otherwise."""
    runs = len(image_runs(ids, image_token))
    if runs == images:
        return
    if runs == 0:
        raise EdgetokError(f"the prompt holds no image token (id {image_token}) for --image; put it where the image "
                           f"goes, e.g. --prompt-ids 1,{image_token},5,6 (or <image> in --prompt)")
    raise EdgetokError(f"the prompt holds {runs} separate image tokens (id {image_token}) but {images} image was given; "
                       "give one image token (or one run of them) per image")


def expand(ids: list[int], image_token: int, counts: list[int]) -> tuple[list[int], np.ndarray]:
    """The prompt with run i of image tokens replaced by ``counts[i]`` image tokens, and for each position of it
    the visual row it takes (rows of all images concatenated in order; -1: the token's own embedding)."""
    check_prompt(ids, image_token, len(counts))
    out: list[int] = []
    rows: list[int] = []
    at, first = 0, 0
    for (start, length), count in zip(image_runs(ids, image_token), counts):
        out += ids[at:start]
        rows += [-1] * (start - at)
        out += [image_token] * count
        rows += range(first, first + count)
        first += count
        at = start + length
    out += ids[at:]
    rows += [-1] * (len(ids) - at)
    return out, np.asarray(rows, np.int64)


def splice(embeds: np.ndarray, positions: np.ndarray, rows_at: np.ndarray, visual: np.ndarray) -> np.ndarray:
    """``embeds`` [1, S, H] of the tokens at ``positions`` [S], with every position that holds a visual row
    (``rows_at``, from ``expand``) given that row of ``visual`` [rows, H]; positions past the prompt (generated
    tokens, proposals) keep their own embeddings."""
    inside = positions < len(rows_at)
    which = np.full(len(positions), -1, np.int64)
    which[inside] = rows_at[positions[inside]]
    take = which >= 0
    if not take.any():
        return embeds
    embeds = embeds.copy()
    embeds[0, take] = visual[which[take]]
    return embeds
