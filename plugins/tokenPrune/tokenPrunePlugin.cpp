// TokenPrune (edgetok/plugins/token_prune.py): its check and its launch plan (kernels/token_prune_plan.py);
// its third output is the size tensor K, counted on the device (the shape rule is generated).
#include "common/plugin.h"
#include "common/text.h"
#include "edgetok_generated.h"

namespace edgetok
{
namespace
{
namespace g = gen::TokenPrune;

std::string check(Shapes const& s, double const* f)
{
    int64_t batch = s.d[0][0], tokens = s.d[0][1];
    auto prefix = static_cast<int64_t>(field(g::kPlugin, f, "prefix"));
    std::string bt = "[" + std::to_string(batch) + ", " + std::to_string(tokens);
    if (prefix < 0 || prefix > tokens)
        return "TokenPrune: prefix=" + std::to_string(prefix) + " must be between 0 and the " + std::to_string(tokens)
            + " tokens; export with the model's number of class/register tokens";
    if (!s.is(1, {batch, tokens, 1}) || !s.is(2, {batch, tokens}))
        return "TokenPrune: size " + s.list(1) + " and keep " + s.list(2) + " must be " + bt + ", 1] and " + bt
            + "] for tokens " + bt + ", C]";
    return "";
}

void plan(Shapes const& s, double const* f, Plan& p)
{
    int64_t batch = s.d[0][0], tokens = s.d[0][1], channels = s.d[0][2];
    auto prefix = static_cast<int64_t>(field(g::kPlugin, f, "prefix"));
    Arg sources = scratch(0), counts = scratch(alignUp(4 * batch * tokens));
    p.scratchBytes = alignUp(4 * batch * tokens) + alignUp(4 * batch);
    Arg x = input(0), size = input(1), keep = input(2);
    if (batch != 0)
        p.add(g::K_prune_scan, batch, 1, 1, {size, keep, sources, counts, integer(tokens), integer(prefix)});
    p.add(g::K_prune_count, 1, 1, 1, {counts, output(2), integer(batch)});
    if (batch != 0 && tokens != 0)
        p.add(g::K_prune_gather, tokens, batch, 1,
            {x, size, sources, counts, output(2), output(0), output(1), integer(tokens), integer(channels)});
}

PluginOps const kOps{g::kPlugin, check, plan};
} // namespace

Creator* tokenPruneCreator()
{
    static Creator creator(kOps);
    return &creator;
}
} // namespace edgetok
