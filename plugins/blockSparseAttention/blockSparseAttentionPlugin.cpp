// BlockSparseAttention (edgetok/plugins/block_sparse_attention.py): its check (after the shared attention
// check) and its launch plan (kernels/block_sparse_attention_plan.py).
#include "common/attention.h"
#include "common/text.h"
#include "edgetok_generated.h"

namespace edgetok
{
namespace
{
namespace g = gen::BlockSparseAttention;

int64_t smallestBlock(int64_t tokens)
{
    int64_t block = g::MIN_BLOCK;
    while (cdiv(tokens, block) > g::MAX_BLOCKS)
        block *= 2;
    return block;
}

std::string check(Shapes const& s, double const* f)
{
    std::string why = checkAttention("BlockSparseAttention", s, field(g::kPlugin, f, "scale"), g::MAX_HEAD_DIM);
    if (!why.empty())
        return why;
    int64_t tokens = s.d[0][2];
    auto block = static_cast<int64_t>(field(g::kPlugin, f, "block"));
    double mass = field(g::kPlugin, f, "mass"), keep = field(g::kPlugin, f, "keep");
    auto prefix = static_cast<int64_t>(field(g::kPlugin, f, "prefix"));
    if (block < g::MIN_BLOCK || (block & (block - 1)) || block > g::MAX_BLOCK)
        return "BlockSparseAttention: block=" + std::to_string(block) + " must be a power of two >= "
            + std::to_string(g::MIN_BLOCK) + " and <= " + std::to_string(g::MAX_BLOCK)
            + " (the kernel tile .. one block for any ViT), e.g. 64";
    if (cdiv(tokens, block) > g::MAX_BLOCKS)
        return "BlockSparseAttention: " + std::to_string(tokens) + " tokens make " + std::to_string(cdiv(tokens, block))
            + " blocks of " + std::to_string(block) + ", more than " + std::to_string(g::MAX_BLOCKS)
            + "; use a larger block (at least " + std::to_string(smallestBlock(tokens)) + ")";
    if (!(0 < mass && mass <= 1))
        return "BlockSparseAttention: mass=" + pyFloat(mass) + " must be in (0, 1], e.g. 0.95";
    if (!(0 <= keep && keep <= 1))
        return "BlockSparseAttention: keep=" + pyFloat(keep) + " must be in (0, 1] (or 0: select by mass)";
    if (prefix < 0)
        return "BlockSparseAttention: prefix=" + std::to_string(prefix) + " must be >= 0";
    return "";
}

void plan(Shapes const& s, double const* f, Plan& p)
{
    int64_t batch = s.d[0][0], heads = s.d[0][1], tokens = s.d[0][2], dim = s.d[0][3];
    auto block = static_cast<int64_t>(field(g::kPlugin, f, "block"));
    int64_t nb = cdiv(tokens, block);
    double scale = scaleOf(dim, field(g::kPlugin, f, "scale"));
    int64_t const counts[] = {batch * heads * nb * dim, batch * heads * nb * dim, batch * heads * nb,
        batch * heads * nb * nb, batch * heads * nb};
    int64_t at[5], offset = 0;
    for (int i = 0; i < 5; ++i)
    { // qbar, kbar, weight, selected, row_kept
        at[i] = offset;
        offset += alignUp(4 * counts[i]);
    }
    p.scratchBytes = offset;
    if (batch == 0)
        return;
    Arg q = input(0), k = input(1), v = input(2), size = input(3);
    Arg qbar = scratch(at[0]), kbar = scratch(at[1]), weight = scratch(at[2]), selected = scratch(at[3]),
        rowKept = scratch(at[4]);
    int64_t bh = batch * heads;
    p.add(g::K_bsa_pool, nb, bh, 1,
        {q, k, size, qbar, kbar, weight, integer(heads), integer(tokens), integer(dim), integer(block)});
    p.add(g::K_bsa_select, nb, bh, 1,
        {qbar, kbar, weight, selected, rowKept, integer(tokens), integer(dim), integer(block), real(scale),
            real(field(g::kPlugin, f, "mass")), real(field(g::kPlugin, f, "keep")),
            integer(static_cast<int64_t>(field(g::kPlugin, f, "prefix")))});
    p.add(g::K_bsa_kept, batch, 1, 1, {weight, rowKept, output(1), integer(heads), integer(tokens), integer(block)});
    p.add(dim <= 64 ? g::K_bsa_sparse_d64 : g::K_bsa_sparse_d128, cdiv(tokens, g::TILE), bh, 1,
        {q, k, v, size, selected, output(0), integer(heads), integer(tokens), integer(dim), integer(block),
            real(scale)});
}

PluginOps const kOps{g::kPlugin, check, plan};
} // namespace

Creator* blockSparseAttentionCreator()
{
    static Creator creator(kOps);
    return &creator;
}
} // namespace edgetok
