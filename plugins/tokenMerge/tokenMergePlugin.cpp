// TokenMerge (edgetok/plugins/token_merge.py): its check and its launch plan (kernels/token_merge_plan.py),
// written once in C++ and tested equal to the Python for every check case (tests/test_cpp_plugins.py).
#include "common/plugin.h"
#include "common/text.h"
#include "edgetok_generated.h"

#include <algorithm>

namespace edgetok
{
namespace
{
namespace g = gen::TokenMerge;

std::string check(Shapes const& s, double const* f)
{
    int64_t batch = s.d[0][0], tokens = s.d[0][1];
    auto r = static_cast<int64_t>(field(g::kPlugin, f, "r"));
    auto prefix = static_cast<int64_t>(field(g::kPlugin, f, "prefix"));
    auto classToken = static_cast<int64_t>(field(g::kPlugin, f, "class_token"));
    std::string bt = "[" + std::to_string(batch) + ", " + std::to_string(tokens);
    if (r < 0 || prefix < 0 || (classToken != 0 && classToken != 1))
        return "TokenMerge: r=" + std::to_string(r) + ", prefix=" + std::to_string(prefix) + ", class_token="
            + std::to_string(classToken) + " must be r >= 0, prefix >= 0, class_token 0 or 1";
    if (!(s.d[1][0] == batch && s.d[1][1] == tokens) || !s.is(2, {batch, tokens, 1}))
        return "TokenMerge: metric " + s.list(1) + " and size " + s.list(2) + " must be " + bt + ", D] and " + bt
            + ", 1] for tokens " + bt + ", C]";
    int64_t most = std::max<int64_t>(tokens - prefix, 0) / 2;
    if (r > most)
        return "TokenMerge: r=" + std::to_string(r) + " is too large for " + std::to_string(tokens) + " tokens with "
            + std::to_string(prefix) + " protected; at most " + std::to_string(most) + ": export with a lower --r";
    return "";
}

void plan(Shapes const& s, double const* f, Plan& p)
{
    int64_t batch = s.d[0][0], tokens = s.d[0][1], channels = s.d[0][2], dim = s.d[1][2];
    auto r = static_cast<int64_t>(field(g::kPlugin, f, "r"));
    auto prefix = static_cast<int64_t>(field(g::kPlugin, f, "prefix"));
    auto classToken = static_cast<int64_t>(field(g::kPlugin, f, "class_token"));
    int64_t na = std::max<int64_t>(tokens - 2 * ((prefix + 1) / 2) + 1, 0) / 2;
    int64_t offset = 0;
    int64_t const counts[] = {batch * tokens, batch * na, batch * na, batch * na, batch * na, batch * na};
    int64_t at[6];
    for (int i = 0; i < 6; ++i)
    { // norm, best, match, rank, kept, sources
        at[i] = offset;
        offset += alignUp(4 * counts[i]);
    }
    p.scratchBytes = offset;
    Arg norm = scratch(at[0]), best = scratch(at[1]), match = scratch(at[2]), rank = scratch(at[3]),
        kept = scratch(at[4]), sources = scratch(at[5]);
    Arg x = input(0), metric = input(1), size = input(2);
    if (batch == 0 || tokens - r == 0)
        return;
    if (r != 0)
    {
        int64_t aTiles = cdiv(na, g::RANK_BLOCK_A);
        p.add(g::K_tome_norm, cdiv(tokens, g::NORM_BLOCK_N), batch, 1, {metric, norm, integer(tokens), integer(dim)});
        p.add(g::K_tome_match, cdiv(na, g::MATCH_BLOCK_A), batch, 1,
            {metric, norm, best, match, integer(tokens), integer(dim), integer(prefix)});
        p.add(g::K_tome_rank, aTiles, batch, 1, {best, rank, integer(tokens), integer(prefix)});
        p.add(g::K_tome_slot, aTiles, batch, 1,
            {match, rank, kept, sources, integer(tokens), integer(r), integer(prefix), integer(classToken)});
    }
    p.add(g::K_tome_merge, tokens - r, batch, 1,
        {x, size, match, rank, kept, sources, output(0), output(1), integer(tokens), integer(channels), integer(r),
            integer(prefix)});
}

PluginOps const kOps{g::kPlugin, check, plan};
} // namespace

Creator* tokenMergeCreator()
{
    static Creator creator(kOps);
    return &creator;
}
} // namespace edgetok
