"""PiToMe: energy-based merging that protects informative tokens (Tran et al., NeurIPS 2024); in ``pitome_torch``."""

from edgetok.vit.methods.method import Method, Option


def build(depth: int, options: dict, model: dict):
    from edgetok.vit.methods.pitome_torch import PiToMe
    from edgetok.vit.methods.tome_torch import r_option

    per_layer, clamp = r_option(options, depth)
    return PiToMe(per_layer, options.get("keep_rate"), depth, clamp, options.get("pitome_variant"))


METHOD = Method(
    name="pitome",
    label="PiToMe",
    summary="Energy-based merging: tokens ranked by energy, the highest merged, informative ones protected.",
    paper="Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging, NeurIPS 2024",
    reference="https://github.com/hchautran/PiToMe (commit 550b5de, algo/pitome/patch/deit.py)",
    departures=(
        "All prefix tokens are protected (the reference protects only the class token); ties rank by position.",
        "--pitome-variant protected keeps edgetok's first configuration (m = 0.9 - 0.8 l/L, pitome merging in "
        "every block, proportional attention) because it agrees with the dense model more often; the default, "
        "reference, is the authors' current DeiT patch.",
    ),
    options=(Option("r", "int", "tokens merged in every block", range=(0, None), searchable=True, metavar="N"),
             Option("r_schedule", "schedule", "per-block list instead of --r"),
             Option("keep_rate", "float", "share of tokens kept in every block instead of --r", range=(0, 1),
                    bounds="(]", example="0.7", searchable=True, metavar="F"),
             Option("pitome_variant", "str", "reference (the authors' current DeiT patch: bsm merging in the first "
                    "half, margin 0.75-0.75*l/L) or protected (energy-protected merging everywhere, 0.9-0.8*l/L, "
                    "proportional attention)", default="reference", choices=("reference", "protected"))),
    build=build,
    record=lambda red: {"r_schedule": red.get("r_per_layer"),  # no variant recorded: the first, protected
                      "pitome_variant": red.get("variant", "protected")},
    tag=lambda o: f"pitome_r{o['r']}" if o.get("r") is not None else f"pitome_k{o.get('keep_rate')}",
    knob=lambda depth: [{"r": r} for r in range(1, 200)],
    knob_label="r={r}",
)
