// moe_align: host checks and launch (kernel: include/mythos_rt/moe_align.cuh).
#include "check.h"
#include "mythos_rt/moe_align.cuh"
#include "ops.h"

namespace mythos_rt {
namespace ops {

static void check_sizes(const char* op, int64_t n_tokens, int64_t n_experts, int64_t top_k,
                        int64_t n_shared, int64_t block_m) {
  check_range(op, "n_tokens", n_tokens, 0, 1 << 24);
  check_range(op, "n_experts", n_experts, 1, 1 << 16);
  check_range(op, "top_k", top_k, 1, n_experts);
  check_range(op, "n_shared", n_shared, 0, 1 << 10);
  MRT_CHECK(block_m > 0 && (block_m & (block_m - 1)) == 0 && block_m <= 1024, op,
            "block_m=", block_m, " must be a power of two in [1, 1024]");
  MRT_CHECK(n_tokens * (top_k + n_shared) < (int64_t(1) << 31), op,
            "n_tokens·(top_k + n_shared) overflows int32 pair ids");
}

std::tuple<int, int, int64_t, int> moe_align_sizes(int64_t n_tokens, int64_t n_experts,
                                                   int64_t top_k, int64_t n_shared,
                                                   int64_t block_m) {
  check_sizes("moe_align_sizes", n_tokens, n_experts, top_k, n_shared, block_m);
  AlignSizes s = align_sizes(int(n_tokens), int(n_experts), int(top_k), int(n_shared),
                             int(block_m));
  return {s.rb_max, s.sb_per, s.rows, s.blocks};
}

std::tuple<int, int> moe_align(uintptr_t ids, int64_t ids_numel, int64_t n_tokens,
                               int64_t top_k, int64_t n_experts, int64_t n_shared,
                               int64_t block_m, uintptr_t counts, int64_t counts_numel,
                               uintptr_t offsets, int64_t offsets_numel, uintptr_t sorted_pairs,
                               int64_t sorted_numel, uintptr_t block_expert,
                               int64_t block_expert_numel, uintptr_t stream) {
  const char* op = "moe_align";
  check_sizes(op, n_tokens, n_experts, top_k, n_shared, block_m);
  MRT_CHECK(align_threads(int(n_experts)) > 0, op, "n_experts=", n_experts,
            " needs more shared memory than one block has");
  AlignSizes s = align_sizes(int(n_tokens), int(n_experts), int(top_k), int(n_shared),
                             int(block_m));
  MRT_CHECK(ids_numel >= n_tokens * top_k, op, "ids holds ", ids_numel,
            " elements, needs n_tokens·top_k = ", n_tokens * top_k);
  MRT_CHECK(counts_numel >= n_experts + n_shared, op, "counts holds ", counts_numel,
            " elements, needs E + S = ", n_experts + n_shared);
  MRT_CHECK(offsets_numel >= n_experts + n_shared, op, "offsets holds ", offsets_numel,
            " elements, needs E + S = ", n_experts + n_shared);
  MRT_CHECK(sorted_numel >= s.rows, op, "sorted_pairs holds ", sorted_numel,
            " elements, needs ", s.rows);
  MRT_CHECK(block_expert_numel >= s.blocks, op, "block_expert holds ", block_expert_numel,
            " elements, needs ", s.blocks);
  if (n_tokens == 0) return {s.rb_max, s.blocks};
  check_ptr(op, "ids", ids, 4);
  check_ptr(op, "counts", counts, 4);
  check_ptr(op, "offsets", offsets, 4);
  check_ptr(op, "sorted_pairs", sorted_pairs, 4);
  check_ptr(op, "block_expert", block_expert, 4);
  AlignParams p{};
  p.ids = reinterpret_cast<const int*>(ids);
  p.counts = reinterpret_cast<int*>(counts);
  p.offsets = reinterpret_cast<int*>(offsets);
  p.sorted_pairs = reinterpret_cast<int*>(sorted_pairs);
  p.block_expert = reinterpret_cast<int*>(block_expert);
  p.n_tokens = int(n_tokens);
  p.top_k = int(top_k);
  p.n_experts = int(n_experts);
  p.n_shared = int(n_shared);
  p.block_m = int(block_m);
  check_launch(op, launch_moe_align(p, as_stream(stream)));
  return {s.rb_max, s.blocks};
}

}  // namespace ops
}  // namespace mythos_rt
