"""CPU backend of mythos-rt: the lean decode path (registry backend ``"cpu"``).

On a CPU, a decode step of a small or medium model is bound by dispatch, not arithmetic:
each PyTorch call costs a few microseconds whatever its size, and the torch reference
implementations (``mythos_rt.ops``) spend 100+ calls per sublayer on generality (masks,
dtype round trips, host-synchronizing scatters). These implementations run the same ops
in as few calls as possible:

* weights are fused once at compile time by each op's ``prepare`` function (MLA
  absorption into the query and output projections, norm weights and the softmax scale
  folded into matrices, concatenated projections, per-loop LoRA matrices, per-expert
  views);
* positions and routing decisions are read on the host, where that is free;
* RoPE is one in-place complex multiply;
* at decode, each sublayer is one call, for all of the step's rows, of a C++ kernel
  (``decode_row.cpp``: RMSNorm, MLA over the joint cache, GQA, MoE, dense FFN, head, loop
  epilogue;
  norms and epilogues of prefill chunks too) over those same layouts, compiled on first
  use by the host C++ compiler and cached (``mythos_rt.cpu.native``), its arguments
  bound once per plan step (the ops' ``bind_*`` functions). Without a compiler, or with
  ``MYTHOS_RT_CPU_NATIVE=0``, the same rows run as a few PyTorch calls each.

Same signatures and cache contracts as the torch implementations, which they fall back
to for what they do not specialize (dtypes other than float32, positions past the
cache), so every input gives the reference's answer. bf16 models: attention, the MoE,
the dense FFNs and the head keep their weights (and the KV caches) bf16 and run decode
kernels that widen them in registers, summing in float32; prompt chunks, norms and loop
steps run the torch implementations in bf16. Real-size behaviour and numbers:
``docs/cpu.md``.

* ``mythos_rt.cpu.attention``  ``mla_attention_cpu``, ``gqa_attention_cpu``
* ``mythos_rt.cpu.moe``        ``moe_ffn_cpu``
* ``mythos_rt.cpu.ffn``        ``dense_ffn_cpu``, ``swiglu_cpu``
* ``mythos_rt.cpu.head``       ``head_cpu``
* ``mythos_rt.cpu.recurrent``  ``loop_prologue_cpu``, ``loop_epilogue_cpu``
* ``mythos_rt.cpu.norm``       ``rmsnorm_cpu``
* ``mythos_rt.cpu.native``     builds and loads ``decode_row.cpp`` (kernels) with
                               ``row_math.h`` (their shared math)
"""
