"""ToMe: bipartite soft matching (Bolya et al., 2023), as a token transform.

All tokens alternate between set A (even positions) and set B (odd), as in the reference code;
each A token finds its most similar B token by cosine similarity of the head-averaged keys; the
``r`` A tokens with the best matches are averaged (by size) into their match. The class token (A)
is never merged and a distillation token (B) never receives a merge, as in the reference; register
tokens, which the reference predates, are protected the same way by the set they fall in.
Proportional attention adds ``log(size)`` to the logits.
"""

from __future__ import annotations

import ast
import math
from typing import NamedTuple

import torch

from edgetok.errors import EdgetokError
from edgetok.vit.token_transform import TokenTransform, apply_transform


def parse_r_schedule(spec: str | int | list | tuple, depth: int) -> tuple[list[int], bool]:
    """Per-layer r from ToMe's conventions: ``r`` (constant), ``(r, inflect)`` (linear, e.g.
    ``(8, -1)`` decreases from 2r to 0), or a list (missing layers get 0).

    Also says whether late layers may be clamped to what they can merge (as the reference does
    for a constant or linear r); an explicit list is taken literally."""
    value = spec
    if isinstance(spec, str):
        try:
            value = ast.literal_eval(spec.strip())
            if isinstance(value, tuple) and not spec.strip().startswith("("):
                value = list(value)  # '16,8' is a per-layer list; '(16, -1)' is (r, inflect)
        except (ValueError, SyntaxError):
            raise EdgetokError(
                f"r schedule {spec!r} is not understood: give N, '(N, inflect)' such as '(8, -1)', "
                "or a per-layer list such as '16,16,8,8'"
            ) from None
    clamp = not isinstance(value, list)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * depth
    elif isinstance(value, tuple) and len(value) != 2:
        raise EdgetokError(f"r schedule {spec!r}: a tuple is (r, inflect), e.g. '(8, -1)'")
    elif isinstance(value, tuple) and len(value) == 2:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise EdgetokError(f"r schedule {spec!r}: (r, inflect) must be numbers, e.g. '(8, -1)'")
        r, inflect = value
        try:
            ends = float(r) * (1.0 - inflect), 2.0 * r - float(r) * (1.0 - inflect)
        except OverflowError:
            ends = (math.inf,)
        if not all(math.isfinite(v) for v in ends):  # e.g. (1e308, -1): 2r is not a number of tokens
            raise EdgetokError(f"r schedule {spec!r}: (r, inflect) must give a finite number of tokens per block, "
                               "e.g. '(8, -1)'")
        low = int(r * (1.0 - inflect))
        high = 2 * r - low
        step = (high - low) / max(depth - 1, 1)
        value = [int(low + step * i) for i in range(depth)]
    elif not isinstance(value, (list, tuple)):
        raise EdgetokError(f"r schedule {spec!r} is not understood: give N, '(N, inflect)' or a list such as '16,16,8'")
    elif isinstance(value, (list, tuple)):
        value = list(value)
        if len(value) > depth:
            raise EdgetokError(f"r schedule has {len(value)} entries but the model has {depth} blocks")
        value = value + [0] * (depth - len(value))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise EdgetokError(f"r schedule {spec!r} must hold non-negative integers")
    return value, clamp


def r_option(options: dict, depth: int) -> tuple[list[int] | None, bool]:
    """``--r`` or ``--r-schedule`` (not both), as ``parse_r_schedule`` reads it: the option pair every merging
    method shares. (None, False) when neither is given, for methods that may run on ``--keep-rate`` alone."""
    r, schedule = options.get("r"), options.get("r_schedule")
    if r is not None and schedule is not None:
        raise EdgetokError("give --r or --r-schedule, not both")
    given = r if r is not None else schedule
    return parse_r_schedule(given, depth) if given is not None else (None, False)


class ToMe:
    name = "tome"
    proportional_attention = True

    def __init__(self, r: list[int], clamp: bool):
        self.r = r
        self.clamp = clamp

    def params(self, amounts: list[int]) -> dict:
        return {"r_per_layer": amounts, "proportional_attention": True}

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        """(r merged in this block, tokens left); checks r against what the block can merge."""
        most = (tokens - prefix) // 2
        r = self.r[layer]
        if r > most:
            if not self.clamp or layer == 0:
                raise EdgetokError(
                    f"r={r} is too large for block {layer}: it has {tokens - prefix} mergeable tokens, "
                    f"so r can be at most {most}; lower --r"
                )
            r = most
        return r, tokens - r

    def transform(self, r: int, q, k, scale, prefix: int, class_token: bool = True):
        """The merge for one block, from its keys ``k`` [B, H, N, D] averaged over heads."""
        if r == 0:
            return None
        return bipartite_transform(k.mean(dim=1), r, prefix, class_token), None

    def plugin_step(self, r: int, k, x, size, prefix: int, class_token: bool):
        """The same step as one ``edgetok::TokenMerge`` node in an export (``--plugins``)."""
        return token_merge(x, k.mean(dim=1), size, r, prefix, bool(class_token))


class Matching(NamedTuple):
    """Each A token's most similar B token (see ``bipartite_match``)."""

    best: torch.Tensor  # [B, n_a]: cosine similarity of each A token to its best B token
    match: torch.Tensor  # [B, n_a]: that B token, as an index into B
    a_start: int  # A = positions a_start, a_start + 2, ... (prefix tokens in A left out)
    b_start: int  # B = positions b_start, b_start + 2, ... (prefix tokens in B left out)
    n_b: int


def bipartite_match(metric, prefix: int, valid=None) -> Matching:
    """ToMe's matching, shared by ToMe and DyMU's dynamic ToMe, on ``metric`` [B, N, D] (the keys
    averaged over heads): L2-normalised; A = positions 0, 2, 4, ... and B = 1, 3, 5, ... of *all*
    tokens, less the prefix tokens (a prefix token in A is never merged, one in B never receives a
    merge: the reference's -inf row and column, here left out of the score matrix); each A token's
    best B token by cosine similarity (the first on ties).

    ``valid`` [B, N] bool (optional) excludes tokens from the matching (padding rows of a batch with
    different token counts per image): no A token matches an excluded B token, and an excluded A
    token's best score is -inf."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_start, b_start = 2 * ((prefix + 1) // 2), 2 * (prefix // 2) + 1  # prefix tokens at even / odd positions
    a, b = metric[:, a_start::2], metric[:, b_start::2]
    scores = a @ b.transpose(1, 2)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, b_start::2], float("-inf"))
    best, match = scores.max(dim=-1)  # each A token's most similar B token
    if valid is not None:
        best = best.masked_fill(~valid[:, a_start::2], float("-inf"))
    return Matching(best, match, a_start, b_start, b.shape[1])


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``scores`` [B, N] from the highest, equal scores by position: ONNX TopK's rule (what
    an export runs), and a stable sort in eager PyTorch (torch.topk orders ties arbitrarily)."""
    if torch.onnx.is_in_onnx_export():
        return scores.topk(scores.shape[-1], dim=-1).indices
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def bipartite_transform(metric, r: int, prefix: int, class_token: bool) -> TokenTransform:
    """Bipartite soft matching on ``metric`` [B, N, D] (the keys averaged over heads).

    As the reference: A = positions 0, 2, 4, ... and B = 1, 3, 5, ... of *all* tokens. A prefix
    token in A (the class token) is never merged, one in B (a distillation token) never receives
    a merge: the reference's -inf row and column, realised by leaving them out of the score
    matrix (the same argmax and ranking, with no -inf in the graph). Prefix tokens come first;
    with a class token the unmerged A tokens keep their order (the reference sorts them),
    without one they stay in ranking order, as the reference leaves them. Ties: the first best
    match, and equal scores ranked by position (ONNX TopK's rule; torch.topk has none, so eager
    PyTorch sorts stably).
    """
    best, match, a_start, b_start, n_b = bipartite_match(metric, prefix)
    n_a = best.shape[1]
    order = rank_descending(best)  # A tokens by how well they match, best first
    src_a, unmerged_a = order[:, :r], order[:, r:]
    if class_token:
        unmerged_a = unmerged_a.topk(n_a - r, dim=-1, largest=False).values  # original order
    batch = metric.shape[0]
    prefix_idx = torch.arange(prefix, device=metric.device).expand(batch, prefix)
    b_idx = (torch.arange(n_b, device=metric.device) * 2 + b_start).expand(batch, n_b)
    keep = torch.cat([prefix_idx, unmerged_a * 2 + a_start, b_idx], dim=1)
    dst = torch.gather(match, 1, src_a) + (prefix + n_a - r)
    return TokenTransform(keep=keep, src=src_a * 2 + a_start, dst=dst)


@torch.library.custom_op("edgetok::token_merge", mutates_args=())
def token_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, prefix: int,
                class_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager: the standard-op step. Exported: one ``edgetok::TokenMerge`` node (the spec in
    edgetok/plugins/token_merge.py). A torch custom op, so the exporter records one node, not its body."""
    return apply_transform(bipartite_transform(metric, r, prefix, class_token), x, size, size)


@token_merge.register_kernel("cuda")
def _token_merge_cuda(x, metric, size, r, prefix, class_token):
    """On a GPU the same step runs as the plugin's fused Triton kernels (fp32, as the plugin)."""
    from edgetok.plugins import kernels
    from edgetok.plugins.spec import get

    inputs = [t.float().contiguous() for t in (x, metric, size)]
    merged, merged_size = kernels.run_torch(get("TokenMerge"), inputs,
                                            {"r": r, "prefix": prefix, "class_token": int(class_token)})
    return merged.to(x.dtype), merged_size.to(size.dtype)


@token_merge.register_fake
def _(x, metric, size, r, prefix, class_token):
    batch, tokens, channels = x.shape
    return x.new_empty(batch, tokens - r, channels), size.new_empty(batch, tokens - r, 1)


def _token_merge_node(g, x, metric, size, r, prefix, class_token):
    from torch.onnx import symbolic_helper

    from edgetok.plugins.spec import NAMESPACE, node_attributes

    r, prefix = symbolic_helper._get_const(r, "i", "r"), symbolic_helper._get_const(prefix, "i", "prefix")
    class_token = symbolic_helper._get_const(class_token, "b", "class_token")
    merged, merged_size = g.op(f"{NAMESPACE}::TokenMerge", x, metric, size, r_i=r, prefix_i=prefix,
                               class_token_i=int(class_token), **node_attributes(), outputs=2)
    _, tokens, channels = x.type().varyingSizes() or (None, None, None)  # None: not known to the exporter
    tokens = None if tokens is None else tokens - r
    merged.setType(x.type().with_sizes([None, tokens, channels]))
    merged_size.setType(size.type().with_sizes([None, tokens, 1]))
    return merged, merged_size


torch.onnx.register_custom_op_symbolic("edgetok::token_merge", _token_merge_node, 17)
