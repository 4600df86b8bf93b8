"""Choose a reduction method, plan its per-layer token counts, and patch a model with it."""

from __future__ import annotations

from dataclasses import dataclass

from edgetok.errors import EdgetokError
from edgetok.vit.evit import EViT, default_keep_layers
from edgetok.vit.loading import LoadedViT
from edgetok.vit.patch import patch_blocks
from edgetok.vit.tome import ToMe, parse_r_schedule

METHODS = ("none", "tome", "evit", "ats", "dtome", "pitome", "gtp", "zerotprune")


@dataclass
class ReductionPlan:
    method: str
    params: dict
    tokens: list[tuple[int, int]]  # per block: (tokens in, tokens after its reduction)
    amounts: list[int]  # per block: what the method does there (ToMe: r; EViT: tokens kept; 0: nothing)

    @property
    def reduces(self) -> bool:
        return any(n_in != n_out for n_in, n_out in self.tokens)


def make_method(
    name: str,
    depth: int,
    r: int | None = None,
    r_schedule: str | list | None = None,
    keep_rate: float | None = None,
    keep_layers: list[int] | None = None,
    ats_blocks: list[int] | None = None,
    ats_budget: float | None = None,
    tokens: int | None = None,
    thresholds: list | None = None,
    cap: int | None = None,
    defaults: dict | None = None,
    propagate: str | int | list | None = None,
    alpha: float | None = None,
    graph: str | None = None,
    head_variance: str | None = None,
    similarity_share: float | None = None,
    pitome_variant: str | None = None,
    sparsity: float | None = None,
):
    """The method object for ``name`` (None for ``none``), from CLI/recipe parameters; ``tokens`` is the
    model's token count (ATS samples from it); ``defaults`` the model's own defaults for options not given."""
    if (thresholds is not None or cap is not None) and name != "dtome":
        raise EdgetokError("--cap and calibrated thresholds are dtome options; they need --method dtome")
    if (propagate is not None or alpha is not None or graph is not None) and name != "gtp":
        raise EdgetokError("--propagate/--alpha/--graph are GTP options; they need --method gtp")
    if sparsity is not None and name != "gtp":
        raise EdgetokError("--sparsity is a GTP option (its θ); it needs --method gtp")
    if pitome_variant is not None and name != "pitome":
        raise EdgetokError("--pitome-variant is a PiToMe option; it needs --method pitome")
    if (head_variance is not None or similarity_share is not None) and name != "zerotprune":
        raise EdgetokError("--head-variance/--similarity-share are Zero-TPrune options; they need --method zerotprune")
    ats_given = ats_blocks is not None or ats_budget is not None
    if ats_given and name != "ats":
        raise EdgetokError("--ats-blocks/--ats-budget are ATS options; they need --method ats")
    if name not in METHODS:
        raise EdgetokError(f"--method {name!r} is unknown; choose one of {', '.join(METHODS)}")
    if name == "tome" and (keep_rate is not None or keep_layers is not None):
        raise EdgetokError("--keep-rate/--keep-layers are EViT options; --method tome takes --r or --r-schedule")
    if name == "evit" and (r is not None or r_schedule is not None):
        raise EdgetokError("--r/--r-schedule are ToMe options; --method evit takes --keep-rate and --keep-layers")
    if keep_layers is not None and not keep_layers:
        raise EdgetokError("--keep-layers is empty; give block indices such as 3,6,9 (or leave it out)")
    if name == "tome":
        if r is not None and r_schedule is not None:
            raise EdgetokError("give --r or --r-schedule, not both")
        if r is None and r_schedule is None:
            raise EdgetokError("--method tome needs --r N (tokens merged per block) or --r-schedule")
        if r is not None and r < 0:
            raise EdgetokError(f"--r {r} must be >= 0")
        return ToMe(*parse_r_schedule(r if r is not None else r_schedule, depth))
    if name == "evit":
        if keep_rate is None:
            raise EdgetokError("--method evit needs --keep-rate F in (0, 1], e.g. 0.7")
        return EViT(keep_rate, default_keep_layers(depth) if keep_layers is None else keep_layers, depth)
    if name == "dtome":
        if keep_rate is not None or keep_layers is not None:
            raise EdgetokError("--method dtome takes --r (or --r-schedule), --calibrate and --cap, not --keep-rate")
        from edgetok.vit.dtome import make_dtome

        return make_dtome(depth, r, r_schedule, None if thresholds is None else
                          [float("inf") if t is None else t for t in thresholds], cap)
    if name == "gtp":
        if r is not None or r_schedule is not None or keep_rate is not None or keep_layers is not None:
            raise EdgetokError("--method gtp takes --propagate P, --alpha, --graph and --sparsity (not --r/--keep-rate)")
        if propagate is None:
            raise EdgetokError("--method gtp needs --propagate P (tokens propagated and removed per block), e.g. 8")
        from edgetok.vit.gtp import GTP, parse_propagate

        return GTP(parse_propagate(propagate, depth), 0.1 if alpha is None else alpha, graph or "spatial", sparsity)
    if name in ("pitome", "zerotprune"):
        if keep_layers is not None:
            raise EdgetokError(f"--keep-layers is an EViT option; --method {name} takes --r, --r-schedule or --keep-rate")
        if r is not None and r_schedule is not None:
            raise EdgetokError("give --r or --r-schedule, not both")
        if r is not None and r < 0:
            raise EdgetokError(f"--r {r} must be >= 0")
        from edgetok.vit.pitome import PiToMe
        from edgetok.vit.zerotprune import ZeroTPrune

        given = r if r is not None else r_schedule
        schedule, clamp = parse_r_schedule(given, depth) if given is not None else (None, False)
        if name == "pitome":
            return PiToMe(schedule, keep_rate, depth, clamp, pitome_variant)
        return ZeroTPrune(schedule, keep_rate, depth, clamp, head_variance, similarity_share)
    if name == "ats":
        if r is not None or r_schedule is not None or keep_rate is not None or keep_layers is not None:
            raise EdgetokError("--method ats takes --ats-blocks and --ats-budget (not --r/--keep-rate)")
        from edgetok.vit.ats import ATS, default_blocks

        own = (defaults or {}).get("ats_blocks")
        blocks, source = ((ats_blocks, "--ats-blocks") if ats_blocks is not None else
                          (list(own), "the model's own default") if own is not None else
                          (default_blocks(depth), "the reference's DeiT-S config scaled to depth"))
        return ATS(blocks, 1.0 if ats_budget is None else ats_budget, depth, tokens or 0, source)
    if r or r_schedule or keep_rate is not None or keep_layers is not None:
        raise EdgetokError("--r/--r-schedule/--keep-rate need a --method that reduces (tome, pitome, zerotprune, evit, dtome)")
    return None


def plan(vit: LoadedViT, method) -> ReductionPlan:
    """Per-block token counts (static for a given image size); checks the method fits the model."""
    if getattr(method, "needs_class_token", False) and not vit.class_token:
        raise EdgetokError(f"--method {method.name} scores tokens by the class token's attention, and {vit.name} "
                           "has no class token; use --method tome")
    tokens, amounts, n = [], [], vit.num_tokens
    for layer in range(vit.depth):
        amount, after = (0, n) if method is None else method.plan_layer(layer, n, vit.prefix_tokens)
        tokens.append((n, after))
        amounts.append(amount)
        n = after
    if method is None:
        return ReductionPlan("none", {}, tokens, amounts)
    return ReductionPlan(method.name, method.params(amounts), tokens, amounts)


class NoReduction:
    """``none`` when the blocks must still be patched (their attention replaced): every step keeps all tokens."""
    name = "none"
    proportional_attention = False

    def transform(self, *args):
        return None


def reduce_vit(vit: LoadedViT, method, plugins: bool = False, attention: str = "dense",
               sparsity=None) -> ReductionPlan:
    """Plan, then patch ``vit`` in place (nothing to patch for ``none`` with dense attention); ``plugins``:
    steps that fit a plugin export as its node; ``attention``: "biased" / "sparse" makes every block's
    attention one SizeBiasedAttention / BlockSparseAttention op (edgetok/vit/attention.py), the latter with
    ``sparsity`` (an attention.Sparsity; its defaults if None)."""
    from edgetok.vit.attention import Sparsity, check

    check(attention, vit.blocks)
    if attention == "sparse":
        sparsity = sparsity or Sparsity()
        sparsity.check(vit.num_tokens)
    result = plan(vit, method)
    if method is not None or attention != "dense":
        patch_blocks(vit, method or NoReduction(), result.amounts, plugins, attention, sparsity)
    return result
