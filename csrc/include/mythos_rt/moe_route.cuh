// Fused MoE router for large expert counts (E up to 1024): logits → softmax → top-k on
// (logits + bias) → renormalize, in one launch (framework-free).
//
// Semantics of mythos_rt.ops.moe.moe_route_torch: logits = x·Wᵀ in fp32,
// p = softmax(logits), ids = top-k of logits + bias (descending; ties → lowest id, as the
// Triton router), weights = p[ids] / Σ p[ids].
//
// Grid (cdiv(E, warps), cdiv(N, TM)): every warp computes one expert's logit for TM
// tokens (a GEMV sweep over W with 16-byte loads, fp32 accumulation), so W is streamed
// by many blocks at decode. The blocks of a token tile publish their logits to an fp32
// scratch (N, E); the last block to finish the tile (a per-tile arrival counter, reset
// by that block, so the launch is graph-replayable) does the softmax/top-k, one warp per
// token, with the biased logits in shared memory.
#pragma once

#include "mythos_rt/common.cuh"

namespace mythos_rt {

template <typename T>
struct RouteParams {
  const T* x;           // (N, D), row stride stride_x
  const T* w;           // (E, D) contiguous
  const float* bias;    // (E,)
  int* ids;             // (N, k) contiguous
  float* weights;       // (N, k) contiguous
  float* logits;        // (N, E) fp32 scratch
  int* counters;        // (cdiv(N, TM),) zero on entry, left zero
  long long stride_x;
  int n_tokens, dim, n_experts, top_k;
};

constexpr int kRouteWarps = 4;
constexpr int kRouteMaxExperts = 1024;
constexpr int kRouteMaxTopK = 32;

template <typename T, int VEC, int TM>
__device__ __forceinline__ void route_logits(const RouteParams<T>& p, int m0, int e) {
  const int lane = threadIdx.x & 31;
  const int D = p.dim;
  float acc[TM];
#pragma unroll
  for (int m = 0; m < TM; ++m) acc[m] = 0.0f;
  const T* wr = p.w + (long long)e * D;
  for (int c = lane * VEC; c < D; c += 32 * VEC) {
    float wv[VEC];
    load_vec<T, VEC>(wr + c, wv);
#pragma unroll
    for (int m = 0; m < TM; ++m) {
      if (m0 + m < p.n_tokens) {
        float xv[VEC];
        load_vec<T, VEC>(p.x + (long long)(m0 + m) * p.stride_x + c, xv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[m] += xv[i] * wv[i];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == 0 && m0 + m < p.n_tokens) p.logits[(long long)(m0 + m) * p.n_experts + e] = s;
  }
}

// One warp: softmax + top-k + renormalize of token n from the published logits.
// sb: this warp's E floats of shared memory.
template <typename T>
__device__ __forceinline__ void route_topk(const RouteParams<T>& p, int n, float* sb) {
  const int lane = threadIdx.x & 31;
  const int E = p.n_experts;
  const float* lr = p.logits + (long long)n * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const float l = __ldcg(lr + e);  // written by other blocks: read from L2, not L1
    sb[e] = l + p.bias[e];
    mx = fmaxf(mx, l);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int e = lane; e < E; e += 32) sum += expf(__ldcg(lr + e) - mx);
  sum = warp_sum(sum);
  __syncwarp();
  int my_id = 0;
  float my_p = 0.0f;
  for (int j = 0; j < p.top_k; ++j) {
    float bv = -INFINITY;
    int bi = E;
    for (int e = lane; e < E; e += 32) {
      const float v = sb[e];
      if (v > bv) { bv = v; bi = e; }  // ascending e per lane: ties keep the lowest
    }
    warp_argmax(bv, bi);
    if (bi >= E) bi = 0;  // all -inf/NaN: degenerate row, keep ids in range
    if (lane == j) {
      my_id = bi;
      my_p = expf(__ldcg(lr + bi) - mx) / sum;
    }
    __syncwarp();
    if (lane == 0) sb[bi] = -INFINITY;
    __syncwarp();
  }
  const float tot = warp_sum(lane < p.top_k ? my_p : 0.0f);
  if (lane < p.top_k) {
    p.ids[(long long)n * p.top_k + lane] = my_id;
    p.weights[(long long)n * p.top_k + lane] = my_p / tot;
  }
}

// Dynamic shared memory: kRouteWarps · E floats.
template <typename T, int VEC, int TM>
__global__ void moe_route_kernel(RouteParams<T> p) {
  extern __shared__ float route_smem[];
  __shared__ bool is_last;
  const int warp = threadIdx.x >> 5;
  const int m0 = blockIdx.y * TM;
  const int e = blockIdx.x * kRouteWarps + warp;
  if (e < p.n_experts) route_logits<T, VEC, TM>(p, m0, e);
  __threadfence();  // publish this block's logits before arriving
  __syncthreads();
  if (threadIdx.x == 0) {
    const int prev = atomicAdd(&p.counters[blockIdx.y], 1);
    is_last = prev == (int)gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (threadIdx.x == 0) p.counters[blockIdx.y] = 0;  // ready for the next launch/replay
  for (int m = warp; m < TM; m += kRouteWarps)
    if (m0 + m < p.n_tokens) route_topk(p, m0 + m, route_smem + warp * p.n_experts);
}

// Tokens per tile: more tokens share each W sweep; small N keeps all warps busy on W.
inline int route_tile_tokens(int n_tokens) {
  return n_tokens >= 8 ? 8 : (n_tokens >= 2 ? 4 : 1);
}

#ifndef __CUDACC_RTC__

template <typename T, int VEC>
Status launch_moe_route_vec(const RouteParams<T>& p, cudaStream_t stream) {
  const int tm = route_tile_tokens(p.n_tokens);
  dim3 grid(cdiv(p.n_experts, kRouteWarps), cdiv(p.n_tokens, tm)), block(32 * kRouteWarps);
  const size_t smem = sizeof(float) * kRouteWarps * p.n_experts;
  if (tm == 8) moe_route_kernel<T, VEC, 8><<<grid, block, smem, stream>>>(p);
  else if (tm == 4) moe_route_kernel<T, VEC, 4><<<grid, block, smem, stream>>>(p);
  else moe_route_kernel<T, VEC, 1><<<grid, block, smem, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? kOk : kCudaError;
}

template <typename T>
Status launch_moe_route(const RouteParams<T>& p, cudaStream_t stream) {
  if (p.n_tokens == 0) return kOk;
  if (!p.x || !p.w || !p.bias || !p.ids || !p.weights || !p.logits || !p.counters ||
      p.dim <= 0)
    return kBadArgument;
  if (p.n_experts < 1 || p.n_experts > kRouteMaxExperts || p.top_k < 1 ||
      p.top_k > p.n_experts || p.top_k > kRouteMaxTopK)
    return kUnsupported;
  constexpr int V = 16 / sizeof(T);
  const bool vec = p.dim % V == 0 && p.stride_x % V == 0 &&
                   reinterpret_cast<unsigned long long>(p.x) % 16 == 0 &&
                   reinterpret_cast<unsigned long long>(p.w) % 16 == 0;
  return vec ? launch_moe_route_vec<T, V>(p, stream) : launch_moe_route_vec<T, 1>(p, stream);
}

#endif  // __CUDACC_RTC__

}  // namespace mythos_rt
