#include "common/driver.h"

#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <mutex>

namespace edgetok
{
namespace
{
Driver gDriver;
char gWhy[512];
bool gOk = false;
std::once_flag gOnce;

template <typename F>
bool bind(void* lib, char const* name, F*& fn)
{
    fn = reinterpret_cast<F*>(dlsym(lib, name));
    if (!fn)
        std::snprintf(gWhy, sizeof(gWhy), "the CUDA driver library has no %s; update the NVIDIA driver", name);
    return fn != nullptr;
}

void open()
{
    char const* path = std::getenv("EDGETOK_LIBCUDA");
    if (!path || !*path)
        path = "libcuda.so.1";
    void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib)
    {
        char const* err = dlerror();
        std::snprintf(gWhy, sizeof(gWhy), "cannot load the CUDA driver %s (%s): run the engine on a machine with an "
            "NVIDIA driver", path, err ? err : "unknown error");
        return;
    }
    Driver& d = gDriver;
    gOk = bind(lib, "cuInit", d.cuInit) && bind(lib, "cuDriverGetVersion", d.cuDriverGetVersion)
        && bind(lib, "cuCtxGetCurrent", d.cuCtxGetCurrent) && bind(lib, "cuCtxGetDevice", d.cuCtxGetDevice)
        && bind(lib, "cuDeviceGetAttribute", d.cuDeviceGetAttribute)
        && bind(lib, "cuModuleLoadData", d.cuModuleLoadData)
        && bind(lib, "cuModuleGetFunction", d.cuModuleGetFunction)
        && bind(lib, "cuFuncGetAttribute", d.cuFuncGetAttribute)
        && bind(lib, "cuFuncSetAttribute", d.cuFuncSetAttribute) && bind(lib, "cuLaunchKernel", d.cuLaunchKernel)
        && bind(lib, "cuGetErrorName", d.cuGetErrorName);
    // the library stays open for the process: modules loaded from it live as long
}
} // namespace

Driver const* driver(char const** why)
{
    std::call_once(gOnce, open);
    if (!gOk && why)
        *why = gWhy;
    return gOk ? &gDriver : nullptr;
}

char const* errorName(Driver const& d, CUresult err, char* buf, size_t size)
{
    char const* name = nullptr;
    if (d.cuGetErrorName(err, &name) == kSuccess && name)
        return name;
    std::snprintf(buf, size, "CUresult %d", err);
    return buf;
}
} // namespace edgetok
