"""Test-wide setup: Triton's interpreter on CPU machines, and a fresh seed per test."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is decorated (i.e. imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed(request):
    """Deterministic but different random data per test (seeded from its node id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
