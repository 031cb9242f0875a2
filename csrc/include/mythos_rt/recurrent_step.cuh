// Recurrent-step prologue and epilogue: one warp per row (framework-free).
//
// Semantics are those of mythos_rt.ops.recurrent.loop_prologue_torch /
// loop_epilogue_torch (docs/design.md "Reference semantics", loop t):
//
//   prologue:  y = rmsnorm(h + loop_embed(t) + e) * norm_w
//   epilogue:  z     = (x · lora_downᵀ) * lora_scale[tc]           tc = min(t, max_loops-1)
//              h     = A·h + inj_B·e + x + z · lora_B             (stored in T)
//              p     = sigmoid(h·halt_w + halt_b)                  (on the stored h)
//              w     = (cum + p >= thr) ? max(1 - cum, 0) : p;  w *= running
//              h_out += w·h;  cum += p·running;  halted |= cum >= thr
//              n_running -= rows that halted in this step
//              next  = prologue(h, e, t + 1)                       (optional)
//
// A warp owns a row; lane l owns elements {l·VEC + j·32·VEC + i}. The row is visited in
// up to three passes (LoRA down-projection, state update, ACT/next write); the passes
// after the first re-read the row from L1/L2, so HBM sees each row tensor about once.
// Every lane writes only the elements it read itself, which is why `next` may alias `x`
// (the runtime ping-pongs one activation buffer between the block and this kernel).
//
// MYTHOS_RT_DEVICE_ONLY drops the host launchers (the JIT sources define it).
// D_CT / R_CT > 0 make the width / LoRA rank compile-time constants (the JIT path,
// mythos_rt/cuda/codegen.py); 0 reads them from the params (the AOT path).
#pragma once

#include "mythos_rt/common.cuh"

namespace mythos_rt {

template <typename T>
struct PrologueParams {
  const T* h;
  const T* e;
  const T* norm_w;
  T* out;
  long long stride_h, stride_e, stride_out;  // row strides in elements
  int n_rows, dim, t, loop_dim;
  float emb_c;  // -2·ln(theta)/loop_dim: f_j = exp(j·emb_c)
  float eps;
};

template <typename T>
struct EpilogueParams {
  const T* x;       // block_out (N, D); may alias next
  T* h;             // (N, D), updated in place
  const T* e;       // (N, D)
  T* h_out;         // (N_max, D) ACT-weighted sum
  float* cum_p;     // (N_max,)
  unsigned char* halted;  // (N_max,) bool
  int* n_running;   // (1,)
  T* next;          // (N, D) or null; may alias x
  const T* norm_w;      // (D,)
  const T* lora_down;   // (R, D)
  const T* lora_B;      // (R, D)
  const T* lora_scale;  // (max_loops, R)
  const float* A;       // (D,) float32
  const T* inj_B;       // (D,)
  const T* halt_w;      // (D,)
  const T* halt_b;      // (1,)
  long long stride_x, stride_h, stride_e, stride_out, stride_next;
  int n_rows, dim, rank, t, tc, loop_dim;
  float emb_c, eps, threshold;
};

// The loop-index embedding's frequency base: f_j = kLoopTheta^(-2j/loop_dim). The same
// constant as mythos_rt.ops.recurrent.LOOP_THETA (tests/csrc/test_codegen.py checks it).
constexpr double kLoopTheta = 10000.0;

// The step's arguments as the AOT entry points (csrc/recurrent_step.cu) and the JIT
// kernels (mythos_rt/cuda/codegen.py) receive them: device addresses as integers, row
// strides in elements. `prologue_params` / `epilogue_params` are the one packer of both
// into the kernels' typed parameters.
struct PrologueArgs {
  unsigned long long h, e, norm_w, out;
  long long stride_h, stride_e, stride_out;
  int n_rows, dim, t, loop_dim;
  float emb_c, eps;
};

struct EpilogueArgs {
  unsigned long long x, h, e, h_out, cum_p, halted, n_running, next, norm_w, lora_down,
      lora_B, lora_scale, A, inj_B, halt_w, halt_b;
  long long stride_x, stride_h, stride_e, stride_out, stride_next;
  int n_rows, dim, rank, t, tc, loop_dim;  // tc: the clamped LoRA scale row
  float emb_c, eps, threshold;
};

template <typename P>
__host__ __device__ inline P* addr(unsigned long long a) {
  return reinterpret_cast<P*>(a);
}

// Fields in the declaration order of PrologueParams / EpilogueParams.
template <typename T>
__host__ __device__ inline PrologueParams<T> prologue_params(const PrologueArgs& a) {
  return {addr<const T>(a.h), addr<const T>(a.e), addr<const T>(a.norm_w), addr<T>(a.out),
          a.stride_h, a.stride_e, a.stride_out, a.n_rows, a.dim, a.t, a.loop_dim, a.emb_c,
          a.eps};
}

template <typename T>
__host__ __device__ inline EpilogueParams<T> epilogue_params(const EpilogueArgs& a) {
  return {addr<const T>(a.x), addr<T>(a.h), addr<const T>(a.e), addr<T>(a.h_out),
          addr<float>(a.cum_p), addr<unsigned char>(a.halted), addr<int>(a.n_running),
          addr<T>(a.next), addr<const T>(a.norm_w), addr<const T>(a.lora_down),
          addr<const T>(a.lora_B), addr<const T>(a.lora_scale), addr<const float>(a.A),
          addr<const T>(a.inj_B), addr<const T>(a.halt_w), addr<const T>(a.halt_b),
          a.stride_x, a.stride_h, a.stride_e, a.stride_out, a.stride_next, a.n_rows, a.dim,
          a.rank, a.t, a.tc, a.loop_dim, a.emb_c, a.eps, a.threshold};
}

// Channel c of the loop-index embedding: sin(t·f_j) on [0, ld/2), cos on [ld/2, ld), 0 after.
__device__ __forceinline__ float loop_embed(int c, float t, int loop_dim, float emb_c) {
  if (c >= loop_dim) return 0.0f;
  int half = loop_dim >> 1;
  bool is_sin = c < half;
  float ang = t * expf(static_cast<float>(is_sin ? c : c - half) * emb_c);
  return is_sin ? sinf(ang) : cosf(ang);
}

// ---- prologue ---------------------------------------------------------------------

template <typename T, int VEC, int D_CT>
__device__ __forceinline__ void prologue_row(const PrologueParams<T>& p, int row, int lane) {
  const int D = D_CT > 0 ? D_CT : p.dim;
  const T* h = p.h + row * p.stride_h;
  const T* e = p.e + row * p.stride_e;
  T* y = p.out + row * p.stride_out;
  const float tf = static_cast<float>(p.t);
  float ss = 0.0f;
  for (int c = lane * VEC; c < D; c += 32 * VEC) {
    float hv[VEC], ev[VEC];
    load_vec<T, VEC>(h + c, hv);
    load_vec<T, VEC>(e + c, ev);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float s = hv[i] + loop_embed(c + i, tf, p.loop_dim, p.emb_c) + ev[i];
      ss += s * s;
    }
  }
  const float rstd = rsqrtf(warp_sum(ss) / static_cast<float>(D) + p.eps);
  for (int c = lane * VEC; c < D; c += 32 * VEC) {
    float hv[VEC], ev[VEC], wv[VEC], yv[VEC];
    load_vec<T, VEC>(h + c, hv);
    load_vec<T, VEC>(e + c, ev);
    load_vec<T, VEC>(p.norm_w + c, wv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float s = hv[i] + loop_embed(c + i, tf, p.loop_dim, p.emb_c) + ev[i];
      yv[i] = s * rstd * wv[i];
    }
    store_vec<T, VEC>(y + c, yv);
  }
}

// A block of warps, one row each (shared by the AOT kernel below and the JIT kernels).
template <typename T, int VEC, int D_CT>
__device__ __forceinline__ void prologue_block(const PrologueParams<T>& p) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row < p.n_rows) prologue_row<T, VEC, D_CT>(p, row, lane);
}

template <typename T, int VEC, int D_CT>
__global__ void loop_prologue_kernel(PrologueParams<T> p) {
  prologue_block<T, VEC, D_CT>(p);
}

// ---- epilogue ---------------------------------------------------------------------

// Ranks reduced together in the LoRA down-projection (accumulators per lane).
constexpr int kRankChunk = 8;

// z[r] = (x · lora_down[r]) * lora_scale[tc, r] for the warp's row, into smem z (R floats).
template <typename T, int VEC, int D_CT, int R_CT>
__device__ __forceinline__ void lora_down_row(const EpilogueParams<T>& p, const T* x, float* z,
                                              int lane) {
  const int D = D_CT > 0 ? D_CT : p.dim;
  const int R = R_CT > 0 ? R_CT : p.rank;
  for (int r0 = 0; r0 < R; r0 += kRankChunk) {
    float acc[kRankChunk];
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) acc[j] = 0.0f;
    for (int c = lane * VEC; c < D; c += 32 * VEC) {
      float xv[VEC];
      load_vec<T, VEC>(x + c, xv);
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) {
        if (r0 + j < R) {
          float dv[VEC];
          load_vec<T, VEC>(p.lora_down + (long long)(r0 + j) * D + c, dv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[j] += xv[i] * dv[i];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) {
      float s = warp_sum(acc[j]);
      if (lane == 0 && r0 + j < R) z[r0 + j] = s * to_float(p.lora_scale[(long long)p.tc * R + r0 + j]);
    }
  }
  __syncwarp();
}

template <typename T, int VEC, bool HAS_NEXT, int D_CT, int R_CT>
__device__ __forceinline__ bool epilogue_row(const EpilogueParams<T>& p, int row, int lane,
                                             float* z) {
  const int D = D_CT > 0 ? D_CT : p.dim;
  const int R = R_CT > 0 ? R_CT : p.rank;
  const T* x = p.x + row * p.stride_x;
  T* h = p.h + row * p.stride_h;
  const T* e = p.e + row * p.stride_e;
  T* ho = p.h_out + row * p.stride_out;

  lora_down_row<T, VEC, D_CT, R_CT>(p, x, z, lane);

  // pass 2: h = A·h + B·e + x + z·lora_B, stored; halting logit and next-norm statistics
  const float t_next = static_cast<float>(p.t + 1);
  float halt_dot = 0.0f, ss = 0.0f;
  for (int c = lane * VEC; c < D; c += 32 * VEC) {
    float xv[VEC], hv[VEC], ev[VEC], av[VEC], bv[VEC], hw[VEC], dv[VEC];
    load_vec<T, VEC>(x + c, xv);
    load_vec<T, VEC>(h + c, hv);
    load_vec<T, VEC>(e + c, ev);
    load_vec<float, VEC>(p.A + c, av);
    load_vec<T, VEC>(p.inj_B + c, bv);
    load_vec<T, VEC>(p.halt_w + c, hw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) dv[i] = 0.0f;
    for (int r = 0; r < R; ++r) {
      float lb[VEC];
      load_vec<T, VEC>(p.lora_B + (long long)r * D + c, lb);
      const float zr = z[r];
#pragma unroll
      for (int i = 0; i < VEC; ++i) dv[i] += zr * lb[i];
    }
    float hn[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) hn[i] = av[i] * hv[i] + bv[i] * ev[i] + (xv[i] + dv[i]);
    store_vec<T, VEC>(h + c, hn);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float hs = round_to<T>(hn[i]);  // the stored state is what the ACT update sees
      halt_dot += hs * hw[i];
      if (HAS_NEXT) {
        const float s = hs + loop_embed(c + i, t_next, p.loop_dim, p.emb_c) + ev[i];
        ss += s * s;
      }
    }
  }
  halt_dot = warp_sum(halt_dot);
  const float rstd = HAS_NEXT ? rsqrtf(warp_sum(ss) / static_cast<float>(D) + p.eps) : 0.0f;

  // ACT update (warp-uniform scalars)
  const float logit = halt_dot + to_float(p.halt_b[0]);
  const float prob = 1.0f / (1.0f + expf(-logit));
  const float cum = p.cum_p[row];
  const bool was_halted = p.halted[row] != 0;
  const float run = was_halted ? 0.0f : 1.0f;
  const float w = (cum + prob >= p.threshold ? fmaxf(1.0f - cum, 0.0f) : prob) * run;
  const float cum_new = cum + prob * run;
  const bool newly = !was_halted && cum_new >= p.threshold;

  // pass 3: h_out += w·h; next = rmsnorm(h + embed(t+1) + e) * norm_w
  for (int c = lane * VEC; c < D; c += 32 * VEC) {
    float hv[VEC], ov[VEC];
    load_vec<T, VEC>(h + c, hv);  // this lane's own stores from pass 2
    load_vec<T, VEC>(ho + c, ov);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ov[i] += w * hv[i];
    store_vec<T, VEC>(ho + c, ov);
    if (HAS_NEXT) {
      float ev[VEC], nw[VEC], yv[VEC];
      load_vec<T, VEC>(e + c, ev);
      load_vec<T, VEC>(p.norm_w + c, nw);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float s = hv[i] + loop_embed(c + i, t_next, p.loop_dim, p.emb_c) + ev[i];
        yv[i] = s * rstd * nw[i];
      }
      store_vec<T, VEC>(p.next + row * p.stride_next + c, yv);
    }
  }
  if (lane == 0) {
    p.cum_p[row] = cum_new;
    p.halted[row] = (was_halted || newly) ? 1 : 0;
  }
  return newly;
}

// A block of warps, one row each; z_smem holds (blockDim.x / 32) · R floats (each warp's
// z). Every thread must call this (it ends in a block barrier).
template <typename T, int VEC, bool HAS_NEXT, int D_CT, int R_CT>
__device__ __forceinline__ void epilogue_block(const EpilogueParams<T>& p, float* z_smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int R = R_CT > 0 ? R_CT : p.rank;
  const int row = blockIdx.x * (blockDim.x >> 5) + warp;
  bool newly = false;
  if (row < p.n_rows)
    newly = epilogue_row<T, VEC, HAS_NEXT, D_CT, R_CT>(p, row, lane, z_smem + warp * R);
  // one atomic per block: every thread reaches this barrier (no early return above)
  const int n_new = __syncthreads_count(lane == 0 && newly);
  if (threadIdx.x == 0 && n_new > 0) atomicSub(p.n_running, n_new);
}

// Dynamic shared memory: (blockDim.x / 32) · rank floats.
template <typename T, int VEC, bool HAS_NEXT, int D_CT, int R_CT>
__global__ void loop_epilogue_kernel(EpilogueParams<T> p) {
  extern __shared__ float z_smem[];
  epilogue_block<T, VEC, HAS_NEXT, D_CT, R_CT>(p, z_smem);
}

constexpr int kRowWarps = 4;  // rows (warps) per block of both kernels

#if !defined(__CUDACC_RTC__) && !defined(MYTHOS_RT_DEVICE_ONLY)
}  // namespace mythos_rt
#include <initializer_list>
namespace mythos_rt {

// 16-byte vectors when every row pointer/stride and the width allow it, else scalars.
template <typename T>
inline bool vec_ok(int dim, std::initializer_list<const void*> ptrs,
                   std::initializer_list<long long> strides) {
  constexpr int V = 16 / sizeof(T);
  if (dim % V) return false;
  for (const void* q : ptrs)
    if (q && reinterpret_cast<unsigned long long>(q) % 16) return false;
  for (long long s : strides)
    if (s % V) return false;
  return true;
}

template <typename T>
Status launch_loop_prologue(const PrologueParams<T>& p, cudaStream_t stream) {
  if (p.n_rows == 0) return kOk;
  if (!p.h || !p.e || !p.norm_w || !p.out || p.dim <= 0) return kBadArgument;
  dim3 grid(cdiv(p.n_rows, kRowWarps)), block(32 * kRowWarps);
  constexpr int V = 16 / sizeof(T);
  if (vec_ok<T>(p.dim, {p.h, p.e, p.norm_w, p.out}, {p.stride_h, p.stride_e, p.stride_out}))
    loop_prologue_kernel<T, V, 0><<<grid, block, 0, stream>>>(p);
  else
    loop_prologue_kernel<T, 1, 0><<<grid, block, 0, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? kOk : kCudaError;
}

template <typename T>
Status launch_loop_epilogue(const EpilogueParams<T>& p, cudaStream_t stream) {
  if (p.n_rows == 0) return kOk;
  if (!p.x || !p.h || !p.e || !p.h_out || !p.cum_p || !p.halted || !p.n_running ||
      !p.norm_w || !p.lora_down || !p.lora_B || !p.lora_scale || !p.A || !p.inj_B ||
      !p.halt_w || !p.halt_b || p.dim <= 0 || p.rank <= 0)
    return kBadArgument;
  dim3 grid(cdiv(p.n_rows, kRowWarps)), block(32 * kRowWarps);
  const size_t smem = sizeof(float) * kRowWarps * p.rank;
  constexpr int V = 16 / sizeof(T);
  const bool vec = vec_ok<T>(
      p.dim, {p.x, p.h, p.e, p.h_out, p.next, p.norm_w, p.lora_down, p.lora_B, p.A, p.inj_B,
              p.halt_w},
      {p.stride_x, p.stride_h, p.stride_e, p.stride_out, p.next ? p.stride_next : 0});
  if (p.next) {
    if (vec) loop_epilogue_kernel<T, V, true, 0, 0><<<grid, block, smem, stream>>>(p);
    else loop_epilogue_kernel<T, 1, true, 0, 0><<<grid, block, smem, stream>>>(p);
  } else {
    if (vec) loop_epilogue_kernel<T, V, false, 0, 0><<<grid, block, smem, stream>>>(p);
    else loop_epilogue_kernel<T, 1, false, 0, 0><<<grid, block, smem, stream>>>(p);
  }
  return cudaPeekAtLastError() == cudaSuccess ? kOk : kCudaError;
}

#endif  // host launchers

}  // namespace mythos_rt
