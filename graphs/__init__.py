"""CUDA-graph capture and replay of lowered plans (installed as mythos_rt.graphs)."""

from .runner import DecodeGraphs, batch_buckets

__all__ = ["DecodeGraphs", "batch_buckets"]
