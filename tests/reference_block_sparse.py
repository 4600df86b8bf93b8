"""BlockSparseAttention's selection and attention written as plain loops, one image, head and query block at a
time, from the spec's words (not from edgetok's vectorised reference): the independent check of it."""

import math


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def block_sparse(q, k, v, size, scale, block, mass, keep, prefix):
    """q, k, v: nested lists [B][H][N][D]; size: [B][N]. Returns (out [B][H][N][D], kept [B])."""
    batch, heads, tokens, dim = len(q), len(q[0]), len(q[0][0]), len(q[0][0][0])
    nb = math.ceil(tokens / block)
    out = [[[[0.0] * dim for _ in range(tokens)] for _ in range(heads)] for _ in range(batch)]
    kept = []
    for b in range(batch):
        members = [[t for t in range(i * block, min(i * block + block, tokens)) if size[b][t] > 0] for i in range(nb)]
        weight = [sum(size[b][t] for t in m) for m in members]
        real_blocks = [i for i in range(nb) if members[i]]
        fractions = []
        for h in range(heads):
            def mean(x, i):
                rows = members[i]
                return [sum(x[b][h][t][d] for t in rows) / max(len(rows), 1) for d in range(dim)]

            qbar = [mean(q, i) for i in range(nb)]
            kbar = [mean(k, i) for i in range(nb)]
            pairs = 0
            for i in range(nb):
                logits = [(_dot(qbar[i], kbar[j]) * scale + math.log(weight[j])) if weight[j] > 0 else -math.inf
                          for j in range(nb)]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                p = [x / sum(e) for x in e]
                order = sorted(range(nb), key=lambda j: (-p[j], j))
                chosen, before = set(), 0.0
                for rank, j in enumerate(order):
                    if keep > 0:
                        take = rank < math.ceil(keep * len(real_blocks))
                    else:
                        take = mass >= 1 or before < mass
                    if take:
                        chosen.add(j)
                    before += p[j]
                chosen.add(i)
                if prefix > 0:
                    chosen.add(0)
                if members[i]:
                    pairs += sum(1 for j in chosen if members[j])
                keys = [t for j in sorted(chosen) for t in range(j * block, min(j * block + block, tokens))
                        if size[b][t] > 0]
                for t in range(i * block, min(i * block + block, tokens)):
                    logits = [_dot(q[b][h][t], k[b][h][u]) * scale + math.log(size[b][u]) for u in keys]
                    top = max(logits)
                    e = [math.exp(x - top) for x in logits]
                    out[b][h][t] = [sum(w * v[b][h][u][d] for w, u in zip(e, keys)) / sum(e) for d in range(dim)]
            fractions.append(pairs / len(real_blocks) ** 2)
        kept.append(sum(fractions) / heads)
    return out, kept
