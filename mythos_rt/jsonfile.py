"""Reading the small JSON files users hand us (configs, indexes, manifests)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import clip


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """A JSON file's top-level object; otherwise ``error`` with one line naming the file
    and the problem (a directory, non-UTF-8 bytes, bad JSON, another JSON type)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a JSON file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}): not a JSON file") from None
    except OSError as exc:
        raise error(f"{path}: unreadable: {exc.strerror or clip(str(exc))}") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise error(f"{path}: not valid JSON: {clip(str(exc), 200)}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
