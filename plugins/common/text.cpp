#include "common/text.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace edgetok
{
std::string pyFloat(double value)
{
    if (std::isnan(value))
        return "nan";
    if (std::isinf(value))
        return value > 0 ? "inf" : "-inf";
    char buf[64];
    auto done = std::to_chars(buf, buf + sizeof(buf), value, std::chars_format::scientific);
    std::string sci(buf, done.ptr);
    // sci: [-]d[.ddd]e[+-]XX -> sign, digits, exponent of the first digit
    bool negative = sci[0] == '-';
    std::string body = negative ? sci.substr(1) : sci;
    size_t e = body.find('e');
    int exponent = std::atoi(body.c_str() + e + 1);
    std::string digits;
    for (size_t i = 0; i < e; ++i)
        if (body[i] != '.')
            digits += body[i];
    std::string out;
    if (exponent < -4 || exponent >= 16)
    { // Python: d.ddde+XX, at least two exponent digits
        out = digits.substr(0, 1);
        if (digits.size() > 1)
            out += "." + digits.substr(1);
        char exp[16];
        std::snprintf(exp, sizeof(exp), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
        out += exp;
    }
    else if (exponent < 0)
        out = "0." + std::string(-exponent - 1, '0') + digits;
    else if (static_cast<int>(digits.size()) <= exponent + 1)
        out = digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
    else
        out = digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
    return negative ? "-" + out : out;
}

std::string pyField(double value, bool isInt)
{
    return isInt ? std::to_string(static_cast<int64_t>(value)) : pyFloat(value);
}

std::string pyList(int64_t const* dims, int32_t nbDims)
{
    std::string out = "[";
    for (int32_t i = 0; i < nbDims; ++i)
        out += (i ? ", " : "") + std::to_string(dims[i]);
    return out + "]";
}
} // namespace edgetok
