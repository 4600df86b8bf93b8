// The CUDA driver API, opened at run time with dlopen("libcuda.so.1"): the library links no CUDA library, so
// it loads where no driver is (engine builds on a CPU machine) and uses whichever driver the device has.
// $EDGETOK_LIBCUDA names another library (tests point it at a recording stand-in, plugins/tests/fake_libcuda.c).
#pragma once
#include <cstddef>
#include <cstdint>

namespace edgetok
{
using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;

constexpr CUresult kSuccess = 0;
// CUdevice_attribute / CUfunction_attribute values (cuda.h)
constexpr int kAttrCcMajor = 75;
constexpr int kAttrCcMinor = 76;
constexpr int kAttrSharedOptin = 97;
constexpr int kFuncSharedSizeBytes = 1;
constexpr int kFuncMaxDynamicShared = 8;

struct Driver
{
    CUresult (*cuInit)(unsigned int);
    CUresult (*cuDriverGetVersion)(int*);
    CUresult (*cuCtxGetCurrent)(CUcontext*);
    CUresult (*cuCtxGetDevice)(CUdevice*);
    CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
    CUresult (*cuModuleLoadData)(CUmodule*, void const*);
    CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, char const*);
    CUresult (*cuFuncGetAttribute)(int*, int, CUfunction);
    CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
    CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
        CUstream, void**, void**);
    CUresult (*cuGetErrorName)(CUresult, char const**);
};

//! The driver, opened once per process; nullptr with the reason in ``why`` (one line) when it cannot be.
Driver const* driver(char const** why);
//! The error's name ("CUDA_ERROR_INVALID_IMAGE"), or "CUresult <n>" when the driver does not know it.
char const* errorName(Driver const& d, CUresult err, char* buf, size_t size);
} // namespace edgetok
