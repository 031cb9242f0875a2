"""Fixtures of the csrc tests: the CMake-built extension (built once per session)."""

import pytest

from ._build import build_extension, cmake, load_module, nvcc


@pytest.fixture(scope="session")
def built_so():
    if nvcc() is None or cmake() is None:
        pytest.skip("needs nvcc and cmake on PATH")
    return build_extension()


@pytest.fixture(scope="session")
def ext(built_so):
    """The test build of mythos_rt._C (imports without a GPU; launches need one)."""
    return load_module(built_so)
