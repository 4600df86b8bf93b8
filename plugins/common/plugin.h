// The IPluginV3 and IPluginCreatorV3One every edgetok plugin is: what the Python plugin classes
// (edgetok/plugins/tensorrt.py) do, over the generated spec tables. A plugin contributes only what is
// arbitrary code in Python: its check (the spec's _check, same one-line reasons) and its launch plan
// (kernels/<name>_plan.py), in its own folder beside its creator.
#pragma once
#include "NvInferRuntime.h"
#include "common/launcher.h"
#include "common/tables.h"

#include <string>
#include <vector>

namespace edgetok
{
constexpr int32_t kMaxTensors = 8;
constexpr int32_t kMaxFields = 8;

//! Concrete input shapes of one call (what the Python checks and plans take).
struct Shapes
{
    int64_t d[kMaxTensors][nvinfer1::Dims::MAX_DIMS];
    int32_t rank[kMaxTensors];
    int32_t n;

    bool is(int32_t i, std::initializer_list<int64_t> dims) const; //!< shape i == dims (Python tuple ==)
    std::string list(int32_t i) const;                            //!< Python list(shape i)
};

struct PluginOps
{
    gen::PluginDef const& def;
    //! The spec's _check on validated input shapes and resolved fields: "" when fine, else its one-line reason.
    std::string (*check)(Shapes const& shapes, double const* fields);
    //! The launch plan of kernels/<name>_plan.py.
    void (*plan)(Shapes const& shapes, double const* fields, Plan& plan);
};

//! A field's value by name (the generated order is the spec's).
double field(gen::PluginDef const& def, double const* fields, char const* name);

//! spec.resolve on TensorRT plugin fields: "" and the values with defaults filled in, or the one-line reason.
std::string resolveFields(gen::PluginDef const& def, nvinfer1::PluginFieldCollection const* fc, double* values);

//! spec.validate: input count, ranks, dtypes, then the plugin's check; "" when fine.
std::string validate(PluginOps const& ops, Shapes const& shapes, nvinfer1::DataType const* dtypes, double const* fields);

class Plugin : public nvinfer1::IPluginV3,
               public nvinfer1::IPluginV3OneCore,
               public nvinfer1::IPluginV3OneBuild,
               public nvinfer1::IPluginV3OneRuntime
{
public:
    Plugin(PluginOps const& ops, std::string node, double const* fields);

    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    int32_t getNbOutputs() const noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    //! One timing-cache entry per configuration, as the Python plugin's timing_cache_id: instances with the
    //! same fields share it ("edgetok::TokenMerge/1/class_token=1,prefix=1,r=13").
    char const* getTimingCacheID() noexcept override;

    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void report(std::string const& why) const noexcept;

    PluginOps const& mOps;
    std::string mNode;
    std::string mTimingCacheID;
    double mFields[kMaxFields];
    union Stored
    {
        int32_t i;
        float f;
    } mStored[kMaxFields];
    nvinfer1::PluginField mSerialized[kMaxFields];
    nvinfer1::PluginFieldCollection mCollection;
};

class Creator : public nvinfer1::IPluginCreatorV3One
{
public:
    explicit Creator(PluginOps const& ops);

    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    PluginOps const& mOps;
    nvinfer1::PluginField mFields[kMaxFields];
    nvinfer1::PluginFieldCollection mCollection;
};

// One per plugin folder (e.g. tokenMerge/tokenMergePlugin.cpp)
Creator* tokenMergeCreator();
Creator* tokenPruneCreator();
Creator* sizeBiasedAttentionCreator();
Creator* blockSparseAttentionCreator();
} // namespace edgetok
