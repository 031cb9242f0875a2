"""Train the demo model: a byte-level OpenMythos language model on Python's docstrings.

    .venv/bin/python scripts/train_demo_model.py --results r.json   # ~40 min, 1 thread
    .venv/bin/python scripts/train_demo_model.py --steps 60 --halt-steps 10 --out /tmp/pilot

The shipped mythos_rt/assets/docstrings_lm was made in two runs (phase 1, then phase 2
from its output), which the defaults do in one (phase 2's batches then differ):

    ... train_demo_model.py --steps 700 --halt-steps 0 --out /tmp/phase1
    ... train_demo_model.py --init /tmp/phase1 --steps 0 --halt-steps 120 --halt-lr 2e-3

Runs are not bit-reproducible across CPUs (vector units round differently); three runs
put the held-out level within ~0.2 bits/byte of each other, with the same depth effect
(bench/results/2026-12-02-demo-model-reproduction.md).

Data: the docstrings of Python's standard library (it ships with every Python, so no
download), UTF-8 bytes, one <eos> between docstrings. A file goes to the held-out split
when crc32 of its path inside the stdlib is 0 mod 10, so no held-out text is trained on.

Objective: upstream's, next-token cross-entropy on the model's logits, with
``mythos_rt.reference.OpenMythos`` as the model. What makes depth matter (DESIGN.md
"Training the demo model": a trial whose halting head trained from the start learned to
halt every position by loop 2, after which loops 3..T changed nothing):

  * phase 1 (``--steps``): the ACT halting head is frozen at weight 0, bias
    ``--halt-bias`` (p = sigmoid(-2.5) = 0.076 per loop, so no position halts before
    loop 14 and every trained loop runs); n_loops is sampled per batch from
    1..max_loop_iters, so every depth is trained to give an answer and deeper ones can
    improve on shallower ones;
  * phase 2 (``--halt-steps``): everything else frozen, the halting head alone trains
    with the same objective, i.e. ACT learns where positions may stop.

Outputs (``--out``): config.json + model.safetensors + mythos_tokenizer.json (what
``mythos_rt.compile`` reads) and training_checkpoint.pt, the same weights in
OpenMythos's training-checkpoint format {step, model, optimizer, cfg, vocab_size} (the
optimizer entry keeps AdamW's param_groups but not its moment buffers, which would
triple the file). ``--results`` gets the held-out evaluation as JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import sys
import sysconfig
import time
import types
import zlib
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import mythos_rt
from mythos_rt.checkpoint import _SAFE_GLOBALS, save_checkpoint
from mythos_rt.config import MythosConfig
from mythos_rt.reference import OpenMythos
from mythos_rt.testing import halting_loops
from mythos_rt.tokenizer import BYTE_EOS, BYTE_VOCAB_SIZE, ByteTokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "mythos_rt" / "assets" / "docstrings_lm"
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test"}


def demo_config() -> MythosConfig:
    """A ~1 M-parameter MLA model; one prelude and one coda layer so the loop does the work."""
    return MythosConfig(
        vocab_size=BYTE_VOCAB_SIZE, dim=128, n_heads=4, max_seq_len=256, max_loop_iters=8,
        prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=64, q_lora_rank=64,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_experts=16,
        n_shared_experts=1, n_experts_per_tok=4, expert_dim=64, lora_rank=8,
        rope_theta=10000.0, max_output_tokens=256).validate()


# ---- data ------------------------------------------------------------------------------

def docstring_corpus(stdlib: Path) -> tuple[list[str], list[str]]:
    """(train, held-out) docstrings of every stdlib module outside test directories."""
    train, held_out = [], []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if EXCLUDED_DIRS & set(Path(rel).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        docs = [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) >= 20]
        (held_out if zlib.crc32(rel.encode()) % 10 == 0 else train).extend(docs)
    return train, held_out


def to_stream(docs: list[str], tok: ByteTokenizer) -> torch.Tensor:
    """One long id stream: each docstring's bytes followed by <eos>."""
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc) + [BYTE_EOS]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(stream: torch.Tensor, seq: int, count: int) -> torch.Tensor:
    """The first ``count`` consecutive (seq + 1)-token windows of the held-out stream."""
    n = min(count, (len(stream) - 1) // seq)
    return torch.stack([stream[i * seq: i * seq + seq + 1] for i in range(n)])


# ---- training --------------------------------------------------------------------------

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def next_token_loss(model: OpenMythos, batch: torch.Tensor, n_loops: int) -> torch.Tensor:
    """Upstream's objective: mean cross-entropy (nats) of each next token."""
    logits = model(batch[:, :-1], n_loops=n_loops)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def train_phase(model, params, data, args, steps, lr, gen, log, label):
    """AdamW on ``params`` for ``steps`` batches, n_loops sampled per batch; returns the optimizer."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    T = model.cfg.max_loop_iters
    t0, running = time.perf_counter(), None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(args.warmup, steps // 10 + 1))
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s: s + args.seq + 1] for s in starts.tolist()])
        n_loops = int(torch.randint(1, T + 1, (1,), generator=gen))
        loss = next_token_loss(model, batch, n_loops)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bits = loss.item() / math.log(2)
        running = bits if running is None else 0.98 * running + 0.02 * bits
        if step % 25 == 0 or step == steps - 1:
            log(f"{label} step {step:5d}/{steps}  n_loops {n_loops}  loss {bits:.3f} bits/byte "
                f"(avg {running:.3f})  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.perf_counter() - t0:7.1f}s")
    return opt


def freeze_halting(model: OpenMythos, bias: float) -> None:
    """Halting head: weight 0, bias ``bias``, not trained (every position runs every loop)."""
    halt = model.recurrent.act.halt
    with torch.no_grad():
        halt.weight.zero_()
        halt.bias.fill_(bias)
    halt.weight.requires_grad_(False)
    halt.bias.requires_grad_(False)


# ---- evaluation ------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: OpenMythos, windows: torch.Tensor, loops: list[int], batch: int = 32):
    """Held-out bits/byte and next-byte accuracy at each n_loops."""
    out = {}
    for n in loops:
        nll, correct, count = 0.0, 0, 0
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            logits = model(w[:, :-1], n_loops=n)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                   reduction="sum").item()
            correct += int((logits.argmax(-1) == w[:, 1:]).sum())
            count += w[:, 1:].numel()
        out[n] = {"bits_per_byte": nll / count / math.log(2), "accuracy": correct / count}
    return out


def halting_histogram(model: OpenMythos, windows: torch.Tensor, n_loops: int,
                      batch: int = 32) -> dict[str, int]:
    """How many positions halt at each loop (1-based) within n_loops; "never" ran them all."""
    counts = torch.zeros(n_loops + 1, dtype=torch.long)
    for i in range(0, len(windows), batch):
        loop_of = halting_loops(model, windows[i:i + batch, :-1], n_loops)  # 0 = never
        counts += torch.bincount(loop_of.flatten(), minlength=n_loops + 1)
    hist = {str(t): int(counts[t]) for t in range(1, n_loops + 1)}
    hist["never"] = int(counts[0])
    return hist


@torch.no_grad()
def compiled_agreement(model: OpenMythos, checkpoint: Path, windows: torch.Tensor,
                       prompts: list[list[int]], loops: list[int], new_tokens: int) -> dict:
    """The compiled runtime against the reference: logits, held-out metric, greedy text."""
    rt = mythos_rt.compile(checkpoint, device="cpu", max_loops=max(loops))
    result = {"backends": rt.backends, "loops": {}}
    for n in loops:
        ref = model(windows[:, :-1], n_loops=n)
        got = torch.cat([rt.forward(windows[i:i + 8, :-1], n_loops=n)
                         for i in range(0, len(windows), 8)])
        target = windows[:, 1:].reshape(-1)
        bpb = [F.cross_entropy(x.reshape(-1, x.shape[-1]), target).item() / math.log(2)
               for x in (ref, got)]
        ref_out = [model.generate(torch.tensor([p]), new_tokens, n_loops=n, temperature=0)[0]
                   for p in prompts]
        rt_out = rt.generate([torch.tensor(p) for p in prompts], new_tokens, n_loops=n)
        result["loops"][n] = {
            "max_abs_logit_diff": float((got - ref).abs().max()),
            "bits_per_byte_reference": bpb[0], "bits_per_byte_compiled": bpb[1],
            "greedy_equal": sum(bool(torch.equal(a, b)) for a, b in zip(ref_out, rt_out)),
            "greedy_prompts": len(prompts)}
    return result


# ---- saving ------------------------------------------------------------------------------

def save_upstream_checkpoint(path: Path, model: OpenMythos, opt, step: int) -> None:
    """{step, model, optimizer, cfg, vocab_size} with cfg pickled as open_mythos.main.MythosConfig.

    open-mythos need not be installed: a stand-in module of that name is registered only
    while pickling, so the file names upstream's class and loads with either package.
    """
    package = types.ModuleType("open_mythos")
    main = types.ModuleType("open_mythos.main")
    main.MythosConfig = type("MythosConfig", (), {"__module__": "open_mythos.main"})
    package.main = main
    cfg = main.MythosConfig.__new__(main.MythosConfig)
    cfg.__dict__.update(model.cfg.to_dict())
    optimizer = opt.state_dict()
    optimizer["state"] = {}  # moments dropped: the shipped file is for inference
    with mock.patch.dict(sys.modules, {"open_mythos": package, "open_mythos.main": main}):
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer,
                    "cfg": cfg, "vocab_size": model.cfg.vocab_size}, path)


def recorded_step(directory: Path) -> int:
    """The step of the training checkpoint this script wrote into ``directory`` (0 if none)."""
    path = directory / "training_checkpoint.pt"
    if not path.is_file():
        return 0
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this checkpoint directory (e.g. a phase-1 run's --out)")
    ap.add_argument("--results", type=Path, default=None, help="write the evaluation JSON here")
    ap.add_argument("--steps", type=int, default=700, help="phase-1 steps (all weights)")
    ap.add_argument("--halt-steps", type=int, default=120, help="phase-2 steps (halting head)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--halt-lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--halt-bias", type=float, default=-2.5)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    wall0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - wall0:7.1f}s] {msg}", flush=True)

    tok = ByteTokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_docs, held_docs = docstring_corpus(stdlib)
    train, held = to_stream(train_docs, tok), to_stream(held_docs, tok)
    windows = eval_windows(held, args.seq, args.eval_windows)
    log(f"corpus {stdlib}: train {len(train_docs)} docstrings / {len(train)} bytes, "
        f"held-out {len(held_docs)} / {len(held)} bytes, {len(windows)} eval windows")

    cfg = demo_config()
    model = OpenMythos(cfg)
    if args.init:
        model.load_state_dict(mythos_rt.load_checkpoint(args.init, cfg)[1], strict=True)
        model.recurrent.act.halt.requires_grad_(False)
    else:
        freeze_halting(model, args.halt_bias)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters, max_loop_iters {cfg.max_loop_iters}")

    model.train()
    body = [p for p in model.parameters() if p.requires_grad]
    opt = train_phase(model, body, train, args, args.steps, args.lr, gen, log, "phase 1")
    phase1_s = time.perf_counter() - wall0
    T = cfg.max_loop_iters
    loops = sorted({1, 2, 3, 4, 6, T, T + T // 2, 2 * T, 4 * T})
    model.eval()
    phase1_eval = None
    if args.halt_steps:  # the model before ACT learns, to compare with the final one
        phase1_eval = evaluate(model, windows, loops)
        log("phase 1 held-out: " + ", ".join(
            f"n={n}: {r['bits_per_byte']:.3f} bpb" for n, r in phase1_eval.items()))
        for p in model.parameters():
            p.requires_grad_(False)
        halt = list(model.recurrent.act.halt.parameters())
        for p in halt:
            p.requires_grad_(True)
        model.train()
        opt = train_phase(model, halt, train, args, args.halt_steps, args.halt_lr, gen, log,
                          "phase 2")
        for p in halt:
            p.requires_grad_(False)
        model.eval()
    train_s = time.perf_counter() - wall0

    final_eval = evaluate(model, windows, loops)
    log("final held-out: " + ", ".join(
        f"n={n}: {r['bits_per_byte']:.3f} bpb {r['accuracy']:.3f} acc"
        for n, r in final_eval.items()))
    hist = {n: halting_histogram(model, windows, n) for n in (T, 2 * T)}
    log(f"halting (n_loops {T}): {hist[T]}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, cfg, model.state_dict())
    tok.save(args.out)
    step = (recorded_step(args.init) if args.init else 0) + args.steps + args.halt_steps
    save_upstream_checkpoint(args.out / "training_checkpoint.pt", model, opt, step)
    log(f"saved {args.out}")

    prompts = [tok.encode(d[:24]) for d in held_docs[:8]]
    agreement = compiled_agreement(model, args.out, windows[:32], prompts, [1, T, 2 * T], 32)
    log(f"compiled vs reference: {json.dumps(agreement['loops'])}")

    if args.results:
        results = {
            "what": "byte-level OpenMythos LM on Python stdlib docstrings: held-out bits/byte "
                    "and next-byte accuracy vs n_loops",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "config": cfg.to_dict(), "parameters": n_params,
            "corpus": {"stdlib": str(stdlib), "python": platform.python_version(),
                       "train_bytes": len(train), "held_out_bytes": len(held),
                       "eval_bytes": int(windows[:, 1:].numel())},
            "wall_s": {"phase1": phase1_s, "train_total": train_s,
                       "total": time.perf_counter() - wall0},
            "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor(),
            "held_out_phase1": phase1_eval, "held_out_final": final_eval,
            "halting_histogram": hist, "compiled_vs_reference": agreement,
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
