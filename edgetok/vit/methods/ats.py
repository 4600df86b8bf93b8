"""ATS: adaptive token sampling by the class token's attention (Fayyaz et al., ECCV 2022); realised in ``ats_torch``."""

import math

from edgetok.vit.methods.method import Method, Option


def _budget(value):
    if math.isfinite(value) and value > 0 and (value <= 1 or value == int(value)):
        return None
    return "must be a token count (an integer, e.g. 100) or a fraction in (0, 1], e.g. 0.5"


def _blocks(value):
    return "must be 0-based block indices >= 0" if isinstance(value, list) and any(
        not isinstance(i, int) or i < 0 for i in value) else None


def build(depth: int, options: dict, model: dict):
    from edgetok.vit.methods.ats_torch import ATS, default_blocks

    given, budget = options.get("ats_blocks"), options.get("ats_budget")
    if budget is not None and budget > 1 and budget == int(budget):
        budget = int(budget)  # a token count
    own = model["defaults"].get("ats_blocks")
    blocks, source = ((given, "--ats-blocks") if given is not None else
                      (list(own), "the model's own default") if own is not None else
                      (default_blocks(depth), "the reference's DeiT-S config scaled to depth"))
    return ATS(blocks, 1.0 if budget is None else budget, depth, model["tokens"] or 0, source)


METHOD = Method(
    name="ats",
    label="ATS",
    summary="Adaptive Token Sampling: inverse-transform sampling of tokens by class attention; the count "
            "follows the image.",
    paper="Fayyaz et al., Adaptive Token Sampler For Vision Transformers, ECCV 2022",
    reference="https://github.com/adaptivetokensampling/ATS (ats_block.py)",
    departures=(
        "Batches: the CDF's normalisation is taken over each image's real tokens, so an image samples the same "
        "tokens in a padded batch as alone (the reference's own batches are not), and the budget is each "
        "image's own count; padding keys get no eps/N.",
        "A budget below the token count keeps the best-scoring budget - 1 picks (the reference's code runs only "
        "with the budget at the count).",
        "With --attention biased|sparse or --plugins the attention output uses a plain softmax (a relative "
        "difference of about eps); the scores always use the reference's softmax_with_policy.",
    ),
    options=(Option("ats_blocks", "ints", "0-based blocks that sample, e.g. 3,4,...,11 (default: the model's own, "
                    "else depth/4 to the last)", check=_blocks),
             Option("ats_budget", "float", "tokens kept at most (with the class token), or a fraction",
                    default=1.0, check=_budget, searchable=True, metavar="N|F",
                    parse=lambda b: int(b) if b > 1 and b == int(b) else b)),
    groups=((("ats_blocks", "ats_budget"), ""),),
    build=build,
    record=lambda red: {"ats_blocks": red.get("ats_blocks"), "ats_budget": red.get("ats_budget")},
    tag=lambda o: f"ats_b{o['ats_budget'] if o.get('ats_budget') is not None else 1.0}",
)
