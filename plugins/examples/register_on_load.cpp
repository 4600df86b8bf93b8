// libedgetok_register.so: registers edgetok's plugins with TensorRT as soon as it is loaded, for hosts that
// only dlopen (or LD_PRELOAD) a plugin library and expect it to register itself: Triton Inference Server's
// TensorRT backend (--backend-config=tensorrt,plugins=...) and DeepStream (custom-lib-path, LD_PRELOAD).
//
// libedgetok_plugins.so itself does not register on load: it hands its creators to whoever calls its
// getCreators (TensorRT's IPluginRegistry::loadLibrary, trtexec --dynamicPlugins), so that the one file
// serves TensorRT and TensorRT-RTX alike and links no TensorRT library. This wrapper, which does link
// libnvinfer, asks TensorRT's registry to load it: $EDGETOK_PLUGIN_LIB, else libedgetok_plugins.so beside
// this file.
#include "NvInferRuntime.h"

#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <string>

namespace
{
std::string besideThisLibrary()
{
    Dl_info info{};
    if (!dladdr(reinterpret_cast<void*>(&besideThisLibrary), &info) || !info.dli_fname)
        return "libedgetok_plugins.so";
    std::string self = info.dli_fname;
    auto slash = self.rfind('/');
    return (slash == std::string::npos ? std::string() : self.substr(0, slash + 1)) + "libedgetok_plugins.so";
}

__attribute__((constructor)) void registerEdgetokPlugins()
{
    char const* given = std::getenv("EDGETOK_PLUGIN_LIB");
    std::string library = given && *given ? given : besideThisLibrary();
    if (!getPluginRegistry()->loadLibrary(library.c_str()))
        std::fprintf(stderr, "edgetok: TensorRT's plugin registry could not load %s (set EDGETOK_PLUGIN_LIB)\n",
            library.c_str());
}
} // namespace
