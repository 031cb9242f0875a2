"""mythos-rt: compile OpenMythos recurrent-depth transformers into fused-kernel runtimes.

Pipeline (DESIGN.md): checkpoint → trace → IR → passes → lower → plan → Runtime.
"""

from .config import ConfigError, MythosConfig

__version__ = "0.1.0"

__all__ = ["MythosConfig", "ConfigError", "__version__"]
