"""The quickstart job: compile the shipped trained model, answer text prompts, show depth.

``mythos-rt demo`` needs no download: the package ships a small byte-level OpenMythos
language model trained here on CPU on Python docstrings (``mythos_rt/assets/docstrings_lm``,
``bench/results/2026-12-01-demo-model.md``). The demo copies it to a directory, compiles
it, completes a few prompts as text, and prints what the runtime does for a recurrent-depth
model: held-out bits/byte at several loop counts, where ACT halts positions, the largest
logit difference to the eager reference and decode speed against it. The model is weak
(about 2.8 bits/byte); depth helps it modestly from 1 to 4 loops and not beyond.
"""

from __future__ import annotations

import filecmp
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import InputError
from .reference import OpenMythos
from .testing import halting_loops

DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "docstrings_lm"
DEMO_FILES = ("config.json", "model.safetensors", "mythos_tokenizer.json")
DEMO_PROMPTS = ["Return the number of ", "If the file does not exist, ",
                "This method is called when "]
# Held-out text written for the demo (not in the training data), in the docstring style
# the model learned.
HELD_OUT = (
    "Return a new list holding the items of the sequence in sorted order.\n\n"
    "The key argument names a function of one argument that is used to extract a "
    "comparison key from each element. If reverse is true, the list is sorted as if "
    "each comparison were reversed. The sort is stable: items that compare equal keep "
    "their original order.\n\n"
    "Open the named file and return a stream object. If the file cannot be opened, an "
    "error is raised. The mode argument is an optional string that specifies the mode "
    "in which the file is opened; it defaults to reading text.\n\n"
    "Remove and return the last item of the queue. If the queue is empty, this call "
    "blocks until an item is available, unless a timeout is given, in which case it "
    "raises an exception when no item arrives in time.\n")
DEMO_LOOPS = (1, 2, 4, 8)
HALTING_LOOPS = 16  # beyond the trained depth: ACT halts positions only there


def place_demo_checkpoint(directory: str | Path, overwrite: bool = False) -> Path:
    """Copy the shipped demo checkpoint to ``directory``: beside it first, then moved in.

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
        for name in DEMO_FILES:
            shutil.copyfile(DEMO_MODEL / name, Path(tmp) / name)
        if directory.exists():
            foreign = sorted(p.name for p in directory.iterdir()
                             if p.name not in DEMO_FILES or not p.is_file()
                             or not filecmp.cmp(p, Path(tmp) / p.name, shallow=False))
            if foreign and not overwrite:
                raise InputError(f"{directory} holds files that are not the demo checkpoint's "
                                 f"({', '.join(foreign[:5])}); choose a new or empty directory, "
                                 "or --force (overwrite=True) to write the demo's "
                                 f"{', '.join(DEMO_FILES)} there")
        directory.mkdir(exist_ok=True)
        for name in DEMO_FILES:
            os.replace(Path(tmp) / name, directory / name)
    return directory


def _nats(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy of ``ids`` (1, T) under ``logits`` (1, T, V)."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:],
                                             reduction="sum").item()


def _histogram(loop_of: torch.Tensor, n_loops: int) -> str:
    counts = torch.bincount(loop_of.flatten(), minlength=n_loops + 1).tolist()
    used = [f"{k}: {c}" for k, c in enumerate(counts) if k and c]
    return ", ".join(used + [f"never: {counts[0]}"])


def run_demo(directory: str | Path, *, new_tokens: int = 40, backend: str = "auto",
             device=None, echo=print, overwrite: bool = False) -> dict:
    """Copy the demo checkpoint into ``directory`` (``place_demo_checkpoint``), compile it,
    complete ``DEMO_PROMPTS`` with ``new_tokens`` bytes each, measure depth, ACT and the
    agreement and speed against the reference; return the numbers."""
    from .compiler import compile as compile_model

    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        raise InputError(f"new_tokens must be a positive integer, got {str(new_tokens)[:40]!r}")
    ckpt = place_demo_checkpoint(directory, overwrite)
    t0 = time.perf_counter()
    rt = compile_model(ckpt, device=device, backend=backend, max_batch_size=len(DEMO_PROMPTS),
                       max_loops=HALTING_LOOPS)
    t_compile = time.perf_counter() - t0
    cfg = rt.config
    ref = OpenMythos(cfg).eval()
    ref.load_state_dict(load_checkpoint(ckpt)[1], strict=True)
    echo(f"model       {ckpt}: a byte-level LM trained on Python docstrings "
         f"({sum(p.numel() for p in ref.parameters()):,} parameters, "
         f"max_loop_iters={cfg.max_loop_iters}, tokenizer {rt.tokenizer!r})")
    echo(f"compiled    in {t_compile:.2f} s; backends: "
         f"{', '.join(sorted(set(rt.backends.values())))}")

    n_loops = cfg.max_loop_iters
    echo(f"\nText completions (greedy, n_loops={n_loops}; the model is small: expect "
         "English-like phrases that repeat):")
    for prompt, text in zip(DEMO_PROMPTS, rt.generate(DEMO_PROMPTS, new_tokens,
                                                      n_loops=n_loops, stop=["\n"])):
        echo(f"  {prompt!r} -> {text!r}")

    text = torch.tensor(rt.tokenizer.encode(HELD_OUT))
    windows = [w[None] for w in text.split(cfg.max_seq_len) if len(w) > 1]
    predicted = sum(w.shape[1] - 1 for w in windows)
    bits, max_diff = {}, 0.0
    for n in DEMO_LOOPS:
        nats = 0.0
        for ids in windows:
            logits = rt.forward(ids.to(rt.device), n_loops=n).float().cpu()
            with torch.no_grad():
                max_diff = max(max_diff, (logits - ref(ids, n_loops=n).float()).abs().max().item())
            nats += _nats(logits, ids)
        bits[n] = nats / predicted / math.log(2)
    echo(f"\nHeld-out bits/byte ({len(text)} bytes of text not in the training data; "
         "lower is better):")
    echo("  " + "   ".join(f"n_loops={n}: {b:.3f}" for n, b in bits.items()))
    best = min(bits, key=bits.get)
    echo(f"  ({DEMO_LOOPS[0]} -> {best} loops: {bits[best] - bits[DEMO_LOOPS[0]]:+.3f} bits/byte: "
         "a weak model, which depth helps modestly)")

    loop_of = torch.cat([halting_loops(ref, ids, HALTING_LOOPS).flatten() for ids in windows])
    echo(f"\nACT halting: the loop at which each of the {loop_of.numel()} positions halts, "
         f"with n_loops={HALTING_LOOPS}:")
    echo(f"  {_histogram(loop_of, HALTING_LOOPS)}")
    echo(f"  (within the trained {n_loops} loops {int(((loop_of > 0) & (loop_of <= n_loops)).sum())}"
         f" halt: every position uses every loop up to max_loop_iters)")

    prompt = torch.tensor([rt.tokenizer.encode(DEMO_PROMPTS[0])])
    rt.generate(prompt.to(rt.device), 2, n_loops=n_loops)  # warm-up (first-call setup)
    t0 = time.perf_counter()
    out = rt.generate(prompt.to(rt.device), new_tokens, n_loops=n_loops)
    t_rt = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_out = ref.generate(prompt, new_tokens, n_loops=n_loops, temperature=0.0)
    t_ref = time.perf_counter() - t0
    same = torch.equal(out.cpu(), ref_out)
    echo(f"\nReference: max |logits - reference| = {max_diff:.2e} (forward at n_loops "
         f"{', '.join(map(str, DEMO_LOOPS))}); greedy ids "
         f"{'identical' if same else 'DIFFERENT'} over {new_tokens} tokens")
    echo(f"Speed: mythos-rt {new_tokens / t_rt:.0f} tokens/s, eager reference "
         f"{new_tokens / t_ref:.0f} tokens/s ({t_ref / t_rt:.1f}x), batch 1, n_loops={n_loops}")
    return {"same_ids": same, "max_diff": max_diff, "bits_per_byte": bits,
            "halting": torch.bincount(loop_of.flatten(), minlength=HALTING_LOOPS + 1).tolist(),
            "compile_s": t_compile, "generate_s": t_rt, "reference_s": t_ref}
