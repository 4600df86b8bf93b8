// SizeBiasedAttention (edgetok/plugins/size_biased_attention.py): the shared attention check and the launch
// plan (kernels/size_biased_attention_plan.py).
#include "common/attention.h"
#include "common/text.h"
#include "edgetok_generated.h"

namespace edgetok
{
namespace
{
namespace g = gen::SizeBiasedAttention;

std::string check(Shapes const& s, double const* f)
{
    return checkAttention("SizeBiasedAttention", s, field(g::kPlugin, f, "scale"), g::MAX_HEAD_DIM);
}

void plan(Shapes const& s, double const* f, Plan& p)
{
    int64_t batch = s.d[0][0], heads = s.d[0][1], tokens = s.d[0][2], dim = s.d[0][3];
    double scale = scaleOf(dim, field(g::kPlugin, f, "scale"));
    int64_t region = alignUp(4 * batch * heads * tokens);
    Arg lse = scratch(0), classHeads = scratch(region);
    p.scratchBytes = 2 * region;
    if (batch == 0)
        return;
    bool narrow = dim <= 64;
    int64_t blockM = narrow ? g::sba_attend_d64_BLOCK_M : g::sba_attend_d128_BLOCK_M;
    p.add(narrow ? g::K_sba_attend_d64 : g::K_sba_attend_d128, cdiv(tokens, blockM), batch * heads, 1,
        {input(0), input(1), input(2), input(3), output(0), lse, classHeads, integer(heads), integer(tokens),
            integer(dim), real(scale)});
    p.add(g::K_sba_class_row, cdiv(tokens, g::ROW_BLOCK_N), batch, 1,
        {classHeads, output(1), integer(heads), integer(tokens)});
}

PluginOps const kOps{g::kPlugin, check, plan};
} // namespace

Creator* sizeBiasedAttentionCreator()
{
    static Creator creator(kOps);
    return &creator;
}
} // namespace edgetok
