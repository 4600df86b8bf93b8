"""ATS: adaptive token sampling (Fayyaz et al., ECCV 2022), training-free, as its reference code defines it.

At each ATS block, after attention: each non-prefix token's score is the class token's attention to it,
summed over heads, times the norm of its value vector (all heads), normalised to sum 1. The scores are
sorted ascending and their CDF min-max normalised; ``n_ref - 1`` evenly spaced targets from the smallest
non-zero CDF value to 1 each pick the token whose CDF is nearest (the first on ties); repeated picks
collapse; the best-scoring ``budget - 1`` unique picks are kept with the prefix tokens.
So the kept count follows the image. Only the kept rows go on to the MLP; padding rows of a batch have
size 0, so later blocks and pooling ignore them.

Every attention of the model, in every block (the reference's ViT hands a policy to every block, all ones
before the first sampling), is the reference's ``softmax_with_policy`` (``policy_softmax``), not a plain
softmax: the class-attention row the scores come from, and the attention output itself.

Every size comes from the tensors (``dynamic_size``), so the same code exports: the sampling as standard
ops, the prune as one ``edgetok::TokenPrune`` node with a data-dependent token count.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention
from transformers.models.vit.modeling_vit import ViTAttention

from edgetok.errors import EdgetokError
from edgetok.vit.dynamic import dynamic_size, token_prune

MIN_TOKENS = 8  # the reference never samples fewer
EPS = 1e-6  # softmax_with_policy's epsilon


def policy_softmax(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The reference's ``softmax_with_policy`` (``transformer_block.py``) over the last dim:
    p_j = (exp(l_j - max l) + eps/N) / (sum exp(l - max l) + eps), eps = 1e-6, N the image's tokens.

    Not a plain softmax: every probability is floored near eps/N, which orders the near-zero class-attention
    scores (so it decides which tokens the inverse-CDF sampling keeps among near-equal low scores).
    ``real`` (bool, broadcastable to ``logits``) marks the image's own keys. With the reference's
    ``drop_tokens`` (its DeiT-S config) an image alone has no others, so N is the image's own token count;
    padding keys of our batches get 0, count in neither N nor the max, so an image attends the same in a batch
    as alone (the reference's batches add eps/N to their policy-0 rows too). Computed in float32 at least,
    as the reference casts for fp16."""
    dtype = logits.dtype
    if dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    real = real.expand_as(logits)
    logits = logits.masked_fill(~real, float("-inf"))
    shifted = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # padding: exp(-inf) = 0
    n = real.sum(dim=-1, keepdim=True).to(logits.dtype)
    probs = (shifted + EPS / n) / (shifted.sum(dim=-1, keepdim=True) + EPS)
    return torch.where(real, probs, torch.zeros_like(probs)).to(dtype)


def policy_attention(q, k, v, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax_with_policy(q kᵀ·scale) v over [B, H, N, D]; ``mask`` the block's additive bias (-inf: a padding
    key), as the reference writes it: (q kᵀ)·scale."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if mask is None:
        real = torch.ones_like(logits[..., :1, :], dtype=torch.bool)
    else:
        real = mask > float("-inf")
        logits = logits + mask
    return policy_softmax(logits, real) @ v


class PolicyAttention(Attention):
    """timm's Attention with the reference's softmax_with_policy (its own projections, norms and gate)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn_drop(policy_attention(q, k, v, float(self.scale), attn_mask))
        out = self.norm(out.transpose(1, 2).reshape(b, n, -1))
        return self.proj_drop(self.proj(out if gate is None else out * gate))


class PolicyViTAttention(ViTAttention):
    """Hugging Face ViTAttention with the reference's softmax_with_policy."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = policy_attention(q, k, v, float(self.scaling), attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def default_blocks(depth: int) -> list[int]:
    """The reference's DeiT-S config samples in blocks 3..11 of 12: from depth/4 on."""
    return list(range(depth // 4, depth))


def sample(score: torch.Tensor, real: torch.Tensor, n_ref: int, budget: torch.Tensor) -> torch.Tensor:
    """Which candidates ATS keeps, from their scores [B, T]: a float mask [B, T].

    ``real`` [B, T] marks the candidates that are not padding (an image alone has none): the CDF's min-max
    normalisation and its smallest non-zero value are taken over real candidates only, so an image samples the
    same tokens in a padded batch as alone. ``n_ref`` is the model's full token count (the targets are
    n_ref - 1), ``budget`` [B, 1] the tokens to keep counting the class token (it depends on each image's own
    token count)."""
    score = score / score.sum(dim=1, keepdim=True)
    if torch.onnx.is_in_onnx_export():  # TopK puts equal scores in index order, as the stable sort does
        order = score.topk(score.shape[1], dim=1, largest=False).indices
    else:
        order = torch.sort(score, dim=1, stable=True).indices
    cdf = torch.cumsum(torch.gather(score, 1, order), dim=1)
    real = torch.gather(real, 1, order)
    inf = torch.full_like(cdf, float("inf"))
    low = torch.where(real, cdf, inf).min(dim=1, keepdim=True).values
    high = torch.where(real, cdf, -inf).max(dim=1, keepdim=True).values
    cdf = torch.where(real, (cdf - low) / (high - low), torch.full_like(cdf, -1e8))  # padding: never nearest
    start = torch.where(real & (cdf != 0), cdf, torch.full_like(cdf, 1e8)).min(dim=1, keepdim=True).values
    steps = torch.arange(n_ref - 1, device=score.device, dtype=score.dtype)
    ys = start + ((torch.linspace(0, 1, n_ref - 1, device=score.device, dtype=score.dtype) * (n_ref - 2))
                  - start * steps) / (n_ref - 2)  # n_ref - 1 targets from `start` to 1, as the reference writes it
    picks = (ys.unsqueeze(2) - cdf.unsqueeze(1)).abs().argmin(dim=2)  # [B, n_ref - 1] positions in score order
    candidates = dynamic_size(score, 1)
    picks = torch.sort(picks, dim=1).values
    # The reference closes the list with 1 (a last pick of 1 then counts as a repeat); with padding sorted
    # first, an image's position 1 is its padding count + 1.
    one = (~real).sum(dim=1, keepdim=True) + 1
    following = torch.cat([picks[:, 1:], one], dim=1)
    unique = torch.sort(torch.where(following == picks, candidates, picks), dim=1).values
    # A budget below the count keeps the best-scoring budget - 1 of the unique picks (the reference's own
    # code runs only with the budget at the count, where this keeps them all).
    found = (unique < candidates).sum(dim=1, keepdim=True)
    slot = torch.arange(n_ref - 1, device=score.device)
    taken = (slot < found) & (slot >= found - (budget - 1))
    unique = torch.where(taken, unique, candidates)
    chosen = (unique.unsqueeze(2) == torch.arange(candidates, device=score.device)).any(dim=1)  # [B, T] score order
    keep = torch.zeros_like(score).scatter(1, order, chosen.to(score.dtype))
    return keep


class ATS:
    name = "ats"
    proportional_attention = True  # the block's bias log(size): 0 for every real token (ATS only prunes), -inf for padding
    needs_class_token = True
    data_dependent = True

    def __init__(self, blocks: list[int], budget: float, depth: int, tokens: int, source: str = "--ats-blocks"):
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad or not blocks:
            raise EdgetokError(f"--ats-blocks {bad or blocks} must be block indices in 0..{depth - 1}, e.g. "
                               f"{','.join(map(str, default_blocks(depth)))}")
        if not budget > 0 or (budget > 1 and budget != int(budget)):
            raise EdgetokError(f"--ats-budget {budget} must be a token count (an integer) or a fraction in (0, 1]")
        if budget > tokens:
            raise EdgetokError(f"--ats-budget {int(budget)} is larger than the model's {tokens} tokens; give at "
                               f"most {tokens} (or a fraction such as 0.7)")
        self.blocks, self.budget, self.tokens, self.source = sorted(set(blocks)), budget, tokens, source

    def params(self, amounts: list[int]) -> dict:
        return {"ats_blocks": self.blocks, "ats_blocks_from": self.source, "ats_budget": self.budget,
                "reference_tokens": self.tokens}

    def own_attention(self, blocks) -> None:
        """Every block attends with softmax_with_policy, as in the reference's ViT (called once, when patched).
        The attention plugins (``--attention biased|sparse``, ``--plugins``) keep their plain softmax."""
        for block in blocks:
            attn = getattr(block, "attn", None) or getattr(block, "attention", None)
            if type(attn) is Attention:
                attn.__class__ = PolicyAttention
            elif type(attn) is ViTAttention:
                attn.__class__ = PolicyViTAttention

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        """(1 if the block samples, tokens left at most): the count after it depends on the image."""
        return (1, tokens) if layer in self.blocks else (0, tokens)

    def budget_for(self, rows: torch.Tensor) -> torch.Tensor:
        """The reference's n_tokens rules on each image's token count ``rows`` [B, 1]: a fraction of it, else
        the count; never more than the rows nor fewer than 8; rounded."""
        n = rows.to(torch.float32)
        budget = n * self.budget if self.budget <= 1 else torch.minimum(n, torch.tensor(float(self.budget)))
        budget = torch.round(torch.clamp(budget, min=MIN_TOKENS))
        return torch.minimum(budget, n).to(torch.int64)

    def reduce(self, amount: int, taps: dict, x, size, prefix: int, class_token: bool):
        """The sampling step of one block: (tokens, sizes) of the kept rows, padded to the batch maximum."""
        if amount == 0:
            return x, size
        q, k, v, scale = taps["q"], taps["k"], taps["v"], taps["scale"]
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * scale  # [B, H, 1, N], the class token's row
        real = size[:, None, None, :, 0] > 0  # [B, 1, 1, N]: the image's own tokens, padding aside
        cls_attention = policy_softmax(logits, real).sum(dim=1)[:, 0]  # summed over heads
        value_norm = v.transpose(1, 2).flatten(2).norm(dim=-1)  # [B, N], over all heads
        keep = self.keep(cls_attention, value_norm, size, prefix)
        pruned, pruned_size, _ = token_prune(x, size, keep, prefix)
        return pruned, pruned_size

    def keep(self, cls_attention, value_norm, size, prefix: int):
        """The keep mask [B, N] (1 for the prefix and the sampled tokens) from the class token's attention
        summed over heads and the value norms, both [B, N]."""
        score = (cls_attention * value_norm)[:, prefix:]
        if score.shape[1] == 0 and not torch.onnx.is_in_onnx_export():  # nothing left but the prefix
            return torch.ones_like(cls_attention)
        rows = (size[..., 0] > 0).sum(dim=1, keepdim=True)  # each image's own token count, padding aside
        keep = sample(score, size[:, prefix:, 0] > 0, self.tokens, self.budget_for(rows))
        return torch.cat([torch.ones_like(keep[:, :prefix]), keep], dim=1)
