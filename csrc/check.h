// Host-side argument checks shared by the csrc/*.cu checking layers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mythos_rt/common.cuh"
#include "ops.h"

namespace mythos_rt {
namespace ops {

static_assert(kDtypeFloat32 == kFloat32 && kDtypeFloat16 == kFloat16 &&
              kDtypeBFloat16 == kBFloat16, "dtype codes of ops.h and common.cuh differ");

template <typename... Args>
[[noreturn]] inline void fail(const char* op, const Args&... parts) {
  std::ostringstream s;
  s << "mythos_rt._C." << op << ": ";
  (s << ... << parts);
  throw std::invalid_argument(s.str());
}

#define MRT_CHECK(cond, op, ...) \
  do {                            \
    if (!(cond)) ::mythos_rt::ops::fail(op, __VA_ARGS__); \
  } while (0)

inline int elt_size(int dtype) {
  return dtype == kFloat32 ? 4 : (dtype == kFloat16 || dtype == kBFloat16) ? 2 : 0;
}

inline const char* dtype_name(int dtype) {
  return dtype == kFloat32 ? "float32" : dtype == kFloat16 ? "float16"
         : dtype == kBFloat16 ? "bfloat16" : "unknown";
}

inline void check_dtype(const char* op, int dtype) {
  MRT_CHECK(elt_size(dtype) != 0, op, "unsupported dtype code ", dtype,
            " (expected 0=float32, 1=float16, 2=bfloat16)");
}

// A device pointer that must be set and aligned to its element size.
inline void check_ptr(const char* op, const char* name, uintptr_t p, int align) {
  MRT_CHECK(p != 0, op, name, " is a null pointer");
  MRT_CHECK(p % align == 0, op, name, " (0x", std::hex, p, std::dec,
            ") is not aligned to its element size ", align);
}

inline void check_range(const char* op, const char* name, int64_t v, int64_t lo, int64_t hi) {
  MRT_CHECK(v >= lo && v <= hi, op, name, "=", v, " outside [", lo, ", ", hi, "]");
}

inline void check_launch(const char* op, Status st) {
  if (st == kOk) return;
  if (st == kCudaError) {
    cudaError_t err = cudaGetLastError();
    throw std::runtime_error(std::string("mythos_rt._C.") + op + ": launch failed: " +
                             cudaGetErrorString(err));
  }
  fail(op, st == kUnsupported ? "sizes not supported by the compiled kernels"
                              : "bad argument rejected by the launcher");
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace ops
}  // namespace mythos_rt
