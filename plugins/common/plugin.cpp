#include "common/plugin.h"

#include "common/logger.h"
#include "common/shapes.h"
#include "common/text.h"
#include "edgetok_generated.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

namespace edgetok
{
using namespace nvinfer1;

bool Shapes::is(int32_t i, std::initializer_list<int64_t> dims) const
{
    return rank[i] == static_cast<int32_t>(dims.size()) && std::equal(dims.begin(), dims.end(), d[i]);
}

std::string Shapes::list(int32_t i) const
{
    return pyList(d[i], rank[i]);
}

double field(gen::PluginDef const& def, double const* fields, char const* name)
{
    for (int32_t i = 0; i < def.nbFields; ++i)
        if (!std::strcmp(def.fields[i].name, name))
            return fields[i];
    return std::nan("");
}

namespace
{
// The Python plugin reads a field's first element as a Python scalar (numpy .item()): ints stay ints
bool scalar(PluginField const& f, double& value, bool& integral)
{
    if (f.length < 1 || !f.data)
        return false;
    integral = true;
    switch (f.type)
    {
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); break;
    case PluginFieldType::kINT64: value = static_cast<double>(*static_cast<int64_t const*>(f.data)); break;
    case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(f.data); break;
    case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(f.data); break;
    case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(f.data); integral = false; break;
    case PluginFieldType::kFLOAT64: value = *static_cast<double const*>(f.data); integral = false; break;
    default: value = std::nan(""); integral = false; break;
    }
    return true;
}

std::string dtypeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kINT8: return "int8";
    case DataType::kUINT8: return "uint8";
    case DataType::kBOOL: return "bool";
    case DataType::kFP8: return "fp8";
    default: return "datatype " + std::to_string(static_cast<int32_t>(t));
    }
}

Shapes shapesOf(DynamicPluginTensorDesc const* desc, int32_t n, bool max)
{
    Shapes s{};
    s.n = std::min(n, kMaxTensors);
    for (int32_t i = 0; i < s.n; ++i)
    {
        Dims const& dims = max ? desc[i].max : desc[i].desc.dims;
        s.rank[i] = std::max(0, std::min(dims.nbDims, Dims::MAX_DIMS));
        std::copy(dims.d, dims.d + s.rank[i], s.d[i]);
    }
    return s;
}
} // namespace

std::string resolveFields(gen::PluginDef const& def, PluginFieldCollection const* fc, double* values)
{
    bool given[kMaxFields] = {};
    double raw[kMaxFields];
    bool integral[kMaxFields];
    std::vector<std::string> unknown;
    for (int32_t k = 0; fc && k < fc->nbFields; ++k)
    {
        PluginField const& f = fc->fields[k];
        double value;
        bool isInt;
        if (!f.name || !scalar(f, value, isInt))
            continue;
        int32_t i = 0;
        while (i < def.nbFields && std::strcmp(def.fields[i].name, f.name))
            ++i;
        if (i < def.nbFields)
        {
            given[i] = true;
            raw[i] = value;
            integral[i] = isInt;
        }
        else if (std::strcmp(f.name, "plugin_version") && std::strcmp(f.name, "plugin_namespace"))
            unknown.push_back(f.name);
    }
    if (!unknown.empty())
    {
        std::sort(unknown.begin(), unknown.end());
        unknown.erase(std::unique(unknown.begin(), unknown.end()), unknown.end());
        std::string why = std::string(def.name) + ": unknown field(s) ";
        for (size_t i = 0; i < unknown.size(); ++i)
            why += (i ? ", " : "") + unknown[i];
        why += "; it takes ";
        for (int32_t i = 0; i < def.nbFields; ++i)
            why += (i ? ", " : "") + std::string(def.fields[i].name);
        return why;
    }
    for (int32_t i = 0; i < def.nbFields; ++i)
    {
        gen::FieldDef const& f = def.fields[i];
        if (!given[i])
        {
            values[i] = f.defaultValue;
            continue;
        }
        double v = raw[i];
        if (f.isInt && (std::isnan(v) || std::isinf(v) || v != std::trunc(v)))
            return std::string(def.name) + ": field " + f.name + "=" + pyField(v, integral[i])
                + " is not an integer; give e.g. " + f.name + "=" + pyField(f.defaultValue, f.isInt);
        values[i] = v;
    }
    return "";
}

std::string validate(PluginOps const& ops, Shapes const& shapes, DataType const* dtypes, double const* fields)
{
    gen::PluginDef const& def = ops.def;
    if (shapes.n != def.nbInputs)
    {
        std::string names;
        for (int32_t i = 0; i < def.nbInputs; ++i)
            names += (i ? ", " : "") + std::string(def.inputs[i].name);
        return std::string(def.name) + " takes " + std::to_string(def.nbInputs) + " inputs (" + names + "), got "
            + std::to_string(shapes.n);
    }
    for (int32_t i = 0; i < def.nbInputs; ++i)
        if (shapes.rank[i] != def.inputs[i].rank)
            return std::string(def.name) + ": input " + def.inputs[i].name + " must have rank "
                + std::to_string(def.inputs[i].rank) + ", got shape " + shapes.list(i);
    for (int32_t i = 0; dtypes && i < def.nbInputs; ++i)
    {
        gen::TensorDef const& t = def.inputs[i];
        if (std::find(t.dtypes, t.dtypes + t.nbDtypes, dtypes[i]) == t.dtypes + t.nbDtypes)
        {
            std::string takes;
            for (int32_t k = 0; k < t.nbDtypes; ++k)
                takes += (k ? "/" : "") + dtypeName(t.dtypes[k]);
            return std::string(def.name) + ": input " + t.name + " is " + dtypeName(dtypes[i]) + ", but the plugin takes "
                + takes + "; keep the reduction step in float32";
        }
    }
    return ops.check(shapes, fields);
}

Plugin::Plugin(PluginOps const& ops, std::string node, double const* fields)
    : mOps(ops)
    , mNode(std::move(node))
    , mCollection{0, mSerialized}
{
    std::copy(fields, fields + ops.def.nbFields, mFields);
    std::vector<std::pair<std::string, std::string>> sorted;
    for (int32_t i = 0; i < ops.def.nbFields; ++i)
        sorted.emplace_back(ops.def.fields[i].name, pyField(mFields[i], ops.def.fields[i].isInt));
    std::sort(sorted.begin(), sorted.end());
    mTimingCacheID = std::string(gen::kNamespace) + "::" + ops.def.name + "/" + ops.def.version + "/";
    for (size_t i = 0; i < sorted.size(); ++i)
        mTimingCacheID += (i ? "," : "") + sorted[i].first + "=" + sorted[i].second;
}

char const* Plugin::getTimingCacheID() noexcept
{
    return mTimingCacheID.c_str();
}

IPluginCapability* Plugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* Plugin::clone() noexcept
{
    try
    {
        return new Plugin(mOps, mNode, mFields);
    }
    catch (...)
    {
        return nullptr;
    }
}

char const* Plugin::getPluginName() const noexcept
{
    return mOps.def.name;
}

char const* Plugin::getPluginVersion() const noexcept
{
    return mOps.def.version;
}

char const* Plugin::getPluginNamespace() const noexcept
{
    return gen::kNamespace;
}

int32_t Plugin::getNbOutputs() const noexcept
{
    return mOps.def.nbOutputs;
}

void Plugin::report(std::string const& why) const noexcept
{
    try
    {
        log(ILogger::Severity::kERROR, mNode.empty() ? why : mNode + ": " + why);
    }
    catch (...)
    {
    }
}

int32_t Plugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) noexcept
{
    try
    {
        Shapes shapes = shapesOf(in, nbInputs, true);
        DataType dtypes[kMaxTensors];
        for (int32_t i = 0; i < shapes.n; ++i)
            dtypes[i] = in[i].desc.type;
        std::string why = validate(mOps, shapes, dtypes, mFields);
        if (why.empty())
            return 0;
        report(why);
    }
    catch (...)
    {
    }
    return -1;
}

int32_t Plugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const*, int32_t) const noexcept
{
    if (nbOutputs != mOps.def.nbOutputs)
        return -1;
    for (int32_t i = 0; i < nbOutputs; ++i)
        outputTypes[i] = mOps.def.outputs[i].dtypes[0];
    return 0;
}

int32_t Plugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (outputShapes(mOps.def, mFields, inputs, nbInputs, outputs, nbOutputs, exprBuilder))
        return 0;
    report(std::string(mOps.def.name) + ": output shapes need " + std::to_string(mOps.def.nbInputs) + " inputs of ranks "
        "the spec gives");
    return -1;
}

bool Plugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (pos < 0 || pos >= nbInputs + nbOutputs || nbInputs != mOps.def.nbInputs || nbOutputs != mOps.def.nbOutputs)
        return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    gen::TensorDef const& t = pos < nbInputs ? mOps.def.inputs[pos] : mOps.def.outputs[pos - nbInputs];
    gen::PluginDef const& def = mOps.def;
    return std::find(def.formats, def.formats + def.nbFormats, desc.format) != def.formats + def.nbFormats
        && std::find(t.dtypes, t.dtypes + t.nbDtypes, desc.type) != t.dtypes + t.nbDtypes;
}

size_t Plugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    if (nbInputs != mOps.def.nbInputs)
        return 0;
    Shapes shapes = shapesOf(inputs, nbInputs, true);
    Plan plan;
    mOps.plan(shapes, mFields, plan);
    return static_cast<size_t>(workspaceSize(mOps.def, plan));
}

int32_t Plugin::onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept
{
    return 0;
}

int32_t Plugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
    void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    Shapes shapes;
    shapes.n = mOps.def.nbInputs;
    for (int32_t i = 0; i < shapes.n; ++i)
    {
        shapes.rank[i] = std::max(0, std::min(inputDesc[i].dims.nbDims, Dims::MAX_DIMS));
        std::copy(inputDesc[i].dims.d, inputDesc[i].dims.d + shapes.rank[i], shapes.d[i]);
    }
    Plan plan;
    mOps.plan(shapes, mFields, plan);
    char why[1024];
    if (run(mOps.def, plan, inputs, outputs, workspace, stream, why, sizeof(why)))
        return 0;
    report(why);
    return -1;
}

IPluginV3* Plugin::attachToContext(IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* Plugin::getFieldsToSerialize() noexcept
{
    for (int32_t i = 0; i < mOps.def.nbFields; ++i)
    {
        gen::FieldDef const& f = mOps.def.fields[i];
        if (f.isInt)
            mStored[i].i = static_cast<int32_t>(mFields[i]);
        else
            mStored[i].f = static_cast<float>(mFields[i]);
        mSerialized[i] = PluginField(f.name, &mStored[i], f.isInt ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32, 1);
    }
    mCollection.nbFields = mOps.def.nbFields;
    mCollection.fields = mSerialized;
    return &mCollection;
}

Creator::Creator(PluginOps const& ops)
    : mOps(ops)
    , mCollection{ops.def.nbFields, mFields}
{
    for (int32_t i = 0; i < ops.def.nbFields; ++i)
        mFields[i] = PluginField(ops.def.fields[i].name, nullptr,
            ops.def.fields[i].isInt ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32, 0);
}

IPluginV3* Creator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    try
    {
        double values[kMaxFields];
        std::string why = resolveFields(mOps.def, fc, values);
        if (!why.empty())
        {
            log(ILogger::Severity::kERROR, std::string(name ? name : "") + (name && *name ? ": " : "") + why);
            return nullptr;
        }
        return new Plugin(mOps, name ? name : "", values);
    }
    catch (...)
    {
        return nullptr;
    }
}

PluginFieldCollection const* Creator::getFieldNames() noexcept
{
    return &mCollection;
}

char const* Creator::getPluginName() const noexcept
{
    return mOps.def.name;
}

char const* Creator::getPluginVersion() const noexcept
{
    return mOps.def.version;
}

char const* Creator::getPluginNamespace() const noexcept
{
    return gen::kNamespace;
}
} // namespace edgetok
