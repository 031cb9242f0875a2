"""CUDA-graph capture and replay of lowered plans (installed as mythos_rt.graphs)."""
