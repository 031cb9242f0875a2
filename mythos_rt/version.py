"""The package version (its own module so that artifact.py can record it without importing
the package's ``__init__``, which imports everything)."""

__version__ = "0.1.0"
