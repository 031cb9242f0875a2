"""Import the real open-mythos 0.5.0 model code (open_mythos/main.py) for parity tests.

The package's __init__ imports its tokenizer, which needs `transformers`; we register
a bare package module instead and execute only main.py, under its real module name
`open_mythos.main` (so objects pickled from it carry upstream's class paths).
"""

import importlib.util
import os
import sys
import types

import pytest


def upstream_main():
    """Return the `open_mythos.main` module, or skip the test if open-mythos is absent."""
    if "open_mythos.main" in sys.modules:
        return sys.modules["open_mythos.main"]
    spec = importlib.util.find_spec("open_mythos")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open-mythos is not installed (pip install --no-deps open-mythos==0.5.0)")
    pkg_dir = list(spec.submodule_search_locations)[0]
    pkg = types.ModuleType("open_mythos")
    pkg.__path__ = [pkg_dir]
    sys.modules.setdefault("open_mythos", pkg)
    main_spec = importlib.util.spec_from_file_location(
        "open_mythos.main", os.path.join(pkg_dir, "main.py"))
    module = importlib.util.module_from_spec(main_spec)
    sys.modules["open_mythos.main"] = module
    main_spec.loader.exec_module(module)
    assert not module._HAS_FLASH_ATTN, "flash-attn changes upstream GQA numerics; uninstall it"
    return module
