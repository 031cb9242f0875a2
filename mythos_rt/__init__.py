"""mythos-rt: compile OpenMythos recurrent-depth transformers into fused-kernel runtimes.

Pipeline (docs/design.md): checkpoint → trace → IR → passes → lower → plan → Runtime.

On a machine without CUDA, Triton kernels can only run in Triton's interpreter, and the
interpreter must be switched on before Triton is first imported (its standard library
is decorated at import). So importing mythos_rt there sets TRITON_INTERPRET=1.
"""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from .compiler import compile, load  # noqa: E402
from .config import ConfigError, MythosConfig  # noqa: E402
from .errors import ArtifactError, InputError  # noqa: E402
from .runtime import Runtime  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["MythosConfig", "ConfigError", "CheckpointError", "InputError", "Runtime",
           "compile", "load", "ArtifactError", "load_checkpoint", "save_checkpoint", "__version__"]
