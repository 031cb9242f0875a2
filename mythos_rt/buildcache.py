"""The on-disk build cache (not the KV cache): where mythos-rt keeps what it builds on
first use, and how it writes there.

``$MYTHOS_RT_CACHE_DIR`` (default ``~/.cache/mythos_rt``), one subdirectory per kind:
``cpu`` (compiled row kernels), ``nvrtc`` (specialized CUDA cubins), ``autotune``
(MoE tile choices). Read at each call, so changing the variable takes effect at once.

Several processes may fill one cache at once, so every file lands whole or not at all
(``replacing``): written beside its target under a temporary name, then renamed.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["cache_dir", "replacing", "write_atomic"]


def cache_dir(kind: str) -> Path:
    """The cache directory for ``kind`` (not created here)."""
    root = os.environ.get("MYTHOS_RT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mythos_rt")
    return Path(root) / kind


@contextmanager
def replacing(target: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield a fresh path beside ``target`` to write (or have a tool write); it becomes
    ``target`` by an atomic rename when the block ends without error, and is removed
    otherwise. Creates ``target``'s directory; raises OSError where it cannot."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(target: Union[str, os.PathLike], data: Union[bytes, str]) -> None:
    """Write ``data`` (str as UTF-8) to ``target`` whole or not at all (see ``replacing``)."""
    with replacing(target) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
