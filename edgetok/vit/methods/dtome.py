"""dtome: DyMU's dynamic ToMe, merges per block follow the image by calibrated thresholds; in ``dtome_torch``."""

from edgetok.vit.methods.method import Method, Option


def build(depth: int, options: dict, model: dict):
    from edgetok.vit.methods.dtome_torch import make_dtome

    thresholds = options.get("thresholds")
    return make_dtome(depth, options.get("r"), options.get("r_schedule"),
                      None if thresholds is None else [float("inf") if t is None else t for t in thresholds],
                      options.get("cap"))


METHOD = Method(
    name="dtome",
    label="dtome",
    summary="DyMU's dynamic ToMe: every pair above a per-block threshold calibrated on a folder merges.",
    paper="Wang et al., DyMU: Dynamic Merging and Virtual Unmerging, arXiv 2504.17040",
    reference="https://github.com/MikeWangWZHL/dymu (src/open_clip/tome.py)",
    departures=(
        "Every image follows DyMU's per-image path (an image none of whose pairs exceeds the threshold keeps its "
        "tokens in place, also inside a padded batch), so a padded batch equals its images alone; the batched "
        "path's re-layout is used only while calibrating.",
        "The batched path's size + 1e-4 divisor is left out everywhere, as the per-image path does: adding it on "
        "digits_dtome (539 held-out digits, batch 1) moved logits by at most 0.0015 and changed no prediction.",
    ),
    options=(Option("r", "int", "the mean tokens merged per block its calibration aims at", range=(0, None),
                    searchable=True, metavar="N"),
             Option("r_schedule", "schedule", "per-block targets in ToMe's forms instead of --r"),
             Option("calibrate", "str", "image folder its per-block thresholds are calibrated on", metavar="DIR"),
             Option("cap", "int", "at most this many merges per image and block", range=(0, None)),
             Option("thresholds", "schedule", "calibrated per-block thresholds (from a sidecar)", cli=False)),
    build=build,
    record=lambda red: {"r_schedule": red.get("target_r_per_layer"), "thresholds": red.get("thresholds"),
                          "cap": red.get("cap")},
    tag=lambda o: f"dtome_r{o['r'] if o.get('r') is not None else 'sched'}",
)
