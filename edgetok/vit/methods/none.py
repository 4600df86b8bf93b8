"""``none``: the dense model, no reduction (the baseline every method is compared with)."""

from edgetok.vit.methods.method import Method

METHOD = Method(
    name="none",
    summary="No reduction: the original model, bit for bit.",
    build=lambda depth, options, model: None,
    tag=lambda options: "dense",
)
