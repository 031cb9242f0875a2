// mythos_rt._C: the one pybind11 binding file. Every op takes device addresses (ints),
// sizes, a dtype code and a CUDA stream handle; none links libtorch. Python wrappers
// with torch signatures live in mythos_rt/cuda/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops.h"

namespace py = pybind11;
namespace ops = mythos_rt::ops;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mythos-rt CUDA kernels (raw device pointers; see mythos_rt/cuda for torch wrappers)";
  m.attr("DTYPE_FLOAT32") = ops::kDtypeFloat32;
  m.attr("DTYPE_FLOAT16") = ops::kDtypeFloat16;
  m.attr("DTYPE_BFLOAT16") = ops::kDtypeBFloat16;
  m.attr("ROUTE_MAX_EXPERTS") = ops::route_max_experts();
  m.attr("ROUTE_MAX_TOP_K") = ops::route_max_top_k();

  m.def("moe_align_sizes", &ops::moe_align_sizes,
        "(rb_max, sb_per, rows, blocks) of moe_align for these sizes.",
        py::arg("n_tokens"), py::arg("n_experts"), py::arg("top_k"), py::arg("n_shared"),
        py::arg("block_m"));
  m.def("moe_align", &ops::moe_align,
        "Sort routed (token, slot) pairs by expert into BLOCK_M-padded segments; returns (rb_max, n_blocks).",
        py::arg("ids"), py::arg("ids_numel"), py::arg("n_tokens"), py::arg("top_k"),
        py::arg("n_experts"), py::arg("n_shared"), py::arg("block_m"), py::arg("counts"),
        py::arg("counts_numel"), py::arg("offsets"), py::arg("offsets_numel"),
        py::arg("sorted_pairs"), py::arg("sorted_numel"), py::arg("block_expert"),
        py::arg("block_expert_numel"), py::arg("stream"));
  m.def("moe_route", &ops::moe_route,
        "Fused router: logits, softmax, top-k on logits + bias, renormalized weights.",
        py::arg("x"), py::arg("n_tokens"), py::arg("dim"), py::arg("stride_x"), py::arg("w"),
        py::arg("n_experts"), py::arg("bias"), py::arg("top_k"), py::arg("dtype"),
        py::arg("ids"), py::arg("weights"), py::arg("out_rows"), py::arg("logits"),
        py::arg("logits_numel"), py::arg("counters"), py::arg("counters_numel"),
        py::arg("stream"));
  m.def("loop_prologue", &ops::loop_prologue,
        "combined = rmsnorm(h + loop_embed(t) + e) * norm_w, one warp per row.",
        py::arg("h"), py::arg("e"), py::arg("norm_w"), py::arg("out"), py::arg("n_rows"),
        py::arg("dim"), py::arg("stride_h"), py::arg("stride_e"), py::arg("stride_out"),
        py::arg("t"), py::arg("loop_dim"), py::arg("eps"), py::arg("dtype"), py::arg("stream"));
  m.def("loop_epilogue", &ops::loop_epilogue,
        "LoRA + LTI injection + ACT update of loop t in place (+ next prologue), one warp per row.",
        py::arg("block_out"), py::arg("h"), py::arg("e"), py::arg("h_out"), py::arg("cum_p"),
        py::arg("halted"), py::arg("n_running"), py::arg("next"), py::arg("norm_w"),
        py::arg("lora_down"), py::arg("lora_B"), py::arg("lora_scale"), py::arg("A"),
        py::arg("inj_B"), py::arg("halt_w"), py::arg("halt_b"), py::arg("n_rows"),
        py::arg("n_max"), py::arg("dim"), py::arg("rank"), py::arg("max_loops"),
        py::arg("stride_x"), py::arg("stride_h"), py::arg("stride_e"), py::arg("stride_out"),
        py::arg("stride_next"), py::arg("t"), py::arg("loop_dim"), py::arg("threshold"),
        py::arg("eps"), py::arg("dtype"), py::arg("stream"));
}
