"""TokenPrune: drop the tokens a per-token decision rejects, keeping the rest in order (data-dependent K).

Inputs: tokens ``x`` [B, N, C] float32, token sizes ``size`` [B, N, 1] float32 and the decision ``keep``
[B, N] float32 (nonzero = keep). Field ``prefix`` (default 1). Token j of image b is kept iff j < prefix, or
keep[b, j] != 0 and size[b, j] > 0: padding rows of an earlier data-dependent step (size 0) never come back.
Both comparisons are IEEE ones (so -0.0 is zero and a denormal is not; NaN keeps, a NaN size drops).
Outputs: the kept tokens in their original order ``pruned`` [B, K, C], their sizes ``pruned_size``
[B, K, 1] and ``count``, a 0-d int64 size tensor holding K = the batch maximum of kept tokens per image.
Rows past an image's own count are padding: x = 0, size = 0 (so a later step drops them). TensorRT is told
opt = upper = N for K: N is a sound bound, and planning for fewer would only help when most tokens go.
"""

from __future__ import annotations

import numpy as np

from edgetok.plugins.declaration import Dynamic, Field, PluginError, PluginSpec, Tensor, reference, register


def kept_mask(size: np.ndarray, keep: np.ndarray, prefix: int) -> np.ndarray:
    """[B, N] bool: which tokens stay."""
    tokens = keep.shape[1]
    return (np.arange(tokens) < prefix)[None, :] | ((keep != 0) & (size[..., 0] > 0))


def _output_shapes(dims: list[list], f: dict) -> list[list]:
    (batch, tokens, channels), _, _ = dims
    kept = Dynamic(size_output=2, opt=tokens, upper=tokens)
    return [[batch, kept, channels], [batch, kept, 1], []]


def _check(shapes: list[tuple[int, ...]], f: dict) -> None:
    (batch, tokens, _), size, keep = shapes
    if f["prefix"] < 0 or f["prefix"] > tokens:
        raise PluginError(f"TokenPrune: prefix={f['prefix']} must be between 0 and the {tokens} tokens; export with "
                          "the model's number of class/register tokens")
    if size != (batch, tokens, 1) or keep != (batch, tokens):
        raise PluginError(f"TokenPrune: size {list(size)} and keep {list(keep)} must be [{batch}, {tokens}, 1] and "
                          f"[{batch}, {tokens}] for tokens [{batch}, {tokens}, C]")


def _cases(rng: np.random.Generator) -> list[tuple[str, list[np.ndarray], dict]]:
    """Random decisions, and the edges: everything kept, only the prefix, signed zeros and denormals as
    decisions, padding rows (size 0) asked to be kept, images of one batch keeping different counts, B = 1,
    N over one scan tile and a DeiT-S sized step."""
    def call(batch, tokens, channels, p=0.5):
        x = rng.standard_normal((batch, tokens, channels)).astype(np.float32)
        size = rng.integers(1, 5, (batch, tokens, 1)).astype(np.float32)
        p = np.broadcast_to(np.asarray(p, np.float64).reshape(-1, 1), (batch, 1))
        keep = (rng.random((batch, tokens)) < p).astype(np.float32) * rng.choice([1.0, -2.5, 0.25], (batch, tokens))
        return [x, size, keep.astype(np.float32)]

    cases = [(f"random N={n} prefix={prefix}", call(3, n, 40), {"prefix": prefix})
             for n, prefix in ((17, 1), (18, 2), (16, 0), (21, 5))]
    x, size, keep = call(2, 17, 24)
    cases.append(("all kept", [x, size, np.full_like(keep, 3.0)], {"prefix": 1}))
    cases.append(("all kept by prefix", [x, size, np.zeros_like(keep)], {"prefix": 17}))
    signed = np.array([0.0, -0.0, 0.0, -0.0], np.float32)
    cases.append(("only prefix kept (+0.0/-0.0)", [x, size, np.resize(signed, keep.shape).reshape(keep.shape)],
                  {"prefix": 2}))
    cases.append(("nothing kept, prefix 0", [x, size, -np.zeros_like(keep)], {"prefix": 0}))
    tiny = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-40, 1.0, np.nan], np.float32)  # denormals are nonzero
    cases.append(("signed zeros and denormals", [x, size, rng.choice(tiny, keep.shape).astype(np.float32)],
                  {"prefix": 1}))
    x, size, keep = call(3, 20, 16, 0.7)
    size[0, 12:] = 0.0  # padding rows of an earlier step: dropped even when the decision says keep
    size[1, 5:] = -0.0
    size[2, 3::2] = 0.0
    size[2, 4::4] = 1e-45  # a positive denormal size is a real token
    x[size[..., 0] == 0] = 0.0
    keep[:, 10:] = 1.0
    cases.append(("padding rows in the input", [x, size, keep], {"prefix": 1}))
    cases.append(("batch with different counts", call(4, 25, 12, [0.1, 0.4, 0.7, 1.0]), {"prefix": 1}))
    cases.append(("B=1", call(1, 17, 40), {"prefix": 1}))
    cases.append(("N=300 over one scan tile", call(2, 300, 8, [0.3, 0.8]), {"prefix": 1}))
    cases.append(("deit-s N=197 C=384", call(2, 197, 384, 0.5), {"prefix": 1}))
    return cases


def _intermediates(inputs: list[np.ndarray], f: dict) -> dict[str, list[np.ndarray]]:
    """Per image: the source token of each of its live output rows, and how many there are."""
    _, size, keep = inputs
    kept = kept_mask(size, keep, f["prefix"])
    return {"sources": [np.flatnonzero(k).astype(np.int32) for k in kept],
            "counts": [np.array([k.sum()], np.int32) for k in kept]}


SPEC = register(PluginSpec(
    name="TokenPrune",
    doc="drop the tokens a per-token decision rejects, in order; K (batch max kept) is a data-dependent dim",
    fields=(Field("prefix", int, 1, "tokens in front always kept (class, distillation, registers)"),),
    inputs=(
        Tensor("x", 3, "tokens [B, N, C]"),
        Tensor("size", 3, "patches each token stands for [B, N, 1]; 0 marks padding"),
        Tensor("keep", 2, "decision per token [B, N]: nonzero keeps it"),
    ),
    outputs=(
        Tensor("pruned", 3, "kept tokens [B, K, C], zero rows past an image's own count"),
        Tensor("pruned_size", 3, "their sizes [B, K, 1], 0 for padding rows"),
        Tensor("count", 0, "K, the batch maximum of kept tokens", dtypes=("int64",), size_tensor=True),
    ),
    output_shapes=_output_shapes,
    check=_check,
    kernels="token_prune",
    cases=_cases,
    intermediates=_intermediates,
    margins=None,  # its decisions are IEEE comparisons of its inputs, no arithmetic: exact on a GPU too
))


@reference("TokenPrune")
def token_prune(x: np.ndarray, size: np.ndarray, keep: np.ndarray, prefix: int):
    """Gather the kept rows of each image to the front of a zero-filled [B, K, .] output."""
    batch, _, channels = x.shape
    kept = kept_mask(size, keep, prefix)
    counts = kept.sum(axis=1)
    most = int(counts.max(initial=0))
    out = np.zeros((batch, most, channels), x.dtype)
    out_size = np.zeros((batch, most, 1), size.dtype)
    for b in range(batch):
        out[b, :counts[b]] = x[b, kept[b]]
        out_size[b, :counts[b]] = size[b, kept[b]]
    return out, out_size, np.array(most, np.int64)
