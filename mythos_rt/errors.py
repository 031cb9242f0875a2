"""The errors a user's mistake raises: each message names the argument or file and the problem."""


class InputError(ValueError):
    """A call's arguments are invalid (names the argument, its value and the limit)."""


class ArtifactError(ValueError):
    """The directory is not a loadable mythos-rt artifact (names file and problem)."""
