// The shapes of the generated tables (edgetok_generated.h, edgetok_images.cpp): what edgetok.plugins.codegen
// writes from the Python specs and the cubin bundle, so that nothing the specs say is retyped in C++.
#pragma once
#include "NvInferRuntime.h"
#include <cstdint>

namespace edgetok
{
namespace gen
{
struct FieldDef
{
    char const* name;
    bool isInt; // INT32 field (Python int); else FLOAT32 (Python float)
    double defaultValue;
};

struct TensorDef
{
    char const* name;
    int32_t rank;
    nvinfer1::DataType dtypes[4];
    int32_t nbDtypes;
    bool sizeTensor; // a 0-d output holding a data-dependent dimension
};

// One output's dims: offsets into the plugin's shape code (prefix-encoded expressions, see common/shapes.h)
struct ShapeRule
{
    int32_t const* dims;
    int32_t nbDims;
};

enum class ParamType : int32_t
{
    kPtr,
    kI32,
    kF32,
    kI64
};

struct KernelDef
{
    char const* name;
    ParamType const* params; // declared parameters; the two hidden scratch pointers follow
    int32_t nbParams;
    int32_t global; // index among all plugins' kernels (the images' order)
};

struct PluginDef
{
    char const* name;
    char const* version;
    FieldDef const* fields;
    int32_t nbFields;
    TensorDef const* inputs;
    int32_t nbInputs;
    TensorDef const* outputs;
    int32_t nbOutputs;
    nvinfer1::TensorFormat const* formats;
    int32_t nbFormats;
    int64_t const* shapeCode;
    ShapeRule const* shapes;
    KernelDef const* kernels;
    int32_t nbKernels;
};

struct ArchDef
{
    char const* name; // "sm87"
    int32_t cc;       // 87
    char const* target;    // PTX target: "sm_87", "sm_90a"
    char const* assembler; // ptxas version of the cubins
    int32_t cubinDriver;   // oldest driver (cuDriverGetVersion) that loads the cubins; 0: any
    int32_t ptxDriver;     // oldest driver that JIT-compiles the PTX
    bool hasPtxDriver;
};

struct ImageDef
{
    int32_t arch;   // index into kArchs
    int32_t kernel; // global kernel index
    char const* entry;
    int32_t threads;
    int32_t shared;
    int32_t globalScratch;  // per block
    int32_t profileScratch; // per block
    unsigned char const* cubin;
    unsigned char const* ptx; // NUL-terminated, or nullptr
};

extern ArchDef const kArchs[];
extern int32_t const kArchCount;
extern ImageDef const kImages[];
extern int32_t const kImageCount;
extern char const* const kBundleSource;
extern char const* const kTriton;
} // namespace gen
} // namespace edgetok
