// The two CUDA runtime types TensorRT's plugin headers name, so that the library compiles without a CUDA
// toolkit: it never calls the runtime (kernels go through the driver API, opened with dlopen). The types are
// the runtime's own (pointers to the same opaque structs), so the ABI is the same as with the real header.
#pragma once
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
