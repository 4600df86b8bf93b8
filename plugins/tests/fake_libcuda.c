/* A stand-in for libcuda.so.1 that records what a launcher asks of the driver, for tests without a GPU.
 *
 * Behaviour, read from the environment at every call (so one process can run several cases):
 *   EDGETOK_FAKE_CUDA_LOG      file each effect is appended to as one line (none: nothing is written)
 *   EDGETOK_FAKE_CUDA_CC       compute capability of the one GPU (default 86)
 *   EDGETOK_FAKE_CUDA_VERSION  cuDriverGetVersion's answer (default 13000)
 *   EDGETOK_FAKE_CUDA_CONTEXT  the current context, hex (default c0; 0: none)
 *   EDGETOK_FAKE_CUDA_FAIL     "cuLaunchKernel=700": that function answers that CUresult
 *   EDGETOK_FAKE_CUDA_REFUSE   CUresult for ELF images (a driver refusing a cubin it cannot use)
 *   EDGETOK_FAKE_CUDA_PARAMS   file of "<entry> <type>..." lines (p, i32, f32, i64): how to read each kernel's
 *                              parameters; a launch of a kernel not listed there is an error (when logging)
 * Log lines: "load cubin|ptx <bytes> <fnv1a64>", "function <entry>", "getattr <attr> <entry>",
 * "setattr <entry> <attr> <value>", "launch <entry> grid X Y Z block X Y Z shared S stream 0x.. params v...",
 * pointers in hex, i32/i64 in decimal, f32 as its bit pattern (0x3f800000): exact. */
#include <elf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;

static const struct
{
    int code;
    const char* name;
} kErrors[] = {{0, "CUDA_SUCCESS"}, {1, "CUDA_ERROR_INVALID_VALUE"}, {2, "CUDA_ERROR_OUT_OF_MEMORY"},
    {3, "CUDA_ERROR_NOT_INITIALIZED"}, {100, "CUDA_ERROR_NO_DEVICE"}, {200, "CUDA_ERROR_INVALID_IMAGE"},
    {201, "CUDA_ERROR_INVALID_CONTEXT"}, {209, "CUDA_ERROR_NO_BINARY_FOR_GPU"}, {218, "CUDA_ERROR_INVALID_PTX"},
    {222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"}, {300, "CUDA_ERROR_INVALID_SOURCE"}, {500, "CUDA_ERROR_NOT_FOUND"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS"}, {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"}, {999, "CUDA_ERROR_UNKNOWN"}};

/* Functions handed out: one per cuModuleGetFunction call, kept for the process (a test's few hundred). */
typedef struct
{
    char entry[128];
} Function;

#define MAX_FUNCTIONS 4096
static Function gFunctions[MAX_FUNCTIONS];
static int gNbFunctions = 0;
static uintptr_t gNbModules = 0;

static int env_int(const char* name, int fallback, int base)
{
    const char* v = getenv(name);
    return v && *v ? (int) strtol(v, NULL, base) : fallback;
}

static void note(const char* format, ...) __attribute__((format(printf, 1, 2)));

#include <stdarg.h>
static void note(const char* format, ...)
{
    const char* path = getenv("EDGETOK_FAKE_CUDA_LOG");
    if (!path || !*path)
        return;
    FILE* f = fopen(path, "a");
    if (!f)
        return;
    va_list args;
    va_start(args, format);
    vfprintf(f, format, args);
    va_end(args);
    fputc('\n', f);
    fclose(f);
}

static CUresult failing(const char* fn)
{
    const char* v = getenv("EDGETOK_FAKE_CUDA_FAIL");
    size_t n = strlen(fn);
    if (v && !strncmp(v, fn, n) && v[n] == '=')
        return (CUresult) atoi(v + n + 1);
    return 0;
}

#define FAILING(fn)                                                                                                    \
    do                                                                                                                 \
    {                                                                                                                  \
        CUresult err_ = failing(fn);                                                                                   \
        if (err_)                                                                                                      \
            return err_;                                                                                               \
    } while (0)

CUresult cuInit(unsigned int flags)
{
    (void) flags;
    FAILING("cuInit");
    return 0;
}

CUresult cuDriverGetVersion(int* version)
{
    FAILING("cuDriverGetVersion");
    *version = env_int("EDGETOK_FAKE_CUDA_VERSION", 13000, 10);
    return 0;
}

CUresult cuCtxGetCurrent(void** ctx)
{
    FAILING("cuCtxGetCurrent");
    const char* v = getenv("EDGETOK_FAKE_CUDA_CONTEXT");
    *ctx = (void*) (uintptr_t) (v && *v ? strtoull(v, NULL, 16) : 0xc0);
    return 0;
}

CUresult cuCtxGetDevice(int* device)
{
    FAILING("cuCtxGetDevice");
    *device = 0;
    return 0;
}

CUresult cuDeviceGetAttribute(int* value, int attribute, int device)
{
    (void) device;
    FAILING("cuDeviceGetAttribute");
    int cc = env_int("EDGETOK_FAKE_CUDA_CC", 86, 10);
    switch (attribute)
    {
    case 75: *value = cc / 10; return 0;
    case 76: *value = cc % 10; return 0;
    case 97: *value = 99 * 1024; return 0;
    default: return 1;
    }
}

static uint64_t fnv1a(const unsigned char* data, size_t size)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < size; ++i)
        h = (h ^ data[i]) * 1099511628211ull;
    return h;
}

CUresult cuModuleLoadData(void** module, const void* image)
{
    FAILING("cuModuleLoadData");
    const unsigned char* bytes = (const unsigned char*) image;
    int elf = !memcmp(bytes, ELFMAG, SELFMAG);
    size_t size;
    if (elf)
    { /* a cubin: 64-bit ELF whose section headers end it */
        const Elf64_Ehdr* h = (const Elf64_Ehdr*) image;
        size = h->e_shoff + (size_t) h->e_shnum * h->e_shentsize;
    }
    else
        size = strlen((const char*) image) + 1;
    note("load %s %zu %016llx", elf ? "cubin" : "ptx", size, (unsigned long long) fnv1a(bytes, size));
    int refuse = env_int("EDGETOK_FAKE_CUDA_REFUSE", 0, 10);
    if (elf && refuse)
        return refuse;
    *module = (void*) ++gNbModules;
    return 0;
}

CUresult cuModuleGetFunction(void** fn, void* module, const char* name)
{
    (void) module;
    FAILING("cuModuleGetFunction");
    if (gNbFunctions == MAX_FUNCTIONS)
        return 2;
    Function* f = &gFunctions[gNbFunctions++];
    snprintf(f->entry, sizeof(f->entry), "%s", name);
    note("function %s", name);
    *fn = f;
    return 0;
}

CUresult cuFuncGetAttribute(int* value, int attribute, void* fn)
{
    FAILING("cuFuncGetAttribute");
    note("getattr %d %s", attribute, ((Function*) fn)->entry);
    *value = attribute == 1 ? 1024 : 0; /* some static shared memory */
    return 0;
}

CUresult cuFuncSetAttribute(void* fn, int attribute, int value)
{
    FAILING("cuFuncSetAttribute");
    note("setattr %s %d %d", ((Function*) fn)->entry, attribute, value);
    return 0;
}

/* the parameter types of ``entry`` from EDGETOK_FAKE_CUDA_PARAMS: count, or -1 */
static int param_types(const char* entry, char types[][8], int most)
{
    const char* path = getenv("EDGETOK_FAKE_CUDA_PARAMS");
    FILE* f = path ? fopen(path, "r") : NULL;
    if (!f)
        return -1;
    char line[1024];
    int found = -1;
    while (found < 0 && fgets(line, sizeof(line), f))
    {
        char* save = NULL;
        char* tok = strtok_r(line, " \n", &save);
        if (!tok || strcmp(tok, entry))
            continue;
        found = 0;
        while ((tok = strtok_r(NULL, " \n", &save)) && found < most)
            snprintf(types[found++], 8, "%s", tok);
    }
    fclose(f);
    return found;
}

CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
    unsigned shared, void* stream, void** params, void** extra)
{
    FAILING("cuLaunchKernel");
    const char* path = getenv("EDGETOK_FAKE_CUDA_LOG");
    if (!path || !*path)
        return extra ? 1 : 0; /* nothing to record: a launch costs the caller only the call (host-cost benches) */
    const char* entry = ((Function*) fn)->entry;
    char types[64][8];
    int n = param_types(entry, types, 64);
    if (n < 0 || extra)
        return 1;
    char text[8192];
    int at = snprintf(text, sizeof(text), "launch %s grid %u %u %u block %u %u %u shared %u stream %p params", entry,
        gx, gy, gz, bx, by, bz, shared, stream);
    for (int i = 0; i < n && at < (int) sizeof(text) - 64; ++i)
    {
        if (!strcmp(types[i], "p"))
            at += snprintf(text + at, sizeof(text) - at, " %p", *(void**) params[i]);
        else if (!strcmp(types[i], "i32"))
            at += snprintf(text + at, sizeof(text) - at, " %d", *(int32_t*) params[i]);
        else if (!strcmp(types[i], "i64"))
            at += snprintf(text + at, sizeof(text) - at, " %lld", (long long) *(int64_t*) params[i]);
        else if (!strcmp(types[i], "f32"))
            at += snprintf(text + at, sizeof(text) - at, " 0x%08x", *(uint32_t*) params[i]);
        else
            return 1;
    }
    note("%s", text);
    return 0;
}

CUresult cuGetErrorName(CUresult err, const char** name)
{
    for (size_t i = 0; i < sizeof(kErrors) / sizeof(kErrors[0]); ++i)
        if (kErrors[i].code == err)
        {
            *name = kErrors[i].name;
            return 0;
        }
    return 1;
}
