// Shared definitions of the mythos-rt CUDA kernels: status codes, dtype codes, element
// conversion, vector loads and warp/block reductions.
//
// Framework-free (no torch, no pybind11) and NVRTC-safe: nothing here includes a host
// standard header when compiled by NVRTC (__CUDACC_RTC__), so the JIT path
// (mythos_rt/cuda/codegen.py) can inline these headers verbatim.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#if !defined(__CUDACC_RTC__)
#include <cuda_runtime.h>
#endif

namespace mythos_rt {

// Launcher results: a launcher never throws; the checking layer (csrc/*.cu) turns a
// status into an exception with a message.
enum Status : int {
  kOk = 0,
  kBadArgument = 1,   // a size/pointer the launcher itself cannot handle
  kUnsupported = 2,   // a size or dtype outside what the compiled kernels cover
  kCudaError = 3,     // the launch failed: see cudaGetLastError()
};

// Storage dtype codes shared with Python (mythos_rt/cuda/_ext.py).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- element conversion (fp32 compute whatever the storage dtype) ------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
// round-to-nearest-even, as torch's .to(dtype)
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The value a float takes once stored in T and read back (what the next reader sees).
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// ---- vectors of N elements loaded/stored as one access -----------------------------

// Aligned to min(16, sizeof(T)·N): a 32-byte vector of 8 floats is two 16-byte accesses,
// so launchers only ever need 16-byte aligned pointers for the vectorized path.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[N]) {
  Vec<T, N> r = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(r.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[N]) {
  Vec<T, N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(p) = r;
}

// ---- reductions ---------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Warp-wide argmax of (value, index): the largest value, ties to the lowest index.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(kFullMask, v, o);
    int oi = __shfl_xor_sync(kFullMask, i, o);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

__host__ __device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

}  // namespace mythos_rt
