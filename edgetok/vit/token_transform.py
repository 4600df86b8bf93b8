"""The token transform: the one representation of a token-reduction step.

Every method (ToMe merging, EViT keep-and-fuse, pruning) decides the same three things:
which tokens survive (``keep``), which tokens are folded into another one (``src`` → ``dst``) and
with what weight. Output token ``j`` is the weighted average of the kept token ``keep[j]`` (if
``j < len(keep)``) and every ``src[m]`` with ``dst[m] == j``; rows past ``len(keep)`` are new tokens
made only of sources (EViT's fused token). Sizes (how many patches a token stands for) add up.

It is realised here once, with export-friendly ops only: GatherElements for the kept and moved
tokens and a one-hot MatMul for the merge (no ScatterElements/ScatterND with reduction, no
NonZero), which TensorRT accepts. Shapes are static per layer; only the batch is dynamic.
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
    if t.src is None:
        return gather_tokens(x, t.keep), gather_tokens(size, t.keep)
    channels = x.shape[-1]
    # One matrix product carries the weighted tokens, the weights and the sizes together.
    packed = torch.cat([x * weight, weight, size], dim=-1)
    kept = gather_tokens(packed, t.keep)
    if t.num_new:
        kept = torch.nn.functional.pad(kept, (0, 0, 0, t.num_new))
    moved = gather_tokens(packed, t.src)
    rows = torch.arange(t.num_out, device=x.device)
    one_hot = (t.dst.unsqueeze(-1) == rows).to(x.dtype)  # [B, M, N']
    merged = kept + one_hot.transpose(1, 2) @ moved
    out = merged[..., :channels] / merged[..., channels : channels + 1]
    return out, merged[..., channels + 1 :]
