// Host entry points of mythos_rt._C: argument checking + dtype dispatch (csrc/*.cu),
// bound to Python in csrc/bindings.cpp. Tensors arrive as raw device addresses (Python
// ints), element counts and dtype codes, so the extension never links libtorch and
// works with any torch version. Every function checks its arguments on the host and
// throws std::invalid_argument (Python ValueError) with a message naming the op and
// the argument; a failed launch throws std::runtime_error with CUDA's error string.
#pragma once

#include <cstdint>
#include <tuple>

namespace mythos_rt {
namespace ops {

// Dtype codes (equal to mythos_rt::DType in common.cuh; checked in check.h).
constexpr int kDtypeFloat32 = 0, kDtypeFloat16 = 1, kDtypeBFloat16 = 2;

// Largest expert count / top-k the fused router handles.
int route_max_experts();
int route_max_top_k();

// (rb_max, sb_per, rows, blocks) of moe_align for these sizes.
std::tuple<int, int, int64_t, int> moe_align_sizes(int64_t n_tokens, int64_t n_experts,
                                                   int64_t top_k, int64_t n_shared,
                                                   int64_t block_m);

// Returns (rb_max, n_blocks), the GEMM grid sizes (as moe_align_triton).
std::tuple<int, int> moe_align(uintptr_t ids, int64_t ids_numel, int64_t n_tokens,
                               int64_t top_k, int64_t n_experts, int64_t n_shared,
                               int64_t block_m, uintptr_t counts, int64_t counts_numel,
                               uintptr_t offsets, int64_t offsets_numel, uintptr_t sorted_pairs,
                               int64_t sorted_numel, uintptr_t block_expert,
                               int64_t block_expert_numel, uintptr_t stream);

void moe_route(uintptr_t x, int64_t n_tokens, int64_t dim, int64_t stride_x, uintptr_t w,
               int64_t n_experts, uintptr_t bias, int64_t top_k, int dtype, uintptr_t ids,
               uintptr_t weights, int64_t out_rows, uintptr_t logits, int64_t logits_numel,
               uintptr_t counters, int64_t counters_numel, uintptr_t stream);

void loop_prologue(uintptr_t h, uintptr_t e, uintptr_t norm_w, uintptr_t out, int64_t n_rows,
                   int64_t dim, int64_t stride_h, int64_t stride_e, int64_t stride_out,
                   int64_t t, int64_t loop_dim, double eps, int dtype, uintptr_t stream);

void loop_epilogue(uintptr_t block_out, uintptr_t h, uintptr_t e, uintptr_t h_out,
                   uintptr_t cum_p, uintptr_t halted, uintptr_t n_running, uintptr_t next,
                   uintptr_t norm_w, uintptr_t lora_down, uintptr_t lora_B,
                   uintptr_t lora_scale, uintptr_t A, uintptr_t inj_B, uintptr_t halt_w,
                   uintptr_t halt_b, int64_t n_rows, int64_t n_max, int64_t dim, int64_t rank,
                   int64_t max_loops, int64_t stride_x, int64_t stride_h, int64_t stride_e,
                   int64_t stride_out, int64_t stride_next, int64_t t, int64_t loop_dim,
                   double threshold, double eps, int dtype, uintptr_t stream);

}  // namespace ops
}  // namespace mythos_rt
