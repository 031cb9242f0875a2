"""End-to-end parity: the compiled runtime against the float32 eager reference.

docs/design.md's end-to-end bound: bf16 logits within 3e-2 (relative Frobenius error per
decode step, worst step reported) at T = 16 loops, and greedy tokens equal for at least
95% of the steps. Same random weights for both; the ACT halting head is calibrated
(``spread_act_halting``) so positions halt at different loops, some never, instead of
all at loop 1 as a random init does.

One case: prompt P random ids, the runtime generates N greedy tokens with its logits;
the float32 reference then reads the runtime's own sequence in one cache-less forward
(teacher forcing), so every step is judged on the same context. ``greedy_match`` is the
share of steps where the reference's argmax equals the runtime's token. The eager model
in the runtime's dtype is judged the same way (``eager_rel_err``): what the dtype costs
by itself, next to what the runtime adds.

GPU: mythos_1b, bf16, B ∈ {1, 4}. CPU: tiny_mla, float32 (bound: the fp32 one).

    python bench/bench_parity.py [--quick] [--json]
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import bench_main  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.testing import TOL_BF16_E2E, TOL_FP32_TORCH, rel_err, spread_act_halting  # noqa: E402

# The share of greedy steps that must match (docs/design.md "Numerics").
GREEDY_MATCH_MIN = 0.95
BOUND = {torch.float32: TOL_FP32_TORCH, torch.bfloat16: TOL_BF16_E2E,
         torch.float16: TOL_BF16_E2E}


@dataclass(frozen=True)
class ParityCase:
    batch: int
    prompt: int
    new_tokens: int
    n_loops: int


def default_setup(quick: bool, on_gpu: bool) -> tuple[str, torch.dtype, list[ParityCase]]:
    """(preset, dtype, cases) of the default run, most important case first."""
    if on_gpu:
        cases = [ParityCase(1, 64, 32, 16), ParityCase(4, 48, 16, 16)]
        return "mythos_1b", torch.bfloat16, cases[:1] if quick else cases
    cases = [ParityCase(1, 9, 6, 4), ParityCase(3, 7, 4, 4)]
    return "tiny_mla", torch.float32, cases[:1] if quick else cases


class ParityModels:
    """The float32 reference, its copy in ``dtype`` and the runtime compiled from it."""

    def __init__(self, cfg: MythosConfig, dtype: torch.dtype, device: torch.device,
                 max_batch: int, max_seq_len: int, max_loops: int, backend: str = "auto",
                 seed: int = 0):
        import mythos_rt
        from mythos_rt.reference import OpenMythos
        self.cfg, self.dtype, self.device = cfg, dtype, device
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.device(device):
            self.ref = OpenMythos(cfg).float().eval()
            calib = torch.randint(0, cfg.vocab_size, (2, 16))
        spread_act_halting(self.ref, calib, seed=seed)
        self.model = copy.deepcopy(self.ref).to(dtype).eval()
        self.build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.rt = mythos_rt.compile(self.model, device=device, dtype=dtype, backend=backend,
                                    max_batch_size=max_batch, max_seq_len=max_seq_len,
                                    max_loops=max_loops)
        self.compile_s = time.perf_counter() - t0

    @torch.no_grad()
    def run(self, case: ParityCase, seed: int = 1) -> dict:
        """One case's measurements (see the module docstring); ``passed`` against the bound."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.cfg.vocab_size, (case.batch, case.prompt), generator=g)
        ids = ids.to(self.device)
        t0 = time.perf_counter()
        out, logits = self.rt.generate(ids, case.new_tokens, n_loops=case.n_loops,
                                       return_logits=True)
        gen_s = time.perf_counter() - t0
        seq = out[:, :-1]  # the context each generated token was chosen from
        P, N = case.prompt, case.new_tokens
        ref = self.ref(seq, n_loops=case.n_loops)[:, P - 1:P - 1 + N].float()
        eager = self.model(seq, n_loops=case.n_loops)[:, P - 1:P - 1 + N].float()
        errs = [rel_err(logits[:, s], ref[:, s]) for s in range(N)]
        eager_errs = [rel_err(eager[:, s], ref[:, s]) for s in range(N)]
        match = float((ref.argmax(-1) == out[:, P:]).float().mean())
        bound = BOUND[self.dtype]
        return {"max_rel_err": max(errs), "mean_rel_err": sum(errs) / N,
                "eager_rel_err": max(eager_errs), "greedy_match": round(match, 4),
                "bound": bound, "greedy_min": GREEDY_MATCH_MIN,
                "passed": max(errs) <= bound and match >= GREEDY_MATCH_MIN,
                "generate_s": round(gen_s, 2)}


def iter_rows(quick: bool = False) -> Iterator[dict]:
    """One row per case, yielded as each finishes (the runtime is compiled once)."""
    on_gpu = torch.cuda.is_available()
    preset, dtype, cases = default_setup(quick, on_gpu)
    device = torch.device("cuda" if on_gpu else "cpu")
    cfg = MythosConfig.from_preset(preset)
    models = ParityModels(cfg, dtype, device, max(c.batch for c in cases),
                          max(c.prompt + c.new_tokens + 1 for c in cases),
                          max(c.n_loops for c in cases))
    for c in cases:
        r = models.run(c)
        yield {"name": f"parity/{preset}/B{c.batch}/P{c.prompt}/N{c.new_tokens}/T{c.n_loops}",
               "status": "ok" if r["passed"] else "failed", "preset": preset,
               "dtype": str(dtype).replace("torch.", ""), "device": str(device),
               **vars(c), **r, "build_s": round(models.build_s, 2),
               "compile_s": round(models.compile_s, 2),
               "backends": ",".join(sorted(set(models.rt.backends.values())))}


def run(quick: bool = False) -> list[dict]:
    return list(iter_rows(quick))


if __name__ == "__main__":
    bench_main(run, ["name", "status", "max_rel_err", "greedy_match", "eager_rel_err"],
               __doc__.split("\n")[0])
