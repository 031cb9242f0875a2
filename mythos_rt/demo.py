"""The quickstart job: write a small deterministic checkpoint, compile it, generate.

``mythos-rt demo`` needs no download: the package writes an OpenMythos-compatible
checkpoint itself (seeded weights, ACT tuned so positions halt at different loops),
compiles it with the mythos-rt compiler, generates greedily, and checks every decode
step's logits against the eager reference.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import MythosConfig
from .reference import OpenMythos
from .testing import spread_act_halting

DEMO_PRESET = "small_mla"
DEMO_PROMPT = [[1, 17, 42, 7, 99, 3, 250, 8], [5, 11, 300, 2, 64, 128, 9, 77]]


def write_demo_checkpoint(directory: str | Path, preset: str = DEMO_PRESET) -> Path:
    """Write config.json + model.safetensors of a seeded model; same bytes every time."""
    cfg = MythosConfig.from_preset(preset)
    torch.manual_seed(0)
    model = OpenMythos(cfg).eval()
    with torch.no_grad():  # N(0, 0.02) weights make greedy decoding repeat one token
        model.embed.weight.normal_(0.0, 0.5)
    spread_act_halting(model, torch.tensor(DEMO_PROMPT) % cfg.vocab_size, seed=0)
    return save_checkpoint(directory, cfg, model.state_dict())


def run_demo(directory: str | Path, *, new_tokens: int = 16, backend: str = "auto",
             device=None, echo=print) -> dict:
    """Compile the demo checkpoint, generate, compare against the reference; return numbers."""
    from .compiler import compile as compile_model

    directory = Path(directory)
    t0 = time.perf_counter()
    ckpt = write_demo_checkpoint(directory)
    t_write = time.perf_counter() - t0
    echo(f"checkpoint  {ckpt} ({DEMO_PRESET}, written in {t_write * 1e3:.0f} ms)")

    t0 = time.perf_counter()
    rt = compile_model(ckpt, device=device, backend=backend, max_batch_size=2)
    t_compile = time.perf_counter() - t0
    echo(f"compiled    {rt!r} in {t_compile:.2f} s")

    prompt = torch.tensor(DEMO_PROMPT)
    n_loops = rt.config.max_loop_iters
    t0 = time.perf_counter()
    ids, logits = rt.generate(prompt, new_tokens, n_loops=n_loops, return_logits=True)
    t_rt = time.perf_counter() - t0

    cfg, sd = load_checkpoint(ckpt)
    ref = OpenMythos(cfg).eval()
    ref.load_state_dict(sd, strict=True)
    t0 = time.perf_counter()
    ref_ids = ref.generate(prompt, new_tokens, n_loops=n_loops, temperature=0.0)
    t_ref = time.perf_counter() - t0
    with torch.no_grad():  # teacher-forced reference logits at every generated position
        full = ref(ids[:, :-1].cpu(), n_loops=n_loops)[:, prompt.shape[1] - 1:]
    max_diff = (logits.float().cpu() - full.float()).abs().max().item()

    for row in ids.tolist():
        echo(f"generated   {row}")
    echo(f"reference   {'identical ids' if torch.equal(ids.cpu(), ref_ids) else 'DIFFERENT ids'}"
         f"; max |logits - reference| = {max_diff:.3e} over {new_tokens} steps")
    echo(f"timing      mythos-rt generate {t_rt * 1e3:.0f} ms "
         f"({t_rt / new_tokens * 1e3:.1f} ms/token incl. prefill), eager reference "
         f"{t_ref * 1e3:.0f} ms  ->  {t_ref / t_rt:.1f}x")
    return {"ids": ids.tolist(), "same_ids": torch.equal(ids.cpu(), ref_ids),
            "max_diff": max_diff, "compile_s": t_compile, "generate_s": t_rt,
            "reference_s": t_ref}
