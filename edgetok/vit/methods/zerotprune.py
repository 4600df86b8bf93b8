"""Zero-TPrune: attention-graph pruning, a similarity then an importance stage (Wang et al., CVPR 2024)."""

from edgetok.vit.methods.method import Method, Option


def build(depth: int, options: dict, model: dict):
    from edgetok.vit.methods.tome_torch import r_option
    from edgetok.vit.methods.zerotprune_torch import ZeroTPrune

    per_layer, clamp = r_option(options, depth)
    return ZeroTPrune(per_layer, options.get("keep_rate"), depth, clamp, options.get("head_variance"),
                      options.get("similarity_share"))


METHOD = Method(
    name="zerotprune",
    label="Zero-TPrune",
    summary="Zero-shot pruning by Weighted PageRank on the attention graph: a similarity stage, then importance.",
    paper="Wang et al., Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in "
          "Pre-Trained Transformers, CVPR 2024",
    reference="none released: follows the paper's description",
    departures=(
        "No code was released; where the paper is silent edgetok chose: the share of r the S stage prunes "
        "(--similarity-share, default 0.5), the scale the head-variance bounds apply to (N*s, mean 1), the "
        "survivors' graph renormalised. Keeping every head (--head-variance 0,inf) gave 98.97 % against 97.06 % "
        "with the paper's bounds on the digits training split at r=6 (bench/zerotprune_choices.py).",
    ),
    options=(Option("r", "int", "tokens pruned in every block", range=(0, None), searchable=True, metavar="N"),
             Option("r_schedule", "schedule", "per-block list instead of --r"),
             Option("keep_rate", "float", "share of tokens kept in every block instead of --r", range=(0, 1),
                    bounds="(]", example="0.7", searchable=True, metavar="F"),
             Option("head_variance", "str", "LOW,HIGH variance of a head's N*score to be combined (0,inf keeps "
                    "every head)", default="0.01,0.7"),
             Option("similarity_share", "float", "share of each block's r pruned by similarity (S stage) rather "
                    "than importance", default=0.5, range=(0, 1), searchable=True)),
    groups=((("head_variance", "similarity_share"), ""),),
    build=build,
    record=lambda red: {"r_schedule": red.get("r_per_layer"), "head_variance": red.get("head_variance"),
                          "similarity_share": red.get("similarity_share")},
    tag=lambda o: f"zerotprune_r{o['r']}" if o.get("r") is not None else f"zerotprune_k{o.get('keep_rate')}",
    knob=lambda depth: [{"r": r} for r in range(1, 200)],
    knob_label="r={r}",
)
