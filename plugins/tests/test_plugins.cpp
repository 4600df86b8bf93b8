// GoogleTest checks of libedgetok_plugins against the Python plugins, without TensorRT or a GPU.
//
// What the Python side says (output shapes, serialized fields, formats, refusals, the launches its launcher
// makes against the same fake driver) is written by tests/test_cpp_plugins.py into $EDGETOK_TEST_CASES/cases.tsv
// (one tab-separated line per check) and the launch logs beside it; every test here compares the C++ library
// with those lines. Without $EDGETOK_TEST_CASES the comparisons are skipped, saying so.
#include "NvInferRuntime.h"
#include "common/launcher.h"
#include "common/plugin.h"
#include "common/text.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <cstring>
#include <dlfcn.h>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

// Every C++ allocation of this binary (the library's objects are linked into it) is counted: enqueue must make none.
std::atomic<long> gAllocations{0};

void* operator new(std::size_t size)
{
    ++gAllocations;
    if (void* p = std::malloc(size ? size : 1))
        return p;
    throw std::bad_alloc();
}

void operator delete(void* p) noexcept
{
    std::free(p);
}

void operator delete(void* p, std::size_t) noexcept
{
    std::free(p);
}

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);

using namespace nvinfer1;

namespace
{
// ---- what the plugins log -------------------------------------------------------------------------------------
class Recorder : public ILogger, public ILoggerFinder
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        lines.emplace_back(msg);
    }
    ILogger* findLogger() noexcept override
    {
        return this;
    }
    std::vector<std::string> lines;
};

Recorder& recorder()
{
    static Recorder r;
    static bool set = (setLoggerFinder(&r), true);
    (void) set;
    return r;
}

// ---- a test double of TensorRT's IExprBuilder: expressions as text and value -----------------------------------
class FakeExpr : public IDimensionExpr
{
public:
    FakeExpr(std::string text, int64_t value, bool constant, bool size)
        : text(std::move(text))
        , value(value)
        , mImplObj(*this, constant, size)
    {
        mImpl = &mImplObj;
    }
    ~FakeExpr() noexcept override = default;

    std::string text;
    int64_t value;

private:
    struct Impl : apiv::VDimensionExpr
    {
        Impl(FakeExpr& e, bool c, bool s)
            : self(e)
            , constant(c)
            , size(s)
        {
        }
        bool isConstant() const override
        {
            return constant;
        }
        int64_t getConstantValue() const override
        {
            return constant ? self.value : -1;
        }
        bool isSizeTensor() const override
        {
            return size;
        }
        FakeExpr& self;
        bool constant, size;
    } mImplObj;
};

class FakeBuilder : public IExprBuilder
{
public:
    FakeBuilder()
        : mImplObj(*this)
    {
        mImpl = &mImplObj;
    }
    ~FakeBuilder() noexcept override = default;

    FakeExpr const* make(std::string text, int64_t value, bool constant = true, bool size = false)
    {
        exprs.push_back(std::make_unique<FakeExpr>(std::move(text), value, constant, size));
        return exprs.back().get();
    }

    std::vector<std::unique_ptr<FakeExpr>> exprs;

private:
    struct Impl : apiv::VExprBuilder
    {
        explicit Impl(FakeBuilder& b)
            : self(b)
        {
        }
        IDimensionExpr const* constant(int64_t value) override
        {
            return self.make(std::to_string(value), value);
        }
        IDimensionExpr const* operation(
            DimensionOperation op, IDimensionExpr const& first, IDimensionExpr const& second) override
        {
            auto const& a = static_cast<FakeExpr const&>(first);
            auto const& b = static_cast<FakeExpr const&>(second);
            bool sum = op == DimensionOperation::kSUM, sub = op == DimensionOperation::kSUB;
            int64_t v = sum ? a.value + b.value : sub ? a.value - b.value : -1;
            return self.make("(" + a.text + (sum ? "+" : sub ? "-" : "?") + b.text + ")", v,
                a.isConstant() && b.isConstant());
        }
        IDimensionExpr const* declareSizeTensor(
            int32_t outputIndex, IDimensionExpr const& opt, IDimensionExpr const& upper) override
        {
            auto const& o = static_cast<FakeExpr const&>(opt);
            auto const& u = static_cast<FakeExpr const&>(upper);
            return self.make("size" + std::to_string(outputIndex) + "[" + o.text + "|" + u.text + "]", u.value, false, true);
        }
        FakeBuilder& self;
    } mImplObj;
};

// ---- the cases file --------------------------------------------------------------------------------------------
std::vector<std::string> split(std::string const& text, char sep)
{
    std::vector<std::string> out;
    std::string item;
    std::istringstream in(text);
    while (std::getline(in, item, sep))
        out.push_back(item);
    if (!text.empty() && text.back() == sep)
        out.emplace_back();
    return out;
}

std::string casesDir()
{
    char const* dir = std::getenv("EDGETOK_TEST_CASES");
    return dir ? dir : "";
}

std::vector<std::vector<std::string>> cases(std::string const& kind)
{
    std::vector<std::vector<std::string>> found;
    std::ifstream in(casesDir() + "/cases.tsv");
    std::string line;
    while (std::getline(in, line))
    {
        auto cols = split(line, '\t');
        if (!cols.empty() && cols[0] == kind)
            found.push_back(cols);
    }
    return found;
}

#define REQUIRE_CASES(kind)                                                                                            \
    auto rows = cases(kind);                                                                                           \
    if (casesDir().empty())                                                                                            \
        GTEST_SKIP() << "no $EDGETOK_TEST_CASES: run through tests/test_cpp_plugins.py, which writes the Python side"; \
    ASSERT_FALSE(rows.empty()) << "no " kind " lines in " << casesDir() << "/cases.tsv"

IPluginCreatorV3One* creator(std::string const& name)
{
    int32_t n = 0;
    auto creators = getCreators(n);
    for (int32_t i = 0; i < n; ++i)
    {
        auto c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (name == c->getPluginName())
            return c;
    }
    return nullptr;
}

// Fields as "name:type:value" joined by ',' (types i32, i64, f32 as hex bits, f64 as repr)
struct Fields
{
    std::vector<PluginField> fields;
    std::vector<std::string> names;
    std::vector<std::unique_ptr<unsigned char[]>> data;
    PluginFieldCollection fc{};
};

std::unique_ptr<Fields> parseFields(std::string const& text)
{
    auto f = std::make_unique<Fields>();
    for (auto const& item : split(text, ','))
    {
        if (item.empty())
            continue;
        auto parts = split(item, ':');
        f->names.push_back(parts.at(0));
        f->data.emplace_back(new unsigned char[8]());
        unsigned char* p = f->data.back().get();
        PluginFieldType type;
        if (parts.at(1) == "i32")
        {
            int32_t v = static_cast<int32_t>(std::stoll(parts.at(2)));
            std::memcpy(p, &v, 4);
            type = PluginFieldType::kINT32;
        }
        else if (parts.at(1) == "i64")
        {
            int64_t v = std::stoll(parts.at(2));
            std::memcpy(p, &v, 8);
            type = PluginFieldType::kINT64;
        }
        else if (parts.at(1) == "f32")
        {
            uint32_t bits = static_cast<uint32_t>(std::stoul(parts.at(2), nullptr, 16));
            std::memcpy(p, &bits, 4);
            type = PluginFieldType::kFLOAT32;
        }
        else
        {
            double v = std::strtod(parts.at(2).c_str(), nullptr);
            std::memcpy(p, &v, 8);
            type = PluginFieldType::kFLOAT64;
        }
        f->fields.emplace_back(nullptr, p, type, 1);
    }
    for (size_t i = 0; i < f->fields.size(); ++i)
        f->fields[i].name = f->names[i].c_str();
    f->fc.nbFields = static_cast<int32_t>(f->fields.size());
    f->fc.fields = f->fields.data();
    return f;
}

// Shapes as "2x17x40;2x17x12" (an empty item is a 0-d tensor)
std::vector<Dims> parseShapes(std::string const& text)
{
    std::vector<Dims> out;
    for (auto const& item : split(text, ';'))
    {
        Dims d{};
        d.nbDims = 0;
        for (auto const& v : split(item, 'x'))
            if (!v.empty())
                d.d[d.nbDims++] = std::stoll(v);
        out.push_back(d);
    }
    return out;
}

std::map<std::string, DataType> const& dtypes()
{
    static std::map<std::string, DataType> const m{{"kFLOAT", DataType::kFLOAT}, {"kHALF", DataType::kHALF},
        {"kINT8", DataType::kINT8}, {"kINT32", DataType::kINT32}, {"kBOOL", DataType::kBOOL},
        {"kUINT8", DataType::kUINT8}, {"kFP8", DataType::kFP8}, {"kBF16", DataType::kBF16},
        {"kINT64", DataType::kINT64}};
    return m;
}

std::map<std::string, TensorFormat> const& formats()
{
    static std::map<std::string, TensorFormat> const m{{"kLINEAR", TensorFormat::kLINEAR},
        {"kCHW2", TensorFormat::kCHW2}, {"kHWC8", TensorFormat::kHWC8}, {"kCHW4", TensorFormat::kCHW4},
        {"kCHW16", TensorFormat::kCHW16}, {"kCHW32", TensorFormat::kCHW32}, {"kDHWC8", TensorFormat::kDHWC8},
        {"kCDHW32", TensorFormat::kCDHW32}, {"kHWC", TensorFormat::kHWC}, {"kDLA_LINEAR", TensorFormat::kDLA_LINEAR},
        {"kDLA_HWC4", TensorFormat::kDLA_HWC4}, {"kHWC16", TensorFormat::kHWC16}, {"kDHWC", TensorFormat::kDHWC}};
    return m;
}

std::vector<DynamicPluginTensorDesc> descs(std::vector<Dims> const& shapes, std::vector<DataType> const& types)
{
    std::vector<DynamicPluginTensorDesc> out(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i)
    {
        out[i].desc.dims = shapes[i];
        out[i].desc.type = i < types.size() ? types[i] : DataType::kFLOAT;
        out[i].desc.format = TensorFormat::kLINEAR;
        out[i].min = out[i].max = out[i].opt = shapes[i];
    }
    return out;
}

struct Made
{
    std::unique_ptr<IPluginV3> plugin;
    IPluginV3OneBuild* build = nullptr;
    IPluginV3OneRuntime* runtime = nullptr;
    IPluginV3OneCore* core = nullptr;
};

Made make(std::string const& name, std::string const& fields, std::string const& node = "node0")
{
    Made m;
    auto c = creator(name);
    if (!c)
        return m;
    auto f = parseFields(fields);
    m.plugin.reset(c->createPlugin(node.c_str(), &f->fc, TensorRTPhase::kBUILD));
    if (m.plugin)
    {
        m.build = static_cast<IPluginV3OneBuild*>(m.plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
        m.runtime = static_cast<IPluginV3OneRuntime*>(m.plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        m.core = static_cast<IPluginV3OneCore*>(m.plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    }
    return m;
}

std::string serialized(IPluginV3OneRuntime* runtime)
{
    PluginFieldCollection const* fc = runtime->getFieldsToSerialize();
    std::string out;
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        char buf[64];
        if (f.type == PluginFieldType::kINT32)
            std::snprintf(buf, sizeof(buf), "i32:%d", *static_cast<int32_t const*>(f.data));
        else if (f.type == PluginFieldType::kFLOAT32)
        {
            uint32_t bits;
            std::memcpy(&bits, f.data, 4);
            std::snprintf(buf, sizeof(buf), "f32:%08x", bits);
        }
        else
            std::snprintf(buf, sizeof(buf), "type%d", static_cast<int>(f.type));
        out += (i ? "," : "") + std::string(f.name) + ":" + buf + (f.length == 1 ? "" : "!length");
    }
    return out;
}

std::vector<std::string> readLines(std::string const& path, bool effectsOnly)
{
    std::vector<std::string> out;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line))
    {
        std::string kind = line.substr(0, line.find(' '));
        if (!effectsOnly || kind == "load" || kind == "function" || kind == "getattr" || kind == "setattr"
            || kind == "launch")
            out.push_back(line);
    }
    return out;
}

// Addresses both launchers are given (the fake driver never dereferences them)
constexpr uintptr_t kInputs = 0x10000000, kOutputs = 0x20000000, kStride = 0x1000000, kWorkspace = 0x40000000,
                    kStream = 0x5000;

struct Driven
{
    int32_t rc;
    std::vector<std::string> log;
    std::vector<std::string> messages;
};

// One enqueue of ``plugin`` with the fake driver set up as the Python side was (env columns of the case)
Driven enqueue(Made& m, std::vector<Dims> const& shapes, int32_t nbOutputs, std::string const& env, std::string const& log)
{
    for (auto const& kv : split(env, ','))
    {
        if (kv.empty())
            continue;
        auto eq = kv.find('=');
        setenv(kv.substr(0, eq).c_str(), kv.substr(eq + 1).c_str(), 1);
    }
    setenv("EDGETOK_FAKE_CUDA_LOG", log.c_str(), 1);
    std::remove(log.c_str());
    std::vector<PluginTensorDesc> in(shapes.size()), out(nbOutputs);
    std::vector<void const*> inputs;
    std::vector<void*> outputs;
    for (size_t i = 0; i < shapes.size(); ++i)
    {
        in[i] = PluginTensorDesc{shapes[i], DataType::kFLOAT, TensorFormat::kLINEAR, 1.F};
        inputs.push_back(reinterpret_cast<void const*>(kInputs + i * kStride));
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
        outputs.push_back(reinterpret_cast<void*>(kOutputs + i * kStride));
    size_t before = recorder().lines.size();
    Driven d;
    d.rc = m.runtime->enqueue(in.data(), out.data(), inputs.data(), outputs.data(), reinterpret_cast<void*>(kWorkspace),
        reinterpret_cast<cudaStream_t>(kStream));
    d.log = readLines(log, true);
    d.messages.assign(recorder().lines.begin() + before, recorder().lines.end());
    for (char const* name : {"EDGETOK_FAKE_CUDA_FAIL", "EDGETOK_FAKE_CUDA_REFUSE"})
        unsetenv(name);
    return d;
}

class Env : public ::testing::Environment
{
public:
    void SetUp() override
    {
        recorder();
        // the library opens the driver named here: the fake one (it must exist before the first enqueue)
        if (!std::getenv("EDGETOK_LIBCUDA"))
            setenv("EDGETOK_LIBCUDA", EDGETOK_TEST_FAKE_CUDA, 1);
        if (!casesDir().empty())
            setenv("EDGETOK_FAKE_CUDA_PARAMS", (casesDir() + "/params.txt").c_str(), 1);
    }
};

::testing::Environment* const gEnv = ::testing::AddGlobalTestEnvironment(new Env);
} // namespace

// ---- the library as TensorRT's loader sees it ------------------------------------------------------------------
TEST(Library, LoadsLikeTensorRTAndOffersFourCreators)
{
    void* lib = dlopen(EDGETOK_TEST_LIBRARY, RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(lib, nullptr) << dlerror();
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto get = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    ASSERT_NE(get, nullptr);
    ASSERT_NE(setFinder, nullptr);
    Recorder local;
    setFinder(&local);
    int32_t n = 0;
    auto creators = get(n);
    std::set<std::string> names;
    for (int32_t i = 0; i < n; ++i)
    {
        InterfaceInfo info = creators[i]->getInterfaceInfo();
        EXPECT_STREQ(info.kind, "PLUGIN CREATOR_V3ONE");
        auto c = static_cast<IPluginCreatorV3One*>(creators[i]);
        EXPECT_STREQ(c->getPluginNamespace(), "edgetok");
        EXPECT_STREQ(c->getPluginVersion(), "1");
        names.insert(c->getPluginName());
    }
    EXPECT_EQ(names, (std::set<std::string>{"BlockSparseAttention", "SizeBiasedAttention", "TokenMerge", "TokenPrune"}));
    setFinder(nullptr);
    dlclose(lib);
}

// ---- the specs: shapes, fields, formats, refusals --------------------------------------------------------------
TEST(Spec, OutputShapesEqualThePythonRule)
{
    REQUIRE_CASES("shape");
    for (auto const& r : rows)
    { // shape, plugin, case, fields, input shapes, expected texts (outputs ';', dims ','), expected values
        SCOPED_TRACE(r[1] + " " + r[2]);
        Made m = make(r[1], r[3]);
        ASSERT_TRUE(m.plugin);
        auto shapes = parseShapes(r[4]);
        FakeBuilder b;
        std::vector<DimsExprs> in(shapes.size());
        for (size_t i = 0; i < shapes.size(); ++i)
        {
            in[i].nbDims = shapes[i].nbDims;
            for (int32_t j = 0; j < shapes[i].nbDims; ++j)
                in[i].d[j] = b.make("in" + std::to_string(i) + "." + std::to_string(j), shapes[i].d[j]);
        }
        int32_t nbOut = m.build->getNbOutputs();
        std::vector<DimsExprs> out(nbOut);
        ASSERT_EQ(m.build->getOutputShapes(in.data(), static_cast<int32_t>(in.size()), nullptr, 0, out.data(), nbOut, b), 0);
        std::string texts, values;
        for (int32_t o = 0; o < nbOut; ++o)
        {
            texts += o ? ";" : "";
            values += o ? ";" : "";
            for (int32_t k = 0; k < out[o].nbDims; ++k)
            {
                auto const* e = static_cast<FakeExpr const*>(out[o].d[k]);
                texts += (k ? "," : "") + e->text;
                values += (k ? "x" : "") + std::to_string(e->value);
            }
        }
        EXPECT_EQ(texts, r[5]);
        EXPECT_EQ(values, r[6]);
        DataType types[8];
        std::vector<DataType> inTypes(shapes.size(), DataType::kFLOAT);
        ASSERT_EQ(m.build->getOutputDataTypes(types, nbOut, inTypes.data(), static_cast<int32_t>(inTypes.size())), 0);
        std::string typeNames;
        for (int32_t o = 0; o < nbOut; ++o)
            for (auto const& kv : dtypes())
                if (kv.second == types[o])
                    typeNames += (o ? "," : "") + kv.first;
        EXPECT_EQ(typeNames, r[7]);
    }
}

TEST(Spec, FieldsRoundTripThroughSerialization)
{
    REQUIRE_CASES("roundtrip");
    for (auto const& r : rows)
    { // roundtrip, plugin, case, given fields, serialized fields as Python's plugin writes them, timing cache id
        SCOPED_TRACE(r[1] + " " + r[2]);
        Made m = make(r[1], r[3]);
        ASSERT_TRUE(m.plugin);
        std::string first = serialized(m.runtime);
        EXPECT_EQ(first, r[4]);
        EXPECT_STREQ(m.build->getTimingCacheID(), r[5].c_str());
        // what TensorRT stores in the engine, given back to createPlugin at deserialization
        PluginFieldCollection const* fc = m.runtime->getFieldsToSerialize();
        auto again = std::unique_ptr<IPluginV3>(creator(r[1])->createPlugin("node1", fc, TensorRTPhase::kRUNTIME));
        ASSERT_TRUE(again);
        auto rt = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        EXPECT_EQ(serialized(rt), first);
        std::unique_ptr<IPluginV3> cloned(again->clone());
        EXPECT_EQ(serialized(static_cast<IPluginV3OneRuntime*>(cloned->getCapabilityInterface(PluginCapabilityType::kRUNTIME))), first);
    }
}

TEST(Spec, SupportedFormatsEqualTheSpec)
{
    REQUIRE_CASES("formats");
    for (auto const& r : rows)
    { // formats, plugin, fields, input shapes, position, accepted "kFLOAT/kLINEAR ..." (sorted)
        SCOPED_TRACE(r[1] + " position " + r[4]);
        Made m = make(r[1], r[2]);
        ASSERT_TRUE(m.plugin);
        auto shapes = parseShapes(r[3]);
        int32_t nbIn = static_cast<int32_t>(shapes.size()), nbOut = m.build->getNbOutputs();
        int32_t pos = std::stoi(r[4]);
        std::vector<DynamicPluginTensorDesc> io(nbIn + nbOut);
        std::set<std::string> accepted;
        for (auto const& t : dtypes())
            for (auto const& f : formats())
            {
                io[pos].desc.type = t.second;
                io[pos].desc.format = f.second;
                if (m.build->supportsFormatCombination(pos, io.data(), nbIn, nbOut))
                    accepted.insert(t.first + "/" + f.first);
            }
        std::string joined;
        for (auto const& a : accepted)
            joined += (joined.empty() ? "" : " ") + a;
        EXPECT_EQ(joined, r[5]);
    }
}

TEST(Spec, BadFieldsAndShapesRefusedWithThePythonReasons)
{
    REQUIRE_CASES("refuse");
    for (auto const& r : rows)
    { // refuse, plugin, fields, input shapes, input dtypes, stage (create|configure|ok), Python's message
        SCOPED_TRACE(r[1] + " " + r[2] + " " + r[3] + " " + r[4]);
        size_t before = recorder().lines.size();
        Made m = make(r[1], r[2], "bad0");
        std::vector<std::string> said(recorder().lines.begin() + before, recorder().lines.end());
        if (r[5] == "create")
        {
            EXPECT_FALSE(m.plugin);
            ASSERT_EQ(said.size(), 1U);
            EXPECT_EQ(said[0], "bad0: " + r[6]);
            continue;
        }
        ASSERT_TRUE(m.plugin) << (said.empty() ? "" : said[0]);
        EXPECT_TRUE(said.empty());
        std::vector<DataType> types;
        for (auto const& t : split(r[4], ','))
            types.push_back(dtypes().at(t));
        auto shapes = parseShapes(r[3]);
        auto in = descs(shapes, types);
        int32_t nbOut = m.build->getNbOutputs();
        auto out = descs(std::vector<Dims>(nbOut), {});
        before = recorder().lines.size();
        int32_t rc = m.build->configurePlugin(in.data(), static_cast<int32_t>(in.size()), out.data(), nbOut);
        said.assign(recorder().lines.begin() + before, recorder().lines.end());
        if (r[5] == "ok")
        {
            EXPECT_EQ(rc, 0);
            EXPECT_TRUE(said.empty()) << said[0];
        }
        else
        {
            EXPECT_NE(rc, 0);
            ASSERT_EQ(said.size(), 1U);
            EXPECT_EQ(said[0], "bad0: " + r[6]);
        }
    }
}

TEST(Text, FloatsReadAsPythonReprs)
{
    REQUIRE_CASES("repr");
    for (auto const& r : rows)
    { // repr, hex bits of a double, Python's repr
        uint64_t bits = std::stoull(r[1], nullptr, 16);
        double v;
        std::memcpy(&v, &bits, 8);
        EXPECT_EQ(edgetok::pyFloat(v), r[2]);
    }
}

// ---- launches: the same driver calls as the Python launcher ----------------------------------------------------
TEST(Launch, SameDriverCallsAsThePythonLauncher)
{
    REQUIRE_CASES("launch");
    int compared = 0;
    for (auto const& r : rows)
    { // launch, plugin, case, fields, input shapes, env, expected log file, workspace bytes
        SCOPED_TRACE(r[1] + " " + r[2] + " " + r[5]);
        Made m = make(r[1], r[3]);
        ASSERT_TRUE(m.plugin);
        auto shapes = parseShapes(r[4]);
        auto in = descs(shapes, {});
        int32_t nbOut = m.build->getNbOutputs();
        auto out = descs(std::vector<Dims>(nbOut), {});
        EXPECT_EQ(std::to_string(m.build->getWorkspaceSize(in.data(), static_cast<int32_t>(in.size()), out.data(), nbOut)), r[7]);
        Driven d = enqueue(m, shapes, nbOut, r[5], casesDir() + "/cpp.log");
        EXPECT_EQ(d.rc, 0) << (d.messages.empty() ? "" : d.messages[0]);
        auto expected = readLines(casesDir() + "/" + r[6], true);
        ASSERT_FALSE(expected.empty());
        EXPECT_EQ(d.log, expected);
        compared += d.log == expected;
    }
    EXPECT_EQ(compared, static_cast<int>(rows.size()));
}

TEST(Launch, DriverErrorsAreOneLineAndANonZeroReturn)
{
    REQUIRE_CASES("fail");
    for (auto const& r : rows)
    { // fail, plugin, case, fields, input shapes, env, Python's message
        SCOPED_TRACE(r[1] + " " + r[5]);
        Made m = make(r[1], r[3], "failing0");
        ASSERT_TRUE(m.plugin);
        auto shapes = parseShapes(r[4]);
        Driven d = enqueue(m, shapes, m.build->getNbOutputs(), r[5], casesDir() + "/fail.log");
        EXPECT_NE(d.rc, 0);
        ASSERT_EQ(d.messages.size(), 1U);
        EXPECT_EQ(d.messages[0], "failing0: " + r[6]);
        EXPECT_EQ(d.messages[0].find('\n'), std::string::npos);
    }
}

TEST(Launch, BuildChosenPerGpuAsThePythonLauncherChoosesIt)
{
    REQUIRE_CASES("select");
    for (auto const& r : rows)
    { // select, compute capability, the build Python's select_arch picks ("-": refused)
        std::string why;
        int32_t arch = edgetok::selectArch(std::stoi(r[1]), &why);
        EXPECT_EQ(arch < 0 ? "-" : edgetok::gen::kArchs[arch].name, r[2]) << "sm" << r[1];
        EXPECT_EQ(arch < 0, !why.empty());
        EXPECT_EQ(why.find('\n'), std::string::npos);
    }
}

TEST(Launch, AGpuWithoutABuildIsRefusedInOneLine)
{
    std::string why;
    EXPECT_EQ(edgetok::selectArch(75, &why), -1);
    EXPECT_NE(why.find("sm75"), std::string::npos) << why;
    EXPECT_EQ(why.find('\n'), std::string::npos);
    EXPECT_NE(why.find("--arch sm75"), std::string::npos) << why;
}

TEST(Launch, EnqueueAllocatesNothing)
{
    REQUIRE_CASES("launch");
    std::set<std::string> seen;
    unsetenv("EDGETOK_FAKE_CUDA_LOG"); // the fake driver records nothing: only the library's own work is counted
    int context = 0x7000000;
    for (auto const& r : rows)
    {
        if (!seen.insert(r[1]).second)
            continue;
        SCOPED_TRACE(r[1] + " " + r[2]);
        Made m = make(r[1], r[3]);
        ASSERT_TRUE(m.plugin);
        auto shapes = parseShapes(r[4]);
        std::vector<PluginTensorDesc> in(shapes.size()), out(m.build->getNbOutputs());
        for (size_t i = 0; i < shapes.size(); ++i)
            in[i] = PluginTensorDesc{shapes[i], DataType::kFLOAT, TensorFormat::kLINEAR, 1.F};
        std::vector<void const*> inputs(shapes.size(), reinterpret_cast<void const*>(kInputs));
        std::vector<void*> outputs(out.size(), reinterpret_cast<void*>(kOutputs));
        char ctx[32];
        std::snprintf(ctx, sizeof(ctx), "%x", context++);
        setenv("EDGETOK_FAKE_CUDA_CONTEXT", ctx, 1); // a new context: the first call loads the modules too
        long before = gAllocations.load();
        for (int k = 0; k < 3; ++k)
            EXPECT_EQ(m.runtime->enqueue(in.data(), out.data(), inputs.data(), outputs.data(),
                          reinterpret_cast<void*>(kWorkspace), reinterpret_cast<cudaStream_t>(kStream)),
                0);
        EXPECT_EQ(gAllocations.load() - before, 0);
    }
    EXPECT_EQ(seen.size(), 4U);
}
