"""Fused ops of mythos-rt: torch reference implementations plus Triton/CUDA registrations.

Importing this package registers every op (see ``registry``). One module per op family;
each holds the op's torch implementation (the per-op reference) and registers the
Triton kernel from ``mythos_rt.triton_kernels`` and, where one exists, the CUDA kernel.
"""

from . import registry  # noqa: F401
from .registry import BackendError, Selected, backends_of, load, ops, register, select  # noqa: F401
from . import attention, comm, ffn, head, moe, norm, recurrent  # noqa: F401,E402
