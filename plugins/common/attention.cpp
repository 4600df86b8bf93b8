#include "common/attention.h"
#include "common/text.h"

namespace edgetok
{
std::string checkAttention(char const* name, Shapes const& s, double scale, int64_t maxHeadDim)
{
    int64_t batch = s.d[0][0], tokens = s.d[0][2], dim = s.d[0][3];
    std::string n = name;
    auto same = [&](int32_t i) { return s.is(i, {s.d[0][0], s.d[0][1], s.d[0][2], s.d[0][3]}); };
    if (!same(1) || !same(2))
        return n + ": q " + s.list(0) + ", k " + s.list(1) + " and v " + s.list(2)
            + " must have one shape [B, H, N, D] (self-attention)";
    if (!s.is(3, {batch, tokens, 1}))
        return n + ": size " + s.list(3) + " must be [" + std::to_string(batch) + ", " + std::to_string(tokens)
            + ", 1] for q " + s.list(0);
    if (!(1 <= dim && dim <= maxHeadDim))
        return n + ": head dim " + std::to_string(dim) + " is not in 1.." + std::to_string(maxHeadDim)
            + "; keep this block's attention as standard ops (--attention dense)";
    if (tokens < 1)
        return n + ": q " + s.list(0) + " has no tokens";
    if (!(scale >= 0) || !std::isfinite(scale))
        return n + ": scale=" + pyFloat(scale) + " must be a finite number >= 0 (0: D^-0.5)";
    return "";
}
} // namespace edgetok
