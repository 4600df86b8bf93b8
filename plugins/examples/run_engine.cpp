// A plain C++ program that runs an engine built with edgetok's plugins, with no Python anywhere: the way a
// C++ application, a DeepStream or Triton backend, or trtexec does it.
//
//   run_engine ENGINE [--plugins libedgetok_plugins.so] [--batch N] [--iterations N]
//
// --plugins loads the library into the runtime's plugin registry before deserializing (what trtexec's
// --dynamicPlugins does); without it the engine must carry the library (edgetok build-engine
// --serialize-plugins), which the runtime is allowed to run here (setEngineHostCodeAllowed). Inputs are
// filled with a fixed pseudo-random pattern at the first profile's OPT shape with the batch given; the
// program prints each output's shape and first values, and the mean time of one enqueueV3.
//
// For TensorRT 10.x/11.x (JetPack 6.1+ on Jetson, desktop TensorRT); built with plugins/examples/CMakeLists.txt.
#include "NvInferRuntime.h"

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
class Logger : public ILogger
{
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
            std::fprintf(stderr, "TensorRT: %s\n", msg);
    }
};

size_t elementSize(DataType type)
{
    switch (type)
    {
    case DataType::kINT64: return 8;
    case DataType::kFLOAT:
    case DataType::kINT32: return 4;
    case DataType::kHALF:
    case DataType::kBF16: return 2;
    default: return 1;
    }
}

bool check(cudaError_t err, char const* what)
{
    if (err != cudaSuccess)
        std::fprintf(stderr, "error: %s failed: %s\n", what, cudaGetErrorString(err));
    return err == cudaSuccess;
}

std::string shapeText(Dims const& d)
{
    std::string out;
    for (int32_t i = 0; i < d.nbDims; ++i)
        out += (i ? "x" : "") + std::to_string(d.d[i]);
    return out;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc < 2)
    {
        std::fprintf(stderr, "usage: run_engine ENGINE [--plugins LIB.so] [--batch N] [--iterations N]\n");
        return 2;
    }
    std::string enginePath = argv[1], plugins;
    int batch = 1, iterations = 20;
    for (int i = 2; i + 1 < argc; i += 2)
    {
        if (!std::strcmp(argv[i], "--plugins"))
            plugins = argv[i + 1];
        else if (!std::strcmp(argv[i], "--batch"))
            batch = std::atoi(argv[i + 1]);
        else if (!std::strcmp(argv[i], "--iterations"))
            iterations = std::atoi(argv[i + 1]);
    }
    std::ifstream file(enginePath, std::ios::binary);
    std::vector<char> blob((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (blob.empty())
    {
        std::fprintf(stderr, "error: cannot read %s\n", enginePath.c_str());
        return 1;
    }

    Logger logger;
    std::unique_ptr<IRuntime> runtime(createInferRuntime(logger));
    if (!plugins.empty() && !runtime->getPluginRegistry().loadLibrary(plugins.c_str()))
    {
        std::fprintf(stderr, "error: the plugin registry could not load %s\n", plugins.c_str());
        return 1;
    }
    runtime->setEngineHostCodeAllowed(plugins.empty()); // an engine that carries its plugin library
    std::unique_ptr<ICudaEngine> engine(runtime->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine)
    {
        std::fprintf(stderr, "error: cannot deserialize %s (plugins not found, or built for another GPU/TensorRT)\n",
            enginePath.c_str());
        return 1;
    }
    std::unique_ptr<IExecutionContext> context(engine->createExecutionContext());
    cudaStream_t stream;
    if (!check(cudaStreamCreate(&stream), "cudaStreamCreate"))
        return 1;

    std::vector<void*> buffers;
    std::vector<std::string> outputs;
    for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
    {
        char const* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != TensorIOMode::kINPUT)
            continue;
        Dims shape = engine->getProfileShape(name, 0, OptProfileSelector::kOPT);
        shape.d[0] = batch;
        context->setInputShape(name, shape);
        size_t count = 1;
        for (int32_t d = 0; d < shape.nbDims; ++d)
            count *= static_cast<size_t>(shape.d[d]);
        std::vector<char> host(count * elementSize(engine->getTensorDataType(name)), 0);
        if (engine->getTensorDataType(name) == DataType::kFLOAT)
        {
            auto values = reinterpret_cast<float*>(host.data());
            for (size_t k = 0; k < count; ++k)
                values[k] = static_cast<float>((k * 2654435761u) % 2001) / 1000.F - 1.F;
        }
        void* device = nullptr;
        if (!check(cudaMalloc(&device, host.size()), "cudaMalloc")
            || !check(cudaMemcpy(device, host.data(), host.size(), cudaMemcpyHostToDevice), "cudaMemcpy"))
            return 1;
        buffers.push_back(device);
        context->setTensorAddress(name, device);
        std::printf("input  %s %s\n", name, shapeText(shape).c_str());
    }
    for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
    {
        char const* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != TensorIOMode::kOUTPUT)
            continue;
        Dims shape = context->getTensorShape(name);
        size_t count = 1;
        for (int32_t d = 0; d < shape.nbDims; ++d)
        {
            if (shape.d[d] < 0)
            {
                std::fprintf(stderr, "error: output %s has a data-dependent shape; this example allocates only "
                                     "outputs whose shape the inputs decide\n", name);
                return 1;
            }
            count *= static_cast<size_t>(shape.d[d]);
        }
        void* device = nullptr;
        if (!check(cudaMalloc(&device, std::max<size_t>(1, count * elementSize(engine->getTensorDataType(name)))),
                "cudaMalloc"))
            return 1;
        buffers.push_back(device);
        context->setTensorAddress(name, device);
        outputs.push_back(name);
    }

    if (!context->enqueueV3(stream) || !check(cudaStreamSynchronize(stream), "the first run"))
    {
        std::fprintf(stderr, "error: enqueueV3 failed (a plugin's reason is in the TensorRT log above)\n");
        return 1;
    }
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iterations; ++i)
        context->enqueueV3(stream);
    if (!check(cudaStreamSynchronize(stream), "the timed runs"))
        return 1;
    std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;

    for (auto const& name : outputs)
    {
        Dims shape = context->getTensorShape(name.c_str());
        std::printf("output %s %s", name.c_str(), shapeText(shape).c_str());
        if (engine->getTensorDataType(name.c_str()) == DataType::kFLOAT)
        {
            float first[4] = {};
            size_t count = 1;
            for (int32_t d = 0; d < shape.nbDims; ++d)
                count *= static_cast<size_t>(shape.d[d]);
            size_t n = count < 4 ? count : 4;
            cudaMemcpy(first, context->getTensorAddress(name.c_str()), n * sizeof(float), cudaMemcpyDeviceToHost);
            for (size_t k = 0; k < n; ++k)
                std::printf(" %.5g", first[k]);
        }
        std::printf("\n");
    }
    std::printf("%d runs, %.3f ms per enqueueV3 (batch %d, host + GPU, synchronized once)\n", iterations,
        took.count() / iterations, batch);
    for (void* b : buffers)
        cudaFree(b);
    cudaStreamDestroy(stream);
    return 0;
}
