// loop_prologue / loop_epilogue: host checks and dtype dispatch
// (kernels: include/mythos_rt/recurrent_step.cuh).
#include <cmath>

#include "check.h"
#include "mythos_rt/recurrent_step.cuh"
#include "ops.h"

namespace mythos_rt {
namespace ops {

static constexpr double kLoopTheta = 10000.0;

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
static Status prologue(uintptr_t h, uintptr_t e, uintptr_t norm_w, uintptr_t out, int64_t n,
                       int64_t dim, int64_t sh, int64_t se, int64_t so, int64_t t,
                       int64_t loop_dim, double eps, uintptr_t stream) {
  PrologueParams<T> p{};
  p.h = reinterpret_cast<const T*>(h);
  p.e = reinterpret_cast<const T*>(e);
  p.norm_w = reinterpret_cast<const T*>(norm_w);
  p.out = reinterpret_cast<T*>(out);
  p.stride_h = sh;
  p.stride_e = se;
  p.stride_out = so;
  p.n_rows = int(n);
  p.dim = int(dim);
  p.t = int(t);
  p.loop_dim = int(loop_dim);
  p.emb_c = float(-2.0 * std::log(kLoopTheta) / double(loop_dim));
  p.eps = float(eps);
  return launch_loop_prologue<T>(p, as_stream(stream));
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
  Status st;
  if (dtype == kFloat32) st = prologue<float>(h, e, norm_w, out, n_rows, dim, stride_h, stride_e, stride_out, t, loop_dim, eps, stream);
  else if (dtype == kFloat16) st = prologue<__half>(h, e, norm_w, out, n_rows, dim, stride_h, stride_e, stride_out, t, loop_dim, eps, stream);
  else st = prologue<__nv_bfloat16>(h, e, norm_w, out, n_rows, dim, stride_h, stride_e, stride_out, t, loop_dim, eps, stream);
  check_launch(op, st);
}

struct EpilogueArgs {
  uintptr_t x, h, e, h_out, cum_p, halted, n_running, next, norm_w, lora_down, lora_B,
      lora_scale, A, inj_B, halt_w, halt_b;
  int64_t n_rows, dim, rank, max_loops, sx, sh, se, so, sn, t, loop_dim;
  double threshold, eps;
};

template <typename T>
static Status epilogue(const EpilogueArgs& a, uintptr_t stream) {
  EpilogueParams<T> p{};
  p.x = reinterpret_cast<const T*>(a.x);
  p.h = reinterpret_cast<T*>(a.h);
  p.e = reinterpret_cast<const T*>(a.e);
  p.h_out = reinterpret_cast<T*>(a.h_out);
  p.cum_p = reinterpret_cast<float*>(a.cum_p);
  p.halted = reinterpret_cast<unsigned char*>(a.halted);
  p.n_running = reinterpret_cast<int*>(a.n_running);
  p.next = reinterpret_cast<T*>(a.next);
  p.norm_w = reinterpret_cast<const T*>(a.norm_w);
  p.lora_down = reinterpret_cast<const T*>(a.lora_down);
  p.lora_B = reinterpret_cast<const T*>(a.lora_B);
  p.lora_scale = reinterpret_cast<const T*>(a.lora_scale);
  p.A = reinterpret_cast<const float*>(a.A);
  p.inj_B = reinterpret_cast<const T*>(a.inj_B);
  p.halt_w = reinterpret_cast<const T*>(a.halt_w);
  p.halt_b = reinterpret_cast<const T*>(a.halt_b);
  p.stride_x = a.sx;
  p.stride_h = a.sh;
  p.stride_e = a.se;
  p.stride_out = a.so;
  p.stride_next = a.sn;
  p.n_rows = int(a.n_rows);
  p.dim = int(a.dim);
  p.rank = int(a.rank);
  p.t = int(a.t);
  p.tc = int(a.t < a.max_loops - 1 ? a.t : a.max_loops - 1);  // clamped LoRA scale row
  p.loop_dim = int(a.loop_dim);
  p.emb_c = float(-2.0 * std::log(kLoopTheta) / double(a.loop_dim));
  p.eps = float(a.eps);
  p.threshold = float(a.threshold);
  return launch_loop_epilogue<T>(p, as_stream(stream));
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
  EpilogueArgs a{block_out, h, e, h_out, cum_p, halted, n_running, next, norm_w, lora_down,
                 lora_B, lora_scale, A, inj_B, halt_w, halt_b, n_rows, dim, rank, max_loops,
                 stride_x, stride_h, stride_e, stride_out, stride_next, t, loop_dim,
                 threshold, eps};
  Status st;
  if (dtype == kFloat32) st = epilogue<float>(a, stream);
  else if (dtype == kFloat16) st = epilogue<__half>(a, stream);
  else st = epilogue<__nv_bfloat16>(a, stream);
  check_launch(op, st);
}

}  // namespace ops
}  // namespace mythos_rt
