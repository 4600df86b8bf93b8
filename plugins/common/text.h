// One-line messages spelled as the Python specs spell them (f-strings with Python's repr of numbers and
// lists), so that the C++ library refuses with exactly the reasons the Python plugins give.
#pragma once
#include <cstdint>
#include <string>

namespace edgetok
{
//! Python's repr() of a float: shortest round-trip digits, "1.0" not "1", exponent outside [1e-4, 1e16).
std::string pyFloat(double value);
//! A field value as the Python message shows it: an int field's integer, else pyFloat.
std::string pyField(double value, bool isInt);
//! Python's list(shape): "[2, 17, 40]".
std::string pyList(int64_t const* dims, int32_t nbDims);
} // namespace edgetok
