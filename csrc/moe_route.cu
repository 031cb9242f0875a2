// moe_route: host checks and dtype dispatch (kernel: include/mythos_rt/moe_route.cuh).
#include "check.h"
#include "mythos_rt/moe_route.cuh"
#include "ops.h"

namespace mythos_rt {
namespace ops {

int route_max_experts() { return kRouteMaxExperts; }
int route_max_top_k() { return kRouteMaxTopK; }

template <typename T>
static Status launch(uintptr_t x, int64_t n_tokens, int64_t dim, int64_t stride_x, uintptr_t w,
                     int64_t n_experts, uintptr_t bias, int64_t top_k, uintptr_t ids,
                     uintptr_t weights, uintptr_t logits, uintptr_t counters, uintptr_t stream) {
  RouteParams<T> p{};
  p.x = reinterpret_cast<const T*>(x);
  p.w = reinterpret_cast<const T*>(w);
  p.bias = reinterpret_cast<const float*>(bias);
  p.ids = reinterpret_cast<int*>(ids);
  p.weights = reinterpret_cast<float*>(weights);
  p.logits = reinterpret_cast<float*>(logits);
  p.counters = reinterpret_cast<int*>(counters);
  p.stride_x = stride_x;
  p.n_tokens = int(n_tokens);
  p.dim = int(dim);
  p.n_experts = int(n_experts);
  p.top_k = int(top_k);
  return launch_moe_route<T>(p, as_stream(stream));
}

void moe_route(uintptr_t x, int64_t n_tokens, int64_t dim, int64_t stride_x, uintptr_t w,
               int64_t n_experts, uintptr_t bias, int64_t top_k, int dtype, uintptr_t ids,
               uintptr_t weights, int64_t out_rows, uintptr_t logits, int64_t logits_numel,
               uintptr_t counters, int64_t counters_numel, uintptr_t stream) {
  const char* op = "moe_route";
  check_dtype(op, dtype);
  check_range(op, "n_tokens", n_tokens, 0, 1 << 26);
  check_range(op, "dim", dim, 1, 1 << 20);
  check_range(op, "n_experts", n_experts, 1, kRouteMaxExperts);
  check_range(op, "top_k", top_k, 1, n_experts < kRouteMaxTopK ? n_experts : kRouteMaxTopK);
  MRT_CHECK(stride_x >= dim, op, "x row stride ", stride_x, " < dim ", dim);
  MRT_CHECK(out_rows >= n_tokens, op, "ids/weights hold ", out_rows, " rows, need ", n_tokens);
  MRT_CHECK(logits_numel >= n_tokens * n_experts, op, "logits scratch holds ", logits_numel,
            " floats, needs n_tokens·n_experts = ", n_tokens * n_experts);
  MRT_CHECK(counters_numel >= n_tokens, op, "counters hold ", counters_numel,
            " ints, need n_tokens = ", n_tokens);
  if (n_tokens == 0) return;
  const int es = elt_size(dtype);
  check_ptr(op, "x", x, es);
  check_ptr(op, "router_w", w, es);
  check_ptr(op, "router_bias", bias, 4);
  check_ptr(op, "ids", ids, 4);
  check_ptr(op, "weights", weights, 4);
  check_ptr(op, "logits", logits, 4);
  check_ptr(op, "counters", counters, 4);
  Status st;
  if (dtype == kFloat32) st = launch<float>(x, n_tokens, dim, stride_x, w, n_experts, bias, top_k, ids, weights, logits, counters, stream);
  else if (dtype == kFloat16) st = launch<__half>(x, n_tokens, dim, stride_x, w, n_experts, bias, top_k, ids, weights, logits, counters, stream);
  else st = launch<__nv_bfloat16>(x, n_tokens, dim, stride_x, w, n_experts, bias, top_k, ids, weights, logits, counters, stream);
  check_launch(op, st);
}

}  // namespace ops
}  // namespace mythos_rt
