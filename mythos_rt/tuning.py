"""Kernel tuning tables: the MoE tile configs a Runtime's Triton MoE looks up.

A table maps ``triton_kernels.moe.config_key`` strings
(``<device>|n<bucket>|D<dim>|I<expert_dim>|E<experts>|k<top_k>|S<shared slots>|<dtype>``) to
``MoEConfig`` fields. Tables come from the user's autotune cache or from an artifact
(``autotune/moe.json``); an artifact's table applies to the Runtime loaded from it only,
never to the cache. Every entry of a table read from a file passes ``check_table``: known
keys only, every field present and within the bounds below, so a file can neither crash a
kernel launch with absurd tiles nor grow without limit.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import clip

__all__ = ["MOE_FIELDS", "MAX_ENTRIES", "MAX_FILE_BYTES", "check_table", "valid_entries"]

_POW2 = lambda lo, hi: frozenset(1 << i for i in range(lo.bit_length() - 1, hi.bit_length()))  # noqa: E731

# MoEConfig field -> allowed values (tile sizes: powers of two within what the kernels and
# the workspace are built for; warps/stages: what Triton accepts on the GPUs we target).
MOE_FIELDS: dict[str, frozenset] = {
    "block_m": _POW2(16, 128),
    "block_n1": _POW2(16, 512),
    "block_k1": _POW2(16, 512),
    "block_n2": _POW2(16, 512),
    "block_k2": _POW2(16, 512),
    "block_m_shared": _POW2(16, 128),
    "split_shared": frozenset(range(1, 257)),
    "num_warps": frozenset({1, 2, 4, 8, 16}),
    "num_stages": frozenset(range(1, 9)),
}
MAX_ENTRIES = 1024  # device names × 14 token buckets × a few models, with room to spare
MAX_FILE_BYTES = 1 << 20
_KEY = re.compile(r"[^|\x00-\x20]{1,64}\|n\d{1,9}\|D\d{1,7}\|I\d{1,7}\|E\d{1,7}\|k\d{1,4}"
                  r"\|S\d{1,5}\|(float32|float16|bfloat16)")


def _describe(value: Any) -> str:
    return clip(repr(value), 40)


def _check_entry(key: Any, entry: Any) -> str:
    """The problem with one table entry, or "" when it is valid."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        return f"key {_describe(key)} is not a MoE config key (device|n<bucket>|D|I|E|k|S|dtype)"
    bucket = int(key.split("|")[1][1:])
    if bucket & (bucket - 1):
        return f"{key}: token bucket {bucket} is not a power of two"
    if not isinstance(entry, dict):
        return f"{key}: entry must be an object, got {type(entry).__name__}"
    unknown = sorted(set(entry) - set(MOE_FIELDS) - {"_ms"})
    if unknown:
        return f"{key}: unknown field(s) {', '.join(map(_describe, unknown[:5]))}"
    for name, allowed in MOE_FIELDS.items():
        value = entry.get(name)
        if type(value) is not int or value not in allowed:
            return (f"{key}: {name}={_describe(value)} is not one of the allowed values "
                    f"({min(allowed)}..{max(allowed)}"
                    + (", powers of two)" if name.startswith("block") else ")"))
    ms = entry.get("_ms", 0.0)
    if type(ms) not in (int, float) or not math.isfinite(ms) or ms < 0:
        return f"{key}: _ms={_describe(ms)} must be a finite time in ms >= 0"
    return ""


def check_table(table: Any, where: str, error: type[Exception]) -> dict[str, dict]:
    """Return ``table`` (a {key: entry} mapping) when every entry is valid; raise ``error``
    naming ``where`` and the first problem otherwise."""
    if not isinstance(table, dict):
        raise error(f"{where}: must be a JSON object of MoE configs, got {type(table).__name__}")
    if len(table) > MAX_ENTRIES:
        raise error(f"{where}: {len(table)} entries, more than the {MAX_ENTRIES} allowed")
    for key, entry in table.items():
        problem = _check_entry(key, entry)
        if problem:
            raise error(f"{where}: {problem}")
    return table


def valid_entries(table: Any) -> dict[str, dict]:
    """The valid entries of a table of unknown quality (the user's cache), others dropped."""
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if not _check_entry(k, v)}
