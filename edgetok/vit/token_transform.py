"""The token transform: the one representation of a token-reduction step.

Every method (ToMe merging, EViT keep-and-fuse, pruning) decides the same three things:
which tokens survive (``keep``), which tokens are folded into another one (``src`` → ``dst``) and
with what weight. Output token ``j`` is the weighted average of the kept token ``keep[j]`` (if
``j < len(keep)``) and every ``src[m]`` with ``dst[m] == j``; rows past ``len(keep)`` are new tokens
made only of sources (EViT's fused token). Sizes (how many patches a token stands for) add up.
Many-to-many steps (GTP's graph propagation) give a ``mix`` matrix instead of ``dst``: source m enters row j
with weight mix[j, m]; with ``normalize=False`` the rows are the weighted sums themselves (kept token with
weight 1), not averages — GTP's x_kept + α·W·x_prop, sizes likewise.

It is realised here once, with export-friendly ops only: GatherElements for the kept and moved
tokens and a one-hot MatMul for the merge (no ScatterElements/ScatterND with reduction, no
NonZero), which TensorRT accepts. Shapes are static per layer; only the batch is dynamic.

Data-dependent methods (the count left depends on the image) pad each image to the batch maximum: with
``pad=True``, index N (one past the last token) is a virtual zero row (x = 0, weight 0, size 0). ``keep``
points padding rows at it; ``src`` may point at it too (with any valid ``dst``: it adds nothing). An output
row whose weights sum to 0 (a padding row) is 0, with size 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenTransform:
    keep: torch.Tensor  # [B, K] int64: source index of output rows 0..K-1
    src: torch.Tensor | None = None  # [B, M] int64: tokens folded into another row
    dst: torch.Tensor | None = None  # [B, M] int64: output row each source goes to
    num_new: int = 0  # rows K..K+num_new-1 are made of sources only
    pad: bool = False  # index N (one past the last token) is a zero row: x = 0, weight 0, size 0
    # many-to-many: [B, N', M], the share of source m in output row j (replaces ``dst``'s one-hot rows)
    mix: torch.Tensor | None = None
    normalize: bool = True  # False: rows are weighted sums, not averages (GTP adds propagated tokens)

    @property
    def num_out(self) -> int:
        return self.keep.shape[1] + self.num_new


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, i], :] as GatherElements (TensorRT-friendly, batch stays dynamic)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def apply_transform(
    t: TokenTransform, x: torch.Tensor, size: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``t`` to tokens ``x`` [B, N, C]; returns the new tokens and sizes [B, N', 1].

    ``weight`` [B, N, 1] weighs each token in the averages (ToMe: its size; EViT: its class
    attention). Pure pruning (no sources) is a plain gather.
    """
    if t.pad:  # the zero row that index N points at
        x, size, weight = (torch.nn.functional.pad(v, (0, 0, 0, 1)) for v in (x, size, weight))
    if t.src is None:
        return gather_tokens(x, t.keep), gather_tokens(size, t.keep)
    channels = x.shape[-1]
    # One matrix product carries the weighted tokens, the weights and the sizes together.
    packed = torch.cat([x * weight, weight, size], dim=-1)
    kept = gather_tokens(packed, t.keep)
    if t.num_new:
        kept = torch.nn.functional.pad(kept, (0, 0, 0, t.num_new))
    moved = gather_tokens(packed, t.src)
    if t.mix is None:
        rows = torch.arange(t.num_out, device=x.device)
        mix = (t.dst.unsqueeze(-1) == rows).to(x.dtype).transpose(1, 2)  # [B, N', M] one-hot
    else:
        mix = t.mix
    merged = kept + mix @ moved
    if not t.normalize:  # kept (weight 1) + the weighted sources, tokens and sizes alike
        return merged[..., :channels], merged[..., channels + 1 :]
    total = merged[..., channels : channels + 1]
    if t.pad:  # padding rows: 0 / 0 -> 0
        total = total.clamp_min(torch.finfo(total.dtype).tiny)
    out = merged[..., :channels] / total
    return out, merged[..., channels + 1 :]
