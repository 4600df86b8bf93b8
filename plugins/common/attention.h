// What both attention plugins share (size_biased_attention.py): check_attention and scale_of.
#pragma once
#include "common/plugin.h"

#include <cmath>

namespace edgetok
{
std::string checkAttention(char const* name, Shapes const& s, double scale, int64_t maxHeadDim);

//! scale_of: the field, or D^-0.5 when it is 0 (computed in double, as Python does, then passed as float32)
inline double scaleOf(int64_t dim, double scale)
{
    return scale != 0 ? scale : std::pow(static_cast<double>(dim), -0.5);
}
} // namespace edgetok
