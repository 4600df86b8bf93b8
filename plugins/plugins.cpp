// The library's two entry points, the only symbols it exports: TensorRT's loader (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins, the ONNX parser's plugin libraries) calls setLoggerFinder, then getCreators.
#include "common/logger.h"
#include "common/plugin.h"

#define EDGETOK_EXPORT extern "C" __attribute__((visibility("default")))

EDGETOK_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    edgetok::setLoggerFinder(finder);
}

EDGETOK_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* const creators[] = {edgetok::tokenMergeCreator(),
        edgetok::tokenPruneCreator(), edgetok::sizeBiasedAttentionCreator(), edgetok::blockSparseAttentionCreator()};
    nbCreators = sizeof(creators) / sizeof(creators[0]);
    return creators;
}
