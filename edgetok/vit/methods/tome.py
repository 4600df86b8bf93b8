"""ToMe: bipartite soft matching merges r tokens per block (Bolya et al., ICLR 2023); realised in ``tome_torch``."""

from edgetok.vit.methods.method import Method, Option

R = Option("r", "int", "tokens merged in every block (late blocks clamped to what they can merge)", range=(0, None),
           searchable=True, metavar="N")
R_SCHEDULE = Option("r_schedule", "schedule", "'(r, inflect)' e.g. '(16, -1)' (decreasing), or a per-block list "
                    "'16,16,8'")


def build(depth: int, options: dict, model: dict):
    from edgetok.errors import EdgetokError
    from edgetok.vit.methods.tome_torch import ToMe, r_option

    if options.get("r") is None and options.get("r_schedule") is None:
        raise EdgetokError("--method tome needs --r N (tokens merged per block) or --r-schedule")
    return ToMe(*r_option(options, depth))


METHOD = Method(
    name="tome",
    label="ToMe",
    summary="Token Merging: bipartite soft matching on head-averaged keys, size-weighted merging, proportional "
            "attention.",
    paper="Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023",
    reference="https://github.com/facebookresearch/ToMe",
    departures=(
        "Register tokens, which the reference predates, are protected like the class and distillation tokens by "
        "the set they fall in (never merged in A, never a destination in B) and stay in front with the other "
        "prefix tokens: the reference has no such tokens.",
    ),
    options=(R, R_SCHEDULE),
    build=build,
    record=lambda red: {"r_schedule": red.get("r_per_layer")},
    tag=lambda o: f"tome_r{o['r'] if o.get('r') is not None else 'sched'}",
    knob=lambda depth: [{"r": r} for r in range(1, 200)],
    knob_label="r={r}",
)
