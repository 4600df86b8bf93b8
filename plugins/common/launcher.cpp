#include "common/launcher.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "edgetok_generated.h"

namespace edgetok
{
namespace
{
// Compute capabilities of Tegra GPUs: no cubin compatibility among them or with desktop GPUs (launch.TEGRA)
bool tegra(int32_t cc)
{
    static int32_t const kTegra[] = {32, 53, 62, 72, 87, 101, 110};
    return std::find(std::begin(kTegra), std::end(kTegra), cc) != std::end(kTegra);
}

bool archSpecific(gen::ArchDef const& a)
{
    size_t n = std::strlen(a.target);
    return n && a.target[n - 1] == 'a';
}

bool runsOn(gen::ArchDef const& a, int32_t capability)
{
    if (a.cc == capability)
        return true;
    if (archSpecific(a) || tegra(a.cc) || tegra(capability))
        return false;
    return a.cc / 10 == capability / 10 && a.cc < capability;
}

gen::ImageDef const* image(int32_t arch, int32_t kernel)
{
    for (int32_t i = 0; i < gen::kImageCount; ++i)
        if (gen::kImages[i].arch == arch && gen::kImages[i].kernel == kernel)
            return &gen::kImages[i];
    return nullptr;
}

int64_t blocks(int64_t const* grid)
{
    return grid[0] * grid[1] * grid[2];
}

struct Function
{
    bool loaded;
    CUfunction fn;
    gen::ImageDef const* image;
};

struct Context
{
    CUcontext ctx;
    int32_t capability;
    int32_t optin;
    int32_t arch;
    bool ptx;
    int driverVersion; // cuDriverGetVersion when the context was first seen
    Function functions[gen::kKernelCount];
};

constexpr int32_t kMaxContexts = 256;
std::mutex gLock;
Context gContexts[kMaxContexts];
int32_t gNbContexts = 0;
bool gInitialised = false;

bool fail(char* why, size_t size, char const* format, ...) __attribute__((format(printf, 3, 4)));

bool fail(char* why, size_t size, char const* format, ...)
{
    va_list args;
    va_start(args, format);
    std::vsnprintf(why, size, format, args);
    va_end(args);
    return false;
}

std::string cudaText(int version)
{
    return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

// choose_image: the cubins when the driver is new enough for their assembler, else their PTX
bool chooseImage(int32_t capability, Context& c, char* why, size_t size)
{
    std::string refusal;
    c.arch = selectArch(capability, &refusal);
    if (c.arch < 0)
        return fail(why, size, "%s", refusal.c_str());
    gen::ArchDef const& a = gen::kArchs[c.arch];
    c.ptx = false;
    if (a.cubinDriver == 0 || c.driverVersion >= a.cubinDriver)
        return true;
    if (a.hasPtxDriver && c.driverVersion >= a.ptxDriver)
    {
        c.ptx = true;
        return true;
    }
    int needs = a.hasPtxDriver ? std::min(a.cubinDriver, a.ptxDriver) : a.cubinDriver;
    return fail(why, size, "this GPU's driver is CUDA %s, but the %s cubins in libedgetok_plugins.so come from ptxas %s "
        "and need a CUDA %s driver: update the NVIDIA driver to one for CUDA %s or newer",
        cudaText(c.driverVersion).c_str(), a.name, a.assembler, cudaText(a.cubinDriver).c_str(), cudaText(needs).c_str());
}

#define CALL(what, expr)                                                                                               \
    do                                                                                                                 \
    {                                                                                                                  \
        CUresult err_ = (expr);                                                                                        \
        if (err_ != kSuccess)                                                                                          \
        {                                                                                                              \
            char name_[64];                                                                                            \
            return fail(why, size, "%s failed: %s", what, errorName(d, err_, name_, sizeof(name_)));                   \
        }                                                                                                              \
    } while (0)

Context* context(Driver const& d, char* why, size_t size)
{
    if (!gInitialised)
    {
        CUresult err = d.cuInit(0);
        char name[64];
        if (err != kSuccess)
            return fail(why, size, "cuInit failed: %s", errorName(d, err, name, sizeof(name))), nullptr;
        gInitialised = true;
    }
    CUcontext ctx = nullptr;
    char name[64];
    CUresult err = d.cuCtxGetCurrent(&ctx);
    if (err != kSuccess)
        return fail(why, size, "cuCtxGetCurrent failed: %s", errorName(d, err, name, sizeof(name))), nullptr;
    if (!ctx)
        return fail(why, size, "no current CUDA context in enqueue; run the engine with TensorRT's runtime"), nullptr;
    for (int32_t i = 0; i < gNbContexts; ++i)
        if (gContexts[i].ctx == ctx)
            return &gContexts[i];
    if (gNbContexts == kMaxContexts)
        return fail(why, size, "more than %d CUDA contexts ran edgetok plugins in this process", kMaxContexts), nullptr;
    Context c{};
    c.ctx = ctx;
    CUdevice device = 0;
    int major = 0, minor = 0, optin = 0;
    if ((err = d.cuCtxGetDevice(&device)) != kSuccess)
        return fail(why, size, "cuCtxGetDevice failed: %s", errorName(d, err, name, sizeof(name))), nullptr;
    if ((err = d.cuDeviceGetAttribute(&major, kAttrCcMajor, device)) != kSuccess
        || (err = d.cuDeviceGetAttribute(&minor, kAttrCcMinor, device)) != kSuccess
        || (err = d.cuDeviceGetAttribute(&optin, kAttrSharedOptin, device)) != kSuccess)
        return fail(why, size, "cuDeviceGetAttribute failed: %s", errorName(d, err, name, sizeof(name))), nullptr;
    if ((err = d.cuDriverGetVersion(&c.driverVersion)) != kSuccess)
        return fail(why, size, "cuDriverGetVersion failed: %s", errorName(d, err, name, sizeof(name))), nullptr;
    c.capability = 10 * major + minor;
    c.optin = optin;
    if (!chooseImage(c.capability, c, why, size))
        return nullptr;
    gContexts[gNbContexts] = c;
    return &gContexts[gNbContexts++];
}

bool imageError(char const* name)
{
    static char const* const kImageErrors[] = {"CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_NO_BINARY_FOR_GPU",
        "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "CUDA_ERROR_INVALID_SOURCE"};
    for (char const* e : kImageErrors)
        if (!std::strcmp(e, name))
            return true;
    return false;
}

// _load + _function: the module of kernel ``k`` (global index) in this context, its function and limits
Function* function(Driver const& d, Context& c, gen::KernelDef const& kernel, char* why, size_t size)
{
    Function& f = c.functions[kernel.global];
    if (f.loaded)
        return &f;
    gen::ArchDef const& arch = gen::kArchs[c.arch];
    gen::ImageDef const* img = image(c.arch, kernel.global);
    if (!img)
        return fail(why, size, "no kernel %s for %s in libedgetok_plugins.so; rebuild the library", kernel.name,
                   arch.name), nullptr;
    CUmodule module = nullptr;
    char name[64];
    if (!c.ptx)
    {
        CUresult err = d.cuModuleLoadData(&module, img->cubin);
        if (err != kSuccess)
        {
            char const* errName = errorName(d, err, name, sizeof(name));
            bool fallback = imageError(errName) && img->ptx && c.driverVersion >= arch.ptxDriver;
            if (!fallback)
                return fail(why, size, "loading the %s cubin (%s) failed: %s", kernel.name, arch.name, errName), nullptr;
            c.ptx = true; // as launch.py: this driver refuses the cubins, so the PTX from now on
            module = nullptr;
        }
    }
    if (c.ptx)
    {
        if (!img->ptx)
            return fail(why, size, "JIT-compiling the %s PTX (%s) failed: libedgetok_plugins.so has no PTX for it",
                       kernel.name, arch.name), nullptr;
        CUresult err = d.cuModuleLoadData(&module, img->ptx);
        if (err != kSuccess)
            return fail(why, size, "JIT-compiling the %s PTX (%s) failed: %s", kernel.name, arch.name,
                       errorName(d, err, name, sizeof(name))), nullptr;
    }
    CUfunction fn = nullptr;
    CUresult err = d.cuModuleGetFunction(&fn, module, img->entry);
    if (err != kSuccess)
        return fail(why, size, "cuModuleGetFunction %s failed: %s", img->entry, errorName(d, err, name, sizeof(name))),
               nullptr;
    if (img->shared > kDefaultShared)
    { // as Triton's launcher: opt in to all the shared memory the GPU allows
        if (img->shared > c.optin)
            return fail(why, size, "kernel %s needs %d bytes of shared memory; this GPU allows %d", kernel.name,
                       img->shared, c.optin), nullptr;
        int staticShared = 0;
        if ((err = d.cuFuncGetAttribute(&staticShared, kFuncSharedSizeBytes, fn)) != kSuccess)
            return fail(why, size, "cuFuncGetAttribute failed: %s", errorName(d, err, name, sizeof(name))), nullptr;
        if ((err = d.cuFuncSetAttribute(fn, kFuncMaxDynamicShared, c.optin - staticShared)) != kSuccess)
            return fail(why, size, "cuFuncSetAttribute %s failed: %s", kernel.name,
                       errorName(d, err, name, sizeof(name))), nullptr;
    }
    f.fn = fn;
    f.image = img;
    f.loaded = true;
    return &f;
}

struct Layout
{
    int64_t globalOffset, profileOffset, total;
};

// launch.layout: the plan's scratch, then hidden global and profile scratch sized for the largest launch
template <typename Sizes>
Layout layout(gen::PluginDef const& plugin, Plan const& plan, Sizes sizes)
{
    int64_t glob = 0, prof = 0;
    for (int32_t i = 0; i < plan.nbLaunches; ++i)
    {
        int64_t g = 0, p = 0;
        sizes(plugin.kernels[plan.launches[i].kernel], g, p);
        glob = std::max(glob, blocks(plan.launches[i].grid) * g);
        prof = std::max(prof, blocks(plan.launches[i].grid) * p);
    }
    int64_t start = alignUp(plan.scratchBytes);
    return {start, start + alignUp(glob), start + alignUp(glob) + alignUp(prof)};
}
} // namespace

int32_t selectArch(int32_t capability, std::string* why)
{
    int32_t best = -1;
    for (int32_t i = 0; i < gen::kArchCount; ++i)
        if (runsOn(gen::kArchs[i], capability) && (best < 0 || gen::kArchs[i].cc > gen::kArchs[best].cc))
            best = i;
    if (best >= 0 || !why)
        return best;
    std::string have;
    std::string reason;
    for (int32_t i = 0; i < gen::kArchCount; ++i)
    {
        gen::ArchDef const& a = gen::kArchs[i];
        have += (i ? ", " : "") + std::string(a.name);
        if (!reason.empty() || a.cc / 10 != capability / 10)
            continue;
        std::string arch = a.name;
        if (tegra(a.cc) != tegra(capability))
            reason = arch + " is " + (tegra(a.cc) ? "a Tegra" : "a desktop")
                + " build and Tegra and desktop GPUs do not run each other's cubins";
        else if (tegra(a.cc))
            reason = "Tegra cubins run only on the exact GPU they were built for";
        else if (archSpecific(a))
            reason = arch + " cubins (" + a.target + ") run only on sm" + std::to_string(a.cc);
        else
            reason = arch + " cubins do not run on the older sm" + std::to_string(capability);
    }
    *why = "libedgetok_plugins.so has no kernels that run on this GPU (sm" + std::to_string(capability) + "; it has "
        + (have.empty() ? "none" : have) + (reason.empty() ? "" : "; " + reason)
        + "): rebuild it with `edgetok plugins build --lib --arch sm" + std::to_string(capability) + "`";
    return -1;
}

int64_t workspaceSize(gen::PluginDef const& plugin, Plan const& plan)
{
    return layout(plugin, plan, [](gen::KernelDef const& k, int64_t& g, int64_t& p) {
        for (int32_t i = 0; i < gen::kImageCount; ++i)
            if (gen::kImages[i].kernel == k.global)
            {
                g = std::max<int64_t>(g, gen::kImages[i].globalScratch);
                p = std::max<int64_t>(p, gen::kImages[i].profileScratch);
            }
    }).total;
}

bool run(gen::PluginDef const& plugin, Plan const& plan, void const* const* inputs, void* const* outputs,
    void* workspace, void* stream, char* why, size_t size)
{
    char const* missing = nullptr;
    Driver const* dp = driver(&missing);
    if (!dp)
        return fail(why, size, "%s", missing);
    Driver const& d = *dp;
    Function* loaded[kMaxLaunches];
    {
        std::lock_guard<std::mutex> guard(gLock);
        Context* c = context(d, why, size);
        if (!c)
            return false;
        for (int32_t i = 0; i < plan.nbLaunches; ++i)
            if (!(loaded[i] = function(d, *c, plugin.kernels[plan.launches[i].kernel], why, size)))
                return false;
    }
    Layout where = layout(plugin, plan, [&](gen::KernelDef const& k, int64_t& g, int64_t& p) {
        for (int32_t i = 0; i < plan.nbLaunches; ++i)
            if (plugin.kernels[plan.launches[i].kernel].global == k.global)
            {
                g = loaded[i]->image->globalScratch;
                p = loaded[i]->image->profileScratch;
            }
    });
    char* base = static_cast<char*>(workspace);
    for (int32_t i = 0; i < plan.nbLaunches; ++i)
    {
        Launch const& launch = plan.launches[i];
        if (blocks(launch.grid) == 0)
            continue;
        gen::KernelDef const& kernel = plugin.kernels[launch.kernel];
        gen::ImageDef const& img = *loaded[i]->image;
        union Value
        {
            void* p;
            int32_t i32;
            int64_t i64;
            float f32;
        } values[kMaxArgs + 2];
        void* params[kMaxArgs + 2];
        for (int32_t a = 0; a < kernel.nbParams; ++a)
        {
            Arg const& arg = launch.args[a];
            Value& v = values[a];
            switch (arg.kind)
            {
            case ArgKind::kInput: v.p = const_cast<void*>(inputs[arg.i]); break;
            case ArgKind::kOutput: v.p = outputs[arg.i]; break;
            case ArgKind::kScratch: v.p = base + arg.i; break;
            case ArgKind::kInt:
                if (kernel.params[a] == gen::ParamType::kI64)
                    v.i64 = arg.i;
                else
                    v.i32 = static_cast<int32_t>(arg.i);
                break;
            case ArgKind::kFloat: v.f32 = static_cast<float>(arg.f); break;
            }
            params[a] = &v;
        }
        values[kernel.nbParams].p = img.globalScratch ? base + where.globalOffset : nullptr;
        values[kernel.nbParams + 1].p = img.profileScratch ? base + where.profileOffset : nullptr;
        params[kernel.nbParams] = &values[kernel.nbParams];
        params[kernel.nbParams + 1] = &values[kernel.nbParams + 1];
        CUresult err = d.cuLaunchKernel(loaded[i]->fn, static_cast<unsigned>(launch.grid[0]),
            static_cast<unsigned>(launch.grid[1]), static_cast<unsigned>(launch.grid[2]), img.threads, 1, 1,
            img.shared, static_cast<CUstream>(stream), params, nullptr);
        if (err != kSuccess)
        {
            char name[64];
            return fail(why, size, "launching %s failed: %s", kernel.name, errorName(d, err, name, sizeof(name)));
        }
    }
    return true;
}
} // namespace edgetok
