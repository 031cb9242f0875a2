"""bench/bench_cuda.py runs anywhere: on CPU it says it needs a GPU and returns no rows."""

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bench_cuda_on_cpu_returns_empty(capsys):
    from bench import bench_cuda
    assert bench_cuda.run(quick=True) == []
    assert "needs a CUDA GPU" in capsys.readouterr().out
