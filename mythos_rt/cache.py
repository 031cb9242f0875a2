"""Where mythos-rt keeps what it builds on first use.

``$MYTHOS_RT_CACHE_DIR`` (default ``~/.cache/mythos_rt``), one subdirectory per kind:
``cpu`` (compiled row kernels), ``nvrtc`` (specialized CUDA cubins), ``autotune``
(MoE tile choices). Read at each call, so changing the variable takes effect at once.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(kind: str) -> Path:
    """The cache directory for ``kind`` (not created here)."""
    root = os.environ.get("MYTHOS_RT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mythos_rt")
    return Path(root) / kind
