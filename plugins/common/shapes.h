// Output shapes from the spec's shape rule, as edgetok.plugins.codegen encodes it: per output dim a prefix
// expression over input dims, fields and constants with + and -, and size tensors (a data-dependent dim with
// its opt and upper bound). Evaluated with TensorRT's IExprBuilder exactly as the Python plugin's
// get_output_shapes does: each size tensor declared once, on its first use.
#pragma once
#include "NvInferRuntime.h"
#include "common/tables.h"

namespace edgetok
{
bool outputShapes(gen::PluginDef const& plugin, double const* fields, nvinfer1::DimsExprs const* inputs,
    int32_t nbInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& builder);
} // namespace edgetok
