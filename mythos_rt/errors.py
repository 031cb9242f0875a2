"""The errors a user's mistake raises: each message names the argument or file and the
problem, and stays one short line however much input there is (``clip``, ``listed``)."""

from __future__ import annotations

from typing import Iterable


class InputError(ValueError):
    """A call's arguments are invalid (names the argument, its value and the limit)."""


class ArtifactError(ValueError):
    """The directory is not a loadable mythos-rt artifact (names file and problem)."""


def clip(text: str, width: int = 60) -> str:
    """``text`` cut to ``width`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= width else text[:width - 3] + "..."


def listed(names: Iterable[object], limit: int = 8, width: int = 60) -> str:
    """The first ``limit`` names, comma-separated and each cut to ``width`` characters,
    then a count of the rest: an error message stays one short line however many
    names (a config with millions of experts lists millions of missing tensors)."""
    names = list(names)
    shown = [clip(str(n), width) for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more
