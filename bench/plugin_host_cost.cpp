// Host time of one IPluginV3OneRuntime::enqueue of libedgetok_plugins.so, the way TensorRT calls it, against the
// fake libcuda.so.1 of plugins/tests (it records nothing unless asked, so what is timed is the plugin's own host
// work: the launch plan, argument packing and the driver calls). Built and run by bench/plugin_host_cost.py.
//
//   plugin_host_cost LIBRARY PLUGIN FIELDS SHAPES ROUNDS CALLS
//     FIELDS  name:i:13,name:f:0.95   (i: int32, f: float32)
//     SHAPES  1x197x384;1x197x64;1x197x1
// Prints one line: the median over ROUNDS of the mean nanoseconds per call in a round of CALLS calls.
#include "NvInferRuntime.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
std::vector<std::string> split(std::string const& text, char sep)
{
    std::vector<std::string> out;
    std::stringstream in(text);
    std::string item;
    while (std::getline(in, item, sep))
        if (!item.empty())
            out.push_back(item);
    return out;
}

int fail(char const* what)
{
    std::fprintf(stderr, "error: %s\n", what);
    return 1;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 7)
        return fail("usage: plugin_host_cost LIBRARY PLUGIN FIELDS SHAPES ROUNDS CALLS");
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        return fail(dlerror());
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    if (!getCreators)
        return fail("the library exports no getCreators");
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    IPluginCreatorV3One* creator = nullptr;
    for (int32_t i = 0; i < n; ++i)
    {
        auto c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), argv[2]) == 0)
            creator = c;
    }
    if (!creator)
        return fail("no creator of that name");

    std::vector<std::string> names;
    std::vector<int32_t> ints;
    std::vector<float> floats;
    auto fieldText = split(argv[3], ',');
    ints.reserve(fieldText.size());
    floats.reserve(fieldText.size());
    std::vector<PluginField> fields;
    for (auto const& f : fieldText)
    {
        auto parts = split(f, ':');
        names.push_back(parts[0]);
    }
    for (size_t i = 0; i < fieldText.size(); ++i)
    {
        auto parts = split(fieldText[i], ':');
        if (parts[1] == "i")
        {
            ints.push_back(std::atoi(parts[2].c_str()));
            fields.emplace_back(names[i].c_str(), &ints.back(), PluginFieldType::kINT32, 1);
        }
        else
        {
            floats.push_back(std::strtof(parts[2].c_str(), nullptr));
            fields.emplace_back(names[i].c_str(), &floats.back(), PluginFieldType::kFLOAT32, 1);
        }
    }
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    std::unique_ptr<IPluginV3> plugin(creator->createPlugin("bench", &fc, TensorRTPhase::kRUNTIME));
    if (!plugin)
        return fail("createPlugin refused the fields");
    auto runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    auto build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));

    std::vector<PluginTensorDesc> in, out(static_cast<size_t>(build->getNbOutputs()));
    std::vector<void const*> inputs;
    std::vector<void*> outputs;
    for (auto const& shape : split(argv[4], ';'))
    {
        PluginTensorDesc d{};
        for (auto const& dim : split(shape, 'x'))
            d.dims.d[d.dims.nbDims++] = std::atoll(dim.c_str());
        d.type = DataType::kFLOAT;
        d.format = TensorFormat::kLINEAR;
        in.push_back(d);
        inputs.push_back(reinterpret_cast<void const*>(0x10000000 + 0x1000000 * inputs.size()));
    }
    for (size_t i = 0; i < out.size(); ++i)
        outputs.push_back(reinterpret_cast<void*>(0x20000000 + 0x1000000 * i));
    void* workspace = reinterpret_cast<void*>(0x40000000);
    auto stream = reinterpret_cast<cudaStream_t>(0x5000);

    auto enqueue = [&] {
        return runtime->enqueue(in.data(), out.data(), inputs.data(), outputs.data(), workspace, stream);
    };
    if (enqueue() != 0) // the first call opens the driver and loads the modules: not timed
        return fail("enqueue failed (see the message above)");
    int rounds = std::atoi(argv[5]), calls = std::atoi(argv[6]);
    std::vector<double> perCall;
    for (int r = 0; r < rounds; ++r)
    {
        auto start = std::chrono::steady_clock::now();
        for (int c = 0; c < calls; ++c)
            if (enqueue() != 0)
                return fail("enqueue failed while timing");
        std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
        perCall.push_back(took.count() / calls);
    }
    std::sort(perCall.begin(), perCall.end());
    std::printf("%.1f\n", perCall[perCall.size() / 2]);
    return 0;
}
