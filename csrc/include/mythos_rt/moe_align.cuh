// MoE token alignment: sort (token, slot) pairs by expert into BLOCK_M-padded segments.
//
// Same outputs and contract as the Triton alignment (triton_kernels/moe.py,
// moe_align_triton), so either can feed the Triton grouped GEMMs. With P = N·k routed
// pairs, SLOTS = k + S, pair id = token·SLOTS + slot:
//   RB_MAX = cdiv(P, BM) + min(E, P) routed blocks (upper bound), SB_PER = cdiv(N, BM);
//   counts[e]  pairs routed to e;           counts[E+s]  = N
//   offsets[e] BM-padded segment start;     offsets[E+s] = RB_MAX·BM + s·SB_PER·BM
//   sorted_pairs[offsets[e] + i] = the i-th pair of e in ascending (token, slot) order
//     (stable), -1 in the padding of live segments and in the dead routed rows up to
//     RB_MAX·BM (the Triton kernels leave those unwritten; no kernel reads them);
//   sorted_pairs[RB_MAX·BM + s·SB_PER·BM + t] = t·SLOTS + k + s for t < N, else -1;
//   block_expert[b] = expert of routed block b (-1 past the live blocks),
//   block_expert[RB_MAX + b] = E + b / SB_PER.
// Expert ids outside [0, E) are skipped (not counted, not written).
//
// One launch, sync-free and graph-capturable (grid depends only on N and static sizes):
// block 0 does the routed region (per-warp histograms → scan → stable scatter with
// __match_any_sync ranks); blocks 1.. fill the static shared-slot region.
#pragma once

#include "mythos_rt/common.cuh"

namespace mythos_rt {

struct AlignParams {
  const int* ids;     // (N·k,) int32, row-major (N, k)
  int* counts;        // (E + S,)
  int* offsets;       // (E + S,)
  int* sorted_pairs;  // (RB_MAX·BM + S·SB_PER·BM,)
  int* block_expert;  // (RB_MAX + S·SB_PER,)
  int n_tokens, top_k, n_experts, n_shared, block_m;
  int rb_max, sb_per;
};

struct AlignSizes {
  int rb_max;      // routed blocks (upper bound)
  int sb_per;      // blocks per shared slot
  long long rows;  // sorted_pairs length needed
  int blocks;      // block_expert length needed (= total grid blocks of the GEMMs)
};

__host__ __device__ inline AlignSizes align_sizes(int n_tokens, int n_experts, int top_k,
                                                  int n_shared, int block_m) {
  AlignSizes s;
  const int pairs = n_tokens * top_k;
  s.rb_max = cdiv(pairs, block_m) + (n_experts < pairs ? n_experts : pairs);
  s.sb_per = cdiv(n_tokens, block_m);
  s.rows = (long long)(s.rb_max + n_shared * s.sb_per) * block_m;
  s.blocks = s.rb_max + n_shared * s.sb_per;
  return s;
}

// Shared memory of block 0: wh[warps][E] (per-warp counts, then scatter bases), ends[E],
// tot[E].
__device__ __forceinline__ void align_routed(const AlignParams& p, int* smem) {
  const int E = p.n_experts, BM = p.block_m, k = p.top_k;
  const int slots = p.top_k + p.n_shared;
  const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int* wh = smem;
  int* ends = smem + nw * E;
  int* tot = ends + E;
  const int P = p.n_tokens * k;
  const int chunk = cdiv(cdiv(P, nw), 32) * 32;
  const int q_lo = warp * chunk, q_hi = min(P, q_lo + chunk);

  for (int i = threadIdx.x; i < nw * E; i += blockDim.x) wh[i] = 0;
  __syncthreads();
  for (int q = q_lo + lane; q < q_hi; q += 32) {
    const int ex = p.ids[q];
    if (ex >= 0 && ex < E) atomicAdd(&wh[warp * E + ex], 1);
  }
  __syncthreads();
  // per expert: exclusive prefix over warps (stable order), total, padded size
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int t = 0;
    for (int w = 0; w < nw; ++w) {
      const int c = wh[w * E + e];
      wh[w * E + e] = t;
      t += c;
    }
    tot[e] = t;
    ends[e] = cdiv(t, BM) * BM;
  }
  __syncthreads();
  if (warp == 0) {  // inclusive scan of padded sizes → segment ends
    int carry = 0;
    for (int base = 0; base < E; base += 32) {
      const int e = base + lane;
      int v = e < E ? ends[e] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(kFullMask, v, o);
        if (lane >= o) v += u;
      }
      if (e < E) ends[e] = v + carry;
      carry += __shfl_sync(kFullMask, v, 31);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int t = tot[e];
    const int start = ends[e] - cdiv(t, BM) * BM;
    p.counts[e] = t;
    p.offsets[e] = start;
    for (int w = 0; w < nw; ++w) wh[w * E + e] += start;
    for (int r = start + t; r < ends[e]; ++r) p.sorted_pairs[r] = -1;
  }
  const int live_rows = ends[E - 1];
  for (int r = live_rows + threadIdx.x; r < p.rb_max * BM; r += blockDim.x) p.sorted_pairs[r] = -1;
  for (int b = threadIdx.x; b < p.rb_max; b += blockDim.x) {
    const int row = b * BM;  // expert = number of segments ending at or before row
    int lo = 0, hi = E;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (ends[mid] <= row) lo = mid + 1; else hi = mid;
    }
    p.block_expert[b] = lo < E ? lo : -1;
  }
  __syncthreads();
  // stable scatter: each warp walks its contiguous pair range in order, 32 at a time
  for (int i = 0; i < chunk; i += 32) {
    const int q = q_lo + i + lane;
    int ex = q < q_hi ? p.ids[q] : -1;
    if (ex >= E) ex = -1;
    const unsigned peers = __match_any_sync(kFullMask, ex);
    if (ex >= 0) {
      const int rank = __popc(peers & ((1u << lane) - 1u));
      p.sorted_pairs[wh[warp * E + ex] + rank] = (q / k) * slots + q % k;
    }
    __syncwarp();
    if (ex >= 0 && lane == __ffs(peers) - 1) wh[warp * E + ex] += __popc(peers);
    __syncwarp();
  }
}

__device__ __forceinline__ void align_shared(const AlignParams& p, int cta, int n_ctas) {
  const int E = p.n_experts, BM = p.block_m, S = p.n_shared, N = p.n_tokens;
  const int slots = p.top_k + S;
  const int seg = p.sb_per * BM;
  const long long base = (long long)p.rb_max * BM;
  const int stride = n_ctas * blockDim.x;
  const int first = cta * blockDim.x + threadIdx.x;
  for (int j = first; j < S * seg; j += stride) {
    const int s = j / seg, t = j % seg;
    p.sorted_pairs[base + j] = t < N ? t * slots + p.top_k + s : -1;
  }
  for (int b = first; b < S * p.sb_per; b += stride) p.block_expert[p.rb_max + b] = E + b / p.sb_per;
  for (int s = first; s < S; s += stride) {
    p.counts[E + s] = N;
    p.offsets[E + s] = (int)base + s * seg;
  }
}

__global__ void moe_align_kernel(AlignParams p) {
  extern __shared__ int align_smem[];
  if (blockIdx.x == 0) align_routed(p, align_smem);
  else align_shared(p, blockIdx.x - 1, gridDim.x - 1);
}

#ifndef __CUDACC_RTC__

// Threads of the routed block: the most that keep (warps + 2)·E ints within 48 KiB.
inline int align_threads(int n_experts) {
  for (int t = 1024; t >= 64; t >>= 1)
    if ((t / 32 + 2) * (long long)n_experts * 4 <= 48 * 1024) return t;
  return 0;
}

inline Status launch_moe_align(AlignParams p, cudaStream_t stream) {
  if (p.n_tokens == 0) return kOk;
  if (!p.ids || !p.counts || !p.offsets || !p.sorted_pairs || !p.block_expert ||
      p.n_experts <= 0 || p.top_k <= 0 || p.block_m <= 0 || p.n_shared < 0)
    return kBadArgument;
  const int threads = align_threads(p.n_experts);
  if (!threads) return kUnsupported;
  const AlignSizes s = align_sizes(p.n_tokens, p.n_experts, p.top_k, p.n_shared, p.block_m);
  p.rb_max = s.rb_max;
  p.sb_per = s.sb_per;
  const long long shared_rows = (long long)p.n_shared * s.sb_per * p.block_m;
  const int shared_ctas = (int)((shared_rows + threads - 1) / threads);
  const int grid = 1 + (shared_ctas < 256 ? shared_ctas : 256);
  const size_t smem = sizeof(int) * (threads / 32 + 2) * p.n_experts;
  moe_align_kernel<<<grid, threads, smem, stream>>>(p);
  return cudaPeekAtLastError() == cudaSuccess ? kOk : kCudaError;
}

#endif  // __CUDACC_RTC__

}  // namespace mythos_rt
