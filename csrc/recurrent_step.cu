// loop_prologue / loop_epilogue: host checks and dtype dispatch
// (kernels: include/mythos_rt/recurrent_step.cuh).
#include <cmath>

#include "check.h"
#include "mythos_rt/recurrent_step.cuh"
#include "ops.h"

namespace mythos_rt {
namespace ops {

// emb_c of a loop_dim: f_j = exp(j·emb_c) = kLoopTheta^(-2j/loop_dim).
static float emb_coef(int64_t loop_dim) {
  return float(-2.0 * std::log(kLoopTheta) / double(loop_dim));
}

static void check_rows(const char* op, int64_t n_rows, int64_t dim, int64_t loop_dim) {
  check_range(op, "n_rows", n_rows, 0, int64_t(1) << 30);
  check_range(op, "dim", dim, 1, 1 << 20);
  MRT_CHECK(loop_dim >= 2 && loop_dim % 2 == 0 && loop_dim <= dim, op, "loop_dim=", loop_dim,
            " must be even, >= 2 and <= dim=", dim);
}

static void check_stride(const char* op, const char* name, int64_t stride, int64_t dim) {
  MRT_CHECK(stride >= dim, op, name, " row stride ", stride, " < dim ", dim);
}

template <typename T>
static Status prologue(const PrologueArgs& a, uintptr_t stream) {
  return launch_loop_prologue<T>(prologue_params<T>(a), as_stream(stream));
}

void loop_prologue(uintptr_t h, uintptr_t e, uintptr_t norm_w, uintptr_t out, int64_t n_rows,
                   int64_t dim, int64_t stride_h, int64_t stride_e, int64_t stride_out,
                   int64_t t, int64_t loop_dim, double eps, int dtype, uintptr_t stream) {
  const char* op = "loop_prologue";
  check_dtype(op, dtype);
  check_rows(op, n_rows, dim, loop_dim);
  check_range(op, "t", t, 0, 1 << 24);
  check_stride(op, "h", stride_h, dim);
  check_stride(op, "e", stride_e, dim);
  check_stride(op, "out", stride_out, dim);
  if (n_rows == 0) return;
  const int es = elt_size(dtype);
  check_ptr(op, "h", h, es);
  check_ptr(op, "e", e, es);
  check_ptr(op, "norm_w", norm_w, es);
  check_ptr(op, "out", out, es);
  const PrologueArgs a{h, e, norm_w, out, stride_h, stride_e, stride_out, int(n_rows),
                       int(dim), int(t), int(loop_dim), emb_coef(loop_dim), float(eps)};
  Status st;
  if (dtype == kFloat32) st = prologue<float>(a, stream);
  else if (dtype == kFloat16) st = prologue<__half>(a, stream);
  else st = prologue<__nv_bfloat16>(a, stream);
  check_launch(op, st);
}

template <typename T>
static Status epilogue(const EpilogueArgs& a, uintptr_t stream) {
  return launch_loop_epilogue<T>(epilogue_params<T>(a), as_stream(stream));
}

void loop_epilogue(uintptr_t block_out, uintptr_t h, uintptr_t e, uintptr_t h_out,
                   uintptr_t cum_p, uintptr_t halted, uintptr_t n_running, uintptr_t next,
                   uintptr_t norm_w, uintptr_t lora_down, uintptr_t lora_B,
                   uintptr_t lora_scale, uintptr_t A, uintptr_t inj_B, uintptr_t halt_w,
                   uintptr_t halt_b, int64_t n_rows, int64_t n_max, int64_t dim, int64_t rank,
                   int64_t max_loops, int64_t stride_x, int64_t stride_h, int64_t stride_e,
                   int64_t stride_out, int64_t stride_next, int64_t t, int64_t loop_dim,
                   double threshold, double eps, int dtype, uintptr_t stream) {
  const char* op = "loop_epilogue";
  check_dtype(op, dtype);
  check_rows(op, n_rows, dim, loop_dim);
  check_range(op, "rank", rank, 1, 4096);
  check_range(op, "max_loops", max_loops, 1, 1 << 20);
  check_range(op, "t", t, 0, 1 << 24);
  MRT_CHECK(n_max >= n_rows, op, "ACT state holds ", n_max, " rows, the step needs ", n_rows);
  check_stride(op, "block_out", stride_x, dim);
  check_stride(op, "h", stride_h, dim);
  check_stride(op, "e", stride_e, dim);
  check_stride(op, "h_out", stride_out, dim);
  if (next) check_stride(op, "next_combined", stride_next, dim);
  if (n_rows == 0) return;
  const int es = elt_size(dtype);
  const struct { const char* name; uintptr_t p; int align; } ptrs[] = {
      {"block_out", block_out, es}, {"h", h, es}, {"e", e, es}, {"h_out", h_out, es},
      {"cum_p", cum_p, 4}, {"halted", halted, 1}, {"n_running", n_running, 4},
      {"norm_w", norm_w, es}, {"lora_down", lora_down, es}, {"lora_B", lora_B, es},
      {"lora_scale", lora_scale, es}, {"A", A, 4}, {"inj_B", inj_B, es},
      {"halt_w", halt_w, es}, {"halt_b", halt_b, es}};
  for (const auto& q : ptrs) check_ptr(op, q.name, q.p, q.align);
  if (next) check_ptr(op, "next_combined", next, es);
  const int tc = int(t < max_loops - 1 ? t : max_loops - 1);  // clamped LoRA scale row
  const EpilogueArgs a{block_out, h, e, h_out, cum_p, halted, n_running, next, norm_w,
                       lora_down, lora_B, lora_scale, A, inj_B, halt_w, halt_b, stride_x,
                       stride_h, stride_e, stride_out, stride_next, int(n_rows), int(dim),
                       int(rank), int(t), tc, int(loop_dim), emb_coef(loop_dim), float(eps),
                       float(threshold)};
  Status st;
  if (dtype == kFloat32) st = epilogue<float>(a, stream);
  else if (dtype == kFloat16) st = epilogue<__half>(a, stream);
  else st = epilogue<__nv_bfloat16>(a, stream);
  check_launch(op, st);
}

}  // namespace ops
}  // namespace mythos_rt
