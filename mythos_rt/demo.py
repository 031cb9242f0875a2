"""The quickstart job: write a small deterministic checkpoint, compile it, generate.

``mythos-rt demo`` needs no download: the package writes an OpenMythos-compatible
checkpoint itself (seeded weights, ACT tuned so positions halt at different loops),
compiles it with the mythos-rt compiler, generates greedily, and checks every decode
step's logits against the eager reference.
"""

from __future__ import annotations

import filecmp
import os
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import MythosConfig
from .errors import InputError
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


def place_demo_checkpoint(directory: str | Path, overwrite: bool = False) -> Path:
    """Write the demo checkpoint at ``directory``: beside it first, then moved in.

    Files already there are replaced only when they are the demo's own (the same bytes)
    or with ``overwrite``; any other file there is an InputError naming it.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.new-")
    except OSError as exc:
        raise InputError(f"cannot write the demo checkpoint at {directory}: "
                         f"{exc.strerror or exc}") from None
    with staging as tmp:
        names = sorted(p.name for p in write_demo_checkpoint(tmp).iterdir())
        if directory.exists():
            foreign = sorted(p.name for p in directory.iterdir()
                             if p.name not in names or not p.is_file()
                             or not filecmp.cmp(p, Path(tmp) / p.name, shallow=False))
            if foreign and not overwrite:
                raise InputError(f"{directory} holds files that are not the demo checkpoint's "
                                 f"({', '.join(foreign[:5])}); choose a new or empty directory, "
                                 "or --force (overwrite=True) to write the demo's "
                                 f"{' and '.join(names)} there")
        directory.mkdir(exist_ok=True)
        for name in names:
            os.replace(Path(tmp) / name, directory / name)
    return directory


def run_demo(directory: str | Path, *, new_tokens: int = 16, backend: str = "auto",
             device=None, echo=print, overwrite: bool = False) -> dict:
    """Write the demo checkpoint into ``directory`` (``place_demo_checkpoint``), compile it,
    generate ``new_tokens``, compare against the reference; return numbers."""
    from .compiler import compile as compile_model

    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        raise InputError(f"new_tokens must be a positive integer, got {str(new_tokens)[:40]!r}")
    t0 = time.perf_counter()
    ckpt = place_demo_checkpoint(directory, overwrite)
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
