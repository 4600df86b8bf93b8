"""EViT: keep the tokens the class token attends to most, fuse the rest into one (Liang et al., ICLR 2022)."""

from edgetok.vit.methods.method import Method, Option

KEEP_RATE = Option("keep_rate", "float", "fraction of non-prefix tokens kept at each keep layer", range=(0, 1),
                   bounds="(]", example="0.7", searchable=True, metavar="F")


def _blocks(value):
    return "must be 0-based block indices >= 0" if isinstance(value, list) and any(
        not isinstance(i, int) or i < 0 for i in value) else None


def build(depth: int, options: dict, model: dict):
    from edgetok.errors import EdgetokError
    from edgetok.vit.methods.evit_torch import EViT, default_keep_layers

    keep_rate, keep_layers = options.get("keep_rate"), options.get("keep_layers")
    if keep_layers is not None and not keep_layers:
        raise EdgetokError("--keep-layers is empty; give block indices such as 3,6,9 (or leave it out)")
    if keep_rate is None:
        raise EdgetokError("--method evit needs --keep-rate F in (0, 1], e.g. 0.7")
    return EViT(keep_rate, default_keep_layers(depth) if keep_layers is None else keep_layers, depth)


METHOD = Method(
    name="evit",
    label="EViT",
    summary="Keep the tokens with the highest class attention at the keep layers; fuse the rest into one token.",
    paper="Liang et al., Not All Patches are What You Need: Expediting Vision Transformers via Token "
          "Reorganizations, ICLR 2022",
    reference="https://github.com/youweiliang/evit",
    departures=(
        "Applied training-free to a pretrained model (the paper's results are with training); the keep layers "
        "default to blocks 3, 6 and 9 of 0..11 (the paper's 4th, 7th and 10th), scaled to the model's depth.",
    ),
    options=(KEEP_RATE,
             Option("keep_layers", "ints", "0-based blocks that prune, e.g. 3,6,9 (default: depth/4, depth/2, "
                    "3depth/4)", check=_blocks)),
    build=build,
    record=lambda red: {"keep_rate": red.get("keep_rate"), "keep_layers": red.get("keep_layers")},
    tag=lambda o: f"evit_k{o.get('keep_rate')}",
    knob=lambda depth: [{"keep_rate": round(k / 100, 2)} for k in range(10, 100)],
    knob_label="{keep_rate}",
)
