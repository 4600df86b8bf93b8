"""ALiBi from explicit positions, so BLOOM, MPT and Falcon with ``alibi=True`` export as decoders whose k-token and
tree calls bias every key by its own position.

ALiBi adds slope_h · position(key) to each score (the paper's −slope·(i − j) differs from it by a constant per row,
which softmax ignores). transformers 5.x takes that position from the 2-D attention mask: BLOOM and Falcon as
(cumsum(mask) − 1)·mask, MPT as the key's index. In a tree call the keys are the cache and the flattened tree, and a
node's position is past + its depth, not past + its index, so neither rule fits: given the tree's 4-D mask BLOOM and
Falcon stop ("too many values to unpack"), and MPT runs but biases node j as if it sat at past + j (0.011 max
logit error on a 3-node tree of the test config). Here each family's own ALiBi builder is swapped, for one forward,
for one taking every key's position: the cache's from the mask by the family's own rule, the new tokens' from
``position_ids``. Slopes come from transformers' own builders and are multiplied in the family's dtype (Falcon
rounds the product to bfloat16: its bias is read from a table its builder filled), so with a plain mask and
position_ids = past .. past + q − 1 the bias is the family's to the bit (every exported phase is checked against
the untouched model).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

FAMILIES = ("bloom", "falcon", "mpt")


def uses_alibi(config) -> bool:
    return config.model_type in ("bloom", "mpt") or (config.model_type == "falcon" and bool(config.alibi))


def key_positions(model_type: str, visible: torch.Tensor, position_ids: torch.Tensor, past: int) -> torch.Tensor:
    """[batch, past + q] position of every key. ``visible``: the 2-D mask [batch, past + q], or the tree's 4-D one
    [batch, 1, q, past + q] whose first row gives the cache's columns (every row of a tree sees the same cache)."""
    cache = (visible[:, 0, 0, :past] if visible.dim() == 4 else visible[:, :past]).to(torch.long)
    if model_type == "mpt":  # MPT: a key's index, whatever the mask says
        cache = torch.cumsum(torch.ones_like(cache), dim=1) - 1
    else:  # BLOOM, Falcon: the unmasked keys before it
        cache = (cache.cumsum(dim=1) - 1) * cache
    return torch.cat([cache, position_ids.to(torch.long)], dim=1)


@contextmanager
def positions_from(model, positions: torch.Tensor):
    """Within the block, ``model`` (a BLOOM, MPT or Falcon causal LM) builds its ALiBi from ``positions``
    [batch, keys]. MPT's attention takes one bias for the whole batch ([heads, 1, keys]), so it uses the first
    row's positions: every row of an MPT call must share them (generation runs batch 1)."""
    kind = model.config.model_type
    body = model.transformer
    if kind == "bloom":
        from transformers.models.bloom import modeling_bloom as module

        owner, name = body, "build_alibi_tensor"

        def build(attention_mask, num_heads, dtype):
            slopes = module._get_alibi_slopes(num_heads, positions.device)
            return (slopes[None, :, None] * positions[:, None, :]).reshape(-1, 1, positions.shape[1]).to(dtype)
    elif kind == "falcon":
        from transformers.models.falcon import modeling_falcon as module

        owner, name = module, "build_alibi_tensor"  # a module function: Falcon calls it by its global name
        original = module.build_alibi_tensor

        def build(attention_mask, num_heads, dtype):
            # Falcon multiplies in bfloat16, which the ONNX exporter mistypes (complex128): its own builder fills a
            # table of every position it can reach, traced as a constant, and the positions pick from it.
            reach = torch.ones(1, model.config.max_position_embeddings, dtype=torch.long)
            table = original(reach, num_heads, torch.float32).view(num_heads, -1).detach()
            return table[:, positions].transpose(0, 1).reshape(-1, 1, positions.shape[1]).to(dtype)
    elif kind == "mpt":
        owner, name = body, "build_mpt_alibi_tensor"
        original = body.build_mpt_alibi_tensor

        def build(num_heads, sequence_length, alibi_bias_max=8, device=None):
            slopes = -original(num_heads, 2, alibi_bias_max, device)[:, 0, 0]  # its table is slope·(j − (L − 1))
            offsets = (positions[0] - (positions.shape[1] - 1)).to(torch.int32)  # its own offsets for a chain
            return (offsets.view(1, 1, 1, -1) * slopes.view(1, -1, 1, 1)).squeeze(0)
    else:
        raise ValueError(f"{kind} is not an ALiBi family ({', '.join(FAMILIES)})")
    had = name in vars(owner)
    saved = vars(owner).get(name)
    setattr(owner, name, build)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, saved)
        else:
            delattr(owner, name)
