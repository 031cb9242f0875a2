"""Errors shared by modules that sit below the runtime (sampling, the runtime itself)."""


class InputError(ValueError):
    """A call's arguments are invalid (names the argument, its value and the limit)."""
