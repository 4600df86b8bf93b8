#include "common/shapes.h"

namespace edgetok
{
namespace
{
// opcodes: edgetok.plugins.codegen OP_INPUT, OP_CONST, OP_FIELD, OP_SUM, OP_SUB, OP_SIZE
enum Op : int64_t
{
    kInput,
    kConst,
    kField,
    kSum,
    kSub,
    kSize
};

struct Eval
{
    gen::PluginDef const& plugin;
    double const* fields;
    nvinfer1::DimsExprs const* inputs;
    int32_t nbInputs;
    nvinfer1::IExprBuilder& builder;
    nvinfer1::IDimensionExpr const* declared[8];

    static void skip(int64_t const*& code)
    {
        switch (*code++)
        {
        case kInput: code += 2; break;
        case kConst:
        case kField: code += 1; break;
        case kSum:
        case kSub: skip(code); skip(code); break;
        case kSize: code += 1; skip(code); skip(code); break;
        default: break;
        }
    }

    nvinfer1::IDimensionExpr const* expr(int64_t const*& code)
    {
        switch (*code++)
        {
        case kInput:
        {
            int64_t i = *code++, j = *code++;
            return i < nbInputs && j < inputs[i].nbDims ? inputs[i].d[j] : nullptr;
        }
        case kConst: return builder.constant(*code++);
        case kField: return builder.constant(static_cast<int64_t>(fields[*code++]));
        case kSum:
        case kSub:
        {
            bool sum = code[-1] == kSum;
            auto a = expr(code);
            auto b = expr(code);
            if (!a || !b)
                return nullptr;
            return builder.operation(sum ? nvinfer1::DimensionOperation::kSUM : nvinfer1::DimensionOperation::kSUB,
                *a, *b);
        }
        case kSize:
        {
            int64_t output = *code++;
            if (output < 0 || output >= 8)
                return nullptr;
            if (declared[output])
            { // declared on its first use; the bounds are not built again
                skip(code);
                skip(code);
                return declared[output];
            }
            auto opt = expr(code);
            auto upper = expr(code);
            if (!opt || !upper)
                return nullptr;
            return declared[output] = builder.declareSizeTensor(static_cast<int32_t>(output), *opt, *upper);
        }
        default: return nullptr;
        }
    }
};
} // namespace

bool outputShapes(gen::PluginDef const& plugin, double const* fields, nvinfer1::DimsExprs const* inputs,
    int32_t nbInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& builder)
{
    if (nbInputs != plugin.nbInputs || nbOutputs != plugin.nbOutputs)
        return false;
    Eval eval{plugin, fields, inputs, nbInputs, builder, {}};
    for (int32_t o = 0; o < nbOutputs; ++o)
    {
        gen::ShapeRule const& rule = plugin.shapes[o];
        outputs[o].nbDims = rule.nbDims;
        for (int32_t k = 0; k < rule.nbDims; ++k)
        {
            int64_t const* code = plugin.shapeCode + rule.dims[k];
            if (!(outputs[o].d[k] = eval.expr(code)))
                return false;
        }
    }
    return true;
}
} // namespace edgetok
