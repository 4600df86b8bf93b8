// Launching a plugin's kernel plan with the embedded cubins through the driver API, as
// edgetok/plugins/launch.py does it from Python: the same image choice (select_arch, choose_image), the
// same parameters (declared, then the hidden global and profile scratch pointers), the same workspace layout.
// Nothing here allocates: plans are fixed-size values, per-context state sits in a fixed table.
#pragma once
#include "common/driver.h"
#include "common/tables.h"

#include <cstdint>
#include <string>

namespace edgetok
{
constexpr int32_t kMaxLaunches = 8;
constexpr int32_t kMaxArgs = 16;
constexpr int64_t kAlign = 256; // cudaMalloc's alignment: every workspace region starts on it
constexpr int32_t kDefaultShared = 48 * 1024;

enum class ArgKind : int32_t
{
    kInput,
    kOutput,
    kScratch, // byte offset into the workspace
    kInt,
    kFloat
};

struct Arg
{
    ArgKind kind;
    int64_t i; // input/output index, scratch offset, or the integer
    double f;
};

inline Arg input(int64_t i) { return {ArgKind::kInput, i, 0}; }
inline Arg output(int64_t i) { return {ArgKind::kOutput, i, 0}; }
inline Arg scratch(int64_t offset) { return {ArgKind::kScratch, offset, 0}; }
inline Arg integer(int64_t v) { return {ArgKind::kInt, v, 0}; }
inline Arg real(double v) { return {ArgKind::kFloat, 0, v}; }

struct Launch
{
    int32_t kernel; // index into the plugin's kernels
    int64_t grid[3];
    Arg args[kMaxArgs];
    int32_t nbArgs;
};

struct Plan
{
    Launch launches[kMaxLaunches];
    int32_t nbLaunches = 0;
    int64_t scratchBytes = 0;

    Launch& add(int32_t kernel, int64_t gx, int64_t gy, int64_t gz, std::initializer_list<Arg> args)
    {
        Launch& l = launches[nbLaunches++];
        l.kernel = kernel;
        l.grid[0] = gx;
        l.grid[1] = gy;
        l.grid[2] = gz;
        l.nbArgs = 0;
        for (Arg const& a : args)
            l.args[l.nbArgs++] = a;
        return l;
    }
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t alignUp(int64_t n) { return cdiv(n, kAlign) * kAlign; }

//! Workspace bytes for ``plan`` on any architecture of the embedded images (launch.workspace_size).
int64_t workspaceSize(gen::PluginDef const& plugin, Plan const& plan);

//! The architecture (index into kArchs) for a GPU of ``capability``, as launch.select_arch; -1 with the
//! one-line refusal in ``why``.
int32_t selectArch(int32_t capability, std::string* why);

//! Launch every kernel of ``plan`` on ``stream``; false with a one-line reason in ``why`` (size ``size``).
bool run(gen::PluginDef const& plugin, Plan const& plan, void const* const* inputs, void* const* outputs,
    void* workspace, void* stream, char* why, size_t size);
} // namespace edgetok
