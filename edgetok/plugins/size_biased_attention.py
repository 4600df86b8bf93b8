"""SizeBiasedAttention: attention whose keys are weighted by the tokens they stand for (ToMe's proportional
attention), in one flash-style step that never holds the N×N matrix.

Inputs: ``q``, ``k``, ``v`` [B, H, N, D] float32 and token sizes ``size`` [B, N, 1] float32. Field ``scale``
(0: D^-0.5, timm's and Hugging Face's default). Outputs:

- ``out`` [B, H, N, D] = softmax(q kᵀ · scale + log size_k) v. A key of size 0 (a padding row left by a
  data-dependent step) gets log 0 = −inf: no query attends to it. Padding query rows are computed like any
  other row; they are padding, and the next step drops them.
- ``class_attn`` [B, N]: row 0 of the attention (the class token's) averaged over heads, which EViT and ATS
  score tokens with. It is always produced: it costs one extra query row per head (1/N of the attention), and
  a graph that does not use it simply leaves it unconnected.

D is at most 128 (the kernels' widest head tile); every ViT we know has 32-128.
"""

from __future__ import annotations

import numpy as np

from edgetok.plugins.agreement import Margins, dot_magnitude
from edgetok.plugins.declaration import Field, PluginError, PluginSpec, Tensor, reference, register

MAX_HEAD_DIM = 128


def _output_shapes(dims: list[list], f: dict) -> list[list]:
    (batch, heads, tokens, dim), _, _, _ = dims
    return [[batch, heads, tokens, dim], [batch, tokens]]


# What both attention plugins take: q, k, v, the token sizes, and the logit scale.
INPUTS = (
    Tensor("q", 4, "queries [B, H, N, D]"),
    Tensor("k", 4, "keys [B, H, N, D]"),
    Tensor("v", 4, "values [B, H, N, D]"),
    Tensor("size", 3, "patches each token stands for [B, N, 1]; 0 marks padding"),
)
SCALE = Field("scale", float, 0.0, "logit scale; 0 means D^-0.5")


def check_attention(name: str, shapes: list[tuple[int, ...]], f: dict) -> None:
    """The checks both attention plugins share: self-attention shapes, sizes, head dim, scale."""
    q, k, v, size = shapes
    batch, heads, tokens, dim = q
    if k != q or v != q:
        raise PluginError(f"{name}: q {list(q)}, k {list(k)} and v {list(v)} must have one shape [B, H, N, D] "
                          "(self-attention)")
    if size != (batch, tokens, 1):
        raise PluginError(f"{name}: size {list(size)} must be [{batch}, {tokens}, 1] for q {list(q)}")
    if not 1 <= dim <= MAX_HEAD_DIM:
        raise PluginError(f"{name}: head dim {dim} is not in 1..{MAX_HEAD_DIM}; keep this block's attention as "
                          "standard ops (--attention dense)")
    if tokens < 1:
        raise PluginError(f"{name}: q {list(q)} has no tokens")
    if not f["scale"] >= 0 or not np.isfinite(f["scale"]):
        raise PluginError(f"{name}: scale={f['scale']} must be a finite number >= 0 (0: D^-0.5)")


def _check(shapes: list[tuple[int, ...]], f: dict) -> None:
    check_attention("SizeBiasedAttention", shapes, f)


def scale_of(dim: int, scale: float) -> float:
    return float(scale) if scale else float(dim) ** -0.5


def _cases(rng: np.random.Generator) -> list[tuple[str, list[np.ndarray], dict]]:
    """Random sizes; padding keys (size 0) in some images; N not a multiple of the tile, N below it, N = 1;
    head dims 32, 64 (DeiT), 80 and 128; B > 1; a DeiT-S sized call."""
    def call(batch, heads, tokens, dim, padded=0):
        q, k, v = (rng.standard_normal((batch, heads, tokens, dim)).astype(np.float32) for _ in range(3))
        size = rng.integers(1, 6, (batch, tokens, 1)).astype(np.float32)
        if padded:
            size[0, tokens - padded:] = 0.0
        return [q, k, v, size]

    return [
        ("N=70 D=32 B=2 (N not a tile multiple)", call(2, 3, 70, 32), {"scale": 0.0}),
        ("N=17 D=64 (N below a tile)", call(2, 2, 17, 64), {"scale": 0.0}),
        ("N=1", call(1, 2, 1, 64), {"scale": 0.0}),
        ("padding keys, explicit scale", call(3, 2, 40, 32, padded=15), {"scale": 0.3}),
        ("D=80 (ViT-H)", call(1, 2, 33, 80), {"scale": 0.0}),
        ("D=128, H=1", call(2, 1, 65, 128), {"scale": 0.0}),
        ("deit-s N=197 H=6 D=64", call(1, 6, 197, 64), {"scale": 0.0}),
    ]


def _intermediates(inputs: list[np.ndarray], f: dict) -> dict[str, list[np.ndarray]]:
    """Per (image, head): the log-sum-exp of each query row, which the attention kernel leaves for the
    class-row kernel."""
    q, k, _, size = (x.astype(np.float64) for x in inputs)
    logits = _logits(q, k, size, scale_of(q.shape[3], f["scale"]))
    top = logits.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]
    return {"lse": [row.astype(np.float32) for row in lse.reshape(-1, q.shape[2])]}


def logit_magnitude(q: np.ndarray, k: np.ndarray, size: np.ndarray, scale: float) -> float:
    """What the logits q kᵀ · scale + log size are summed from (their float32 noise scales with it)."""
    with np.errstate(divide="ignore"):
        bias = np.abs(np.log(np.asarray(size, np.float64)))
    return dot_magnitude(q, k, scale) + float(bias[np.isfinite(bias)].max(initial=0.0))


def _margins(inputs: list[np.ndarray], f: dict) -> Margins:
    """On a GPU: no decisions; the values carry the float32 noise of the logits' magnitude."""
    q, k, _, size = inputs
    return Margins({}, magnitude=logit_magnitude(q, k, size, scale_of(q.shape[3], f["scale"])))


SPEC = register(PluginSpec(
    name="SizeBiasedAttention",
    doc="attention with + log(size) on every key's logits (size 0 masks a key), flash style; and the class row",
    fields=(SCALE,),
    inputs=INPUTS,
    outputs=(
        Tensor("out", 4, "attention output [B, H, N, D]"),
        Tensor("class_attn", 2, "the class token's attention row, mean over heads [B, N]"),
    ),
    output_shapes=_output_shapes,
    check=_check,
    kernels="size_biased_attention",
    cases=_cases,
    intermediates=_intermediates,
    margins=_margins,
))


def _logits(q: np.ndarray, k: np.ndarray, size: np.ndarray, scale: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        bias = np.log(size[..., 0])  # log 0 = -inf: padding keys
    return q @ np.swapaxes(k, -1, -2) * scale + bias[:, None, None, :]


@reference("SizeBiasedAttention")
def size_biased_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, size: np.ndarray, scale: float):
    """The plain formula, the whole N×N matrix at once."""
    logits = _logits(q, k, size, scale_of(q.shape[3], scale))
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return (weights @ v).astype(q.dtype), weights[:, :, 0, :].mean(axis=1).astype(q.dtype)
