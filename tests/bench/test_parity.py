"""End-to-end parity of the compiled runtime vs the float32 reference (bench_parity).

CPU: tiny_mla in float32 against the fp32 bound. GPU: mythos_1b in bf16 with random
weights against docs/design.md's end-to-end bound (3e-2 on the logits at T = 16 loops,
greedy tokens equal for >= 95% of the steps).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.bench_parity import GREEDY_MATCH_MIN, ParityCase, ParityModels  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.testing import TOL_BF16_E2E, TOL_FP32_TORCH  # noqa: E402


def _check(r: dict, bound: float) -> None:
    assert r["bound"] == bound
    assert r["max_rel_err"] <= bound, r
    assert r["greedy_match"] >= GREEDY_MATCH_MIN, r
    assert r["passed"]


def test_parity_fp32_cpu_ragged_batch_sizes():
    cfg = MythosConfig.from_preset("tiny_mla")
    m = ParityModels(cfg, torch.float32, torch.device("cpu"), max_batch=3, max_seq_len=20,
                     max_loops=5)
    for case in (ParityCase(1, 11, 5, 5), ParityCase(3, 7, 4, 3)):
        _check(m.run(case), TOL_FP32_TORCH)


@pytest.mark.gpu
def test_parity_bf16_mythos_1b():
    cfg = MythosConfig.from_preset("mythos_1b")
    m = ParityModels(cfg, torch.bfloat16, torch.device("cuda"), max_batch=2, max_seq_len=64,
                     max_loops=16)
    r = m.run(ParityCase(2, 40, 16, 16))
    assert r["eager_rel_err"] <= TOL_BF16_E2E, f"bf16 eager itself misses the bound: {r}"
    _check(r, TOL_BF16_E2E)
