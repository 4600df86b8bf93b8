"""GTP-ViT: graph propagation of removed tokens into kept ones (Xu et al., WACV 2024); realised in ``gtp_torch``."""

from edgetok.vit.methods.method import Method, Option

MAX_ALPHA = 1.0  # gtp_torch.MAX_ALPHA (a test keeps them equal)


def build(depth: int, options: dict, model: dict):
    from edgetok.errors import EdgetokError
    from edgetok.vit.methods.gtp_torch import GTP, parse_propagate

    if options.get("propagate") is None:
        raise EdgetokError("--method gtp needs --propagate P (tokens propagated and removed per block), e.g. 8")
    alpha = options.get("alpha")
    return GTP(parse_propagate(options["propagate"], depth), 0.1 if alpha is None else alpha,
               options.get("graph") or "spatial", options.get("sparsity"))


METHOD = Method(
    name="gtp",
    label="GTP",
    summary="Graph propagation: the lowest-ranked tokens are removed and propagated into their graph neighbours.",
    paper="Xu et al., GTP-ViT: Efficient Vision Transformers via Graph-based Token Propagation, WACV 2024",
    reference="https://github.com/Ackesnal/GTP-ViT (commit 97a1178, models_v3.py)",
    departures=(
        "P = 0 is refused: in the reference it removes every patch token (token_rank[:, :-0] is empty).",
        "A --propagate list shorter than the depth leaves the later blocks alone (the reference gives every "
        "block a P).",
        "--alpha must lie in [0, 1] (the reference takes any): alpha = 1e30 overflowed float32 on the digits "
        "model (outputs inf, an export that cannot validate).",
    ),
    options=(Option("propagate", "schedule", "tokens propagated and removed per block, e.g. 8, or a list 8,8,4",
                    searchable=True, metavar="P"),
             Option("alpha", "float", "weight of the propagated tokens (a kept token's own is 1)", default=0.1,
                    range=(0, MAX_ALPHA), bounds="[]", example="0.1", searchable=True),
             Option("graph", "str", "spatial (8 grid neighbours), semantic (8 most similar) or mixed",
                    default="spatial", choices=("spatial", "semantic", "mixed"), searchable=True),
             Option("sparsity", "float", "θ, the share of each head's attention probabilities kept in every block "
                    "(the rest set to 0)", default=1.0, range=(0, 1), bounds="(]", symbol="θ", searchable=True,
                    example=None)),
    groups=((("propagate", "alpha", "graph"), ""), (("sparsity",), " (its θ)")),
    build=build,
    record=lambda red: {"propagate": red.get("propagate_per_layer"), "alpha": red.get("alpha"),
                          "graph": red.get("graph"), "sparsity": red.get("sparsity")},
    tag=lambda o: f"gtp_p{o.get('propagate')}".replace(",", "-"),
    knob=lambda depth: [{"propagate": str(p)} for p in range(1, 200)],
    knob_label="p={propagate}",
)
