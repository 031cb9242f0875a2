"""Progress reporting for long CLI steps (loading, packing, capture), on stderr."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


@contextmanager
def stage(desc: str, enabled: bool = True) -> Iterator[None]:
    """Print ``desc ...`` then ``done (X s)`` around a step."""
    if not enabled:
        yield
        return
    print(f"{desc} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    print(f" done ({time.perf_counter() - t0:.2f} s)", file=sys.stderr, flush=True)


def bar(items: Iterable[T], total: Optional[int] = None, desc: str = "",
        enabled: bool = True, width: int = 30) -> Iterator[T]:
    """Yield items while drawing a progress bar (redrawn in place on a terminal)."""
    items = list(items) if total is None else items
    total = len(items) if total is None else total
    tty = sys.stderr.isatty()
    for i, item in enumerate(items, 1):
        yield item
        if enabled and total and (tty or i == total):
            filled = width * i // total
            end = "\n" if i == total else ""
            print(f"\r{desc} [{'#' * filled}{'.' * (width - filled)}] {i}/{total}",
                  end=end, file=sys.stderr, flush=True)
