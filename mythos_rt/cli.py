"""The ``mythos-rt`` command line. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError
from .compiler import BACKEND_CHOICES
from .config import ConfigError, MythosConfig
from .errors import ArtifactError, InputError
from .ir import IRError
from .ops.comm import CollectiveError
from .ops.registry import BackendError
from .tokenizer import TokenizerError
from .options import ACT_MODES, DTYPES
from .trace import TraceError

# Errors that describe a user's mistake; anything else is a bug and keeps its traceback.
USER_ERRORS = (CheckpointError, ConfigError, TraceError, IRError, BackendError, InputError,
               ArtifactError, TokenizerError, FileNotFoundError, CollectiveError)


def _cmd_compile(args) -> int:
    from .artifact import check_destination
    from .compiler import compile as compile_model
    from .parallel import rank_dir
    if args.nproc is not None:
        return _launch(args)
    world, rank = _tensor_parallel(args), _rank()
    if rank != 0:  # every rank compiles and saves its share, rank 0 prints
        sys.stdout = open(os.devnull, "w")
    out = Path(args.output)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise InputError(f"output directory {args.output} is not empty (use --force to overwrite)")
    # before the compile, not after it: where this rank's share will land
    check_destination(out if world == 1 else rank_dir(out, rank, world), overwrite=args.force)
    rt = compile_model(args.checkpoint, device=args.device, dtype=args.dtype,
                       backend=args.backend, max_batch_size=args.max_batch_size,
                       max_seq_len=args.max_seq_len, max_loops=args.max_loops,
                       progress=rank == 0, act_mode=args.act_mode, tensor_parallel=world)
    saved = rt.save(args.output, overwrite=args.force)
    shares = "" if world == 1 else f" (one rank{{r}}of{world}/ directory per rank)"
    print(f"saved {saved}{shares}: {rt!r}")
    return 0


def _ints(flag: str, values, lo: int, hi: int) -> None:
    """Every value of ``flag`` within [lo, hi) (what the option's type can hold)."""
    for v in values:
        if not lo <= v < hi:
            raise InputError(f"{flag} {str(v)[:40]}: must be in [{lo}, {hi})")


def _parse_prompt(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"--prompt-ids {text[:60]!r}: expected integers separated by spaces "
                         "or commas") from None
    if not ids:
        raise InputError("--prompt-ids is empty")
    return ids


def _text_ids(rt, prompts: list[str]) -> list[list[int]]:
    """The token ids of text prompts under the runtime's tokenizer (InputError without one)."""
    from .text import encode_prompts
    if rt.tokenizer is None:
        raise InputError("this model has no tokenizer for --prompt text: "
                         "pass --tokenizer PATH (or 'byte'), or give --prompt-ids")
    return encode_prompts(rt.tokenizer, prompts)[0]


def _generation_runtime(args, prompts: list):
    """The runtime of ``generate`` and the prompts' token ids: an artifact as compiled
    (checked to fit the request, naming the compile flag to change), or a checkpoint
    compiled to fit it. ``prompts``: id lists, or str for text."""
    from . import artifact, compiler
    from .parallel import saved_world
    loops = args.n_loops if isinstance(args.n_loops, int) and args.n_loops > 0 else None
    text = isinstance(prompts[0], str)
    if not artifact.is_artifact(args.model) and saved_world(args.model) is None:
        rt = compiler.compile(args.model, device=args.device, progress=True,
                              max_batch_size=len(prompts), max_loops=loops,
                              tokenizer=args.tokenizer, act_mode=args.act_mode or "eager",
                              tensor_parallel=_tensor_parallel(args))
        return rt, (_text_ids(rt, prompts) if text else prompts)
    rt = compiler.load(args.model, device=args.device, tokenizer=args.tokenizer,
                       act_mode=args.act_mode)
    ids = _text_ids(rt, prompts) if text else prompts
    need = max(map(len, ids)) + max(args.max_new_tokens, 1) - 1
    for what, value, limit, flag in (
            ("prompts", len(prompts), rt.max_batch_size, "--max-batch-size"),
            ("loops (--n-loops)", loops or 0, rt.max_loops, "--max-loops"),
            ("positions (longest prompt + --max-new-tokens - 1)", need, rt.max_seq_len,
             "--max-seq-len")):
        if value > limit and not (flag == "--max-seq-len" and value > rt.config.max_seq_len):
            raise InputError(f"{value} {what} exceed the {limit} the artifact {args.model} was "
                             f"compiled for: recompile it with mythos-rt compile {flag} {value}")
    return rt, ids


def _tensor_parallel(args) -> int:
    """--tensor-parallel, else the world size torchrun started (1 without it)."""
    if args.tensor_parallel is not None:
        return args.tensor_parallel
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    return int(os.environ.get("RANK", "0"))


def _launch(args) -> int:
    """--nproc N: run this same command on N local ranks through torchrun."""
    if args.nproc < 1:
        raise InputError(f"--nproc must be a positive integer, got {args.nproc}")
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "mythos_rt.cli", *argv]
    return subprocess.run(cmd).returncode


def _cmd_generate(args) -> int:
    if args.nproc is not None:
        return _launch(args)
    if _rank() != 0:  # every rank computes, rank 0 prints
        sys.stdout = open(os.devnull, "w")
    if (args.prompt is None) == (args.prompt_ids is None):
        raise InputError("give --prompt TEXT (text) or --prompt-ids IDS (token ids), not both")
    _ints("--seed", [] if args.seed is None else [args.seed], -2**63, 2**64)
    _ints("--stop-ids", args.stop_ids or [], 0, 2**63)
    if args.prompt is not None:
        return _generate_text(args)
    if args.stop:
        raise InputError("--stop strings need --prompt text; use --stop-ids with --prompt-ids")
    prompts = [_parse_prompt(p) for p in args.prompt_ids]
    rt, _ = _generation_runtime(args, prompts)
    kw = dict(n_loops=args.n_loops, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop_ids=args.stop_ids or [])
    if args.stream:
        rows = [list(p) for p in prompts]
        for step in rt.stream(prompts, args.max_new_tokens, **kw):
            print(" ".join("." if t is None else str(t) for t in step), flush=True)
            for row, t in zip(rows, step):
                if t is not None:
                    row.append(t)
        out = rows
    else:
        out = [row.tolist() for row in rt.generate(prompts, args.max_new_tokens, **kw)]
    for row in out:
        print(" ".join(map(str, row)))
    return 0


def _generate_text(args) -> int:
    """Text prompts: each printed followed by its completion (rows apart by a blank line);
    one prompt streams its completion as it is produced (default on a terminal)."""
    rt, _ = _generation_runtime(args, args.prompt)
    kw = dict(n_loops=args.n_loops, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop_ids=args.stop_ids, stop=args.stop or [])
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    if stream and len(args.prompt) == 1:
        print(args.prompt[0], end="", flush=True)
        for piece in rt.stream(args.prompt[0], args.max_new_tokens, **kw):
            print(piece, end="", flush=True)
        print()
        return 0
    texts = rt.generate(args.prompt, args.max_new_tokens, **kw)
    print("\n\n".join(p + t for p, t in zip(args.prompt, texts)))
    return 0


def _cmd_inspect(args) -> int:
    """The IR as traced, or after one pass of the pipeline compile() runs (``run_passes``,
    with ``--dtype`` converting where compile converts)."""
    from . import artifact
    from .parallel import saved_world
    from .passes import run_passes
    from .trace import trace
    world = saved_world(args.model)
    if world is not None:
        return _inspect_sharded(args, world)
    if artifact.is_artifact(args.model):
        if args.after_pass:
            raise InputError("--after-pass needs a checkpoint; an artifact holds the final IR")
        from .ir import Graph
        print(Graph.from_json((Path(args.model) / "graph.json").read_text()).to_text(), end="")
        return 0
    graph, _, _ = trace(args.model, lazy=True)
    if args.after_pass is None and args.tensor_parallel is None:
        print(graph.to_text(), end="")
        return 0
    after: dict[str, Any] = {}
    final = run_passes(graph, dtype=args.dtype, after=after.__setitem__)
    if args.tensor_parallel is not None:  # rank R's share: the split and its collectives
        from .parallel import shard
        rank = _inspected_rank(args.rank, args.tensor_parallel)
        final = after["shard"] = shard(final, args.tensor_parallel, rank)
        args.after_pass = args.after_pass or "all"
    if args.after_pass not in [*after, "all"]:
        raise InputError(f"unknown pass {args.after_pass!r}; choose one of: "
                         f"{', '.join(after)}, all")
    print((final if args.after_pass == "all" else after[args.after_pass]).to_text(), end="")
    return 0


def _inspected_rank(rank, world: int) -> int:
    if rank is None:
        return 0
    if not 0 <= rank < world:
        raise InputError(f"--rank {rank} must be in [0, {world})")
    return rank


def _inspect_sharded(args, world: int) -> int:
    """A tensor-parallel artifact's directory: what each rank holds (or --rank R's IR)."""
    from .ir import Graph
    from .parallel import check_complete, check_share, describe_split, rank_dir
    if args.after_pass:
        raise InputError("--after-pass needs a checkpoint; an artifact holds the final IR")
    if args.tensor_parallel not in (None, world):
        raise InputError(f"{args.model} was saved for tensor_parallel={world}, not "
                         f"--tensor-parallel {args.tensor_parallel}")
    check_complete(args.model, world)
    graphs = []
    for r in range(world):
        d = rank_dir(args.model, r, world)
        graphs.append(Graph.from_json((d / "graph.json").read_text()))
        check_share(graphs[-1], world, r, d)
    if args.rank is not None:
        print(graphs[_inspected_rank(args.rank, world)].to_text(), end="")
        return 0
    print(f"tensor-parallel artifact {args.model}: {world} ranks, rank r loads "
          f"rank{{r}}of{world}/ (--rank R prints rank R's IR)")
    print(describe_split(graphs), end="")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    if args.out:
        result = run_demo(args.out, new_tokens=args.new_tokens, backend=args.backend,
                          device=args.device, overwrite=args.force)
    else:
        with tempfile.TemporaryDirectory(prefix="mythos-demo-") as d:
            result = run_demo(d, new_tokens=args.new_tokens, backend=args.backend,
                              device=args.device)
    return 0 if result["same_ids"] else 1


def _cmd_profile(args) -> int:
    from .profiling import check_positive, format_stages, profile
    if args.preset and args.checkpoint:
        raise InputError("give a checkpoint or --preset, not both")
    if not args.preset and not args.checkpoint:
        raise InputError("give a checkpoint path (CKPT|DIR) or --preset NAME")
    check_positive(batch=args.batch)
    for name in ("prompt_len", "new_tokens", "n_loops"):
        if getattr(args, name) is not None:
            check_positive(**{name: getattr(args, name)})
    target: Any = args.checkpoint
    if args.preset:
        target = _random_model(args.preset, args.device)
    elif not Path(args.checkpoint).exists():
        raise CheckpointError(f"{args.checkpoint}: no such file or directory")
    res = profile(target, args.prompt_len, args.new_tokens, args.n_loops, args.out,
                  batch=args.batch, device=args.device, dtype=args.dtype, backend=args.backend,
                  act_mode=args.act_mode)
    print(format_stages(res))
    tel = res["telemetry"]
    print(f"telemetry: {'%d samples' % tel['n_samples'] if tel['available'] else tel['reason']}")
    act = res["act"]
    print(f"ACT: mean halting depth {act['mean_halting_depth']} of {act['n_loops']}, "
          f"{act['never_halted']}/{act['positions']} positions never halted; halted at loop "
          f"1..{act['n_loops']}: " + " ".join(str(h["positions"]) for h in act["halted_at_loop"]))
    if res["roofline"]["path"] is None:
        print(res["roofline"]["reason"])
    print(f"wrote {res['files']['profile']}, {res['files']['trace']}"
          + (f", {res['files']['roofline']}" if res["files"]["roofline"] else ""))
    return 0


def _random_model(preset: str, device):
    """A random-weight model of ``preset`` (bf16 on CUDA, fp32 on CPU), seeded."""
    import torch

    from .compiler import resolve_device
    from .reference import OpenMythos
    cfg = MythosConfig.from_preset(preset)
    dev = resolve_device(device)
    torch.manual_seed(0)
    with torch.device(dev):
        model = OpenMythos(cfg)
    return model.to(torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()


def _bench_script() -> Path:
    """bench/bench_e2e.py of the source checkout this package runs from.

    The end-to-end benchmark is a repository tool (worker subprocesses, budgets, the
    recorded results), not part of the installed package: ``mythos-rt bench`` runs it as
    a script of the checkout."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_e2e.py"
    if not script.is_file():
        raise InputError(f"mythos-rt bench runs the repository's bench/bench_e2e.py and needs "
                         f"a source checkout (git clone, then pip install -e .): {script} not found")
    return script


def _cmd_bench(args) -> int:
    import torch
    if args.checkpoint and args.preset:
        raise InputError("give a checkpoint or --preset, not both")
    if args.budget_s <= 0:
        raise InputError(f"--budget-s must be positive, got {args.budget_s}")
    cmd = [sys.executable, str(_bench_script()), "--budget-s", str(args.budget_s)]
    if args.checkpoint:
        if not Path(args.checkpoint).exists():
            raise CheckpointError(f"{args.checkpoint}: no such file or directory")
        from .checkpoint import load_checkpoint
        load_checkpoint(args.checkpoint)  # a broken checkpoint is a one-line error here
        cmd += ["--checkpoint", str(args.checkpoint)]
    for preset in args.preset or ():
        MythosConfig.from_preset(preset)  # unknown name → ConfigError, one line
        cmd += ["--preset", preset]
    for flag, value in (("--systems", args.systems), ("--device", args.device),
                        ("--dtype", args.dtype), ("--out", args.out)):
        if value:
            cmd += [flag, *([value] if isinstance(value, str) else value)]
    if args.quick:
        cmd.append("--quick")
    if not torch.cuda.is_available():
        print("mythos-rt bench: no CUDA device: CPU timers, tiny lengths, floors are "
              "docs/design.md's H100 numbers (not measured)", flush=True)
    return subprocess.run(cmd).returncode


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="end-to-end benchmark (mythos-rt vs eager vs "
                       "torch.compile) of a checkpoint or presets, vs cost-model floors; "
                       "runs bench/bench_e2e.py of a source checkout")
    b.add_argument("checkpoint", nargs="?", help="checkpoint file or directory (default: "
                   "random-weight presets: mythos_1b, mythos_3b on GPU; tiny_mla on CPU)")
    b.add_argument("--preset", action="append", help="random-weight preset (repeatable)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--budget-s", type=float, default=240.0)
    b.add_argument("--systems", nargs="+", choices=["mythos-rt", "mythos-rt+graphs", "eager",
                   "compile:max-autotune-no-cudagraphs", "compile:reduce-overhead"])
    b.add_argument("--device", default=None)
    b.add_argument("--dtype", default=None, choices=list(DTYPES))
    b.add_argument("--out", help="write the result JSON here")
    b.set_defaults(fn=_cmd_bench)


def _add_profile(sub, dtypes, backends) -> None:
    p = sub.add_parser("profile", help="per-stage / per-kernel latency, NVML "
                       "telemetry, ACT statistics and a roofline of one generation")
    p.add_argument("checkpoint", nargs="?", help="checkpoint file or directory (CKPT|DIR)")
    p.add_argument("--preset", help="profile a random-weight preset instead")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="default 128, shortened to fit the model's max_seq_len")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="default 16 (a quarter of max_seq_len on shorter models)")
    p.add_argument("--n-loops", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default="mythos-profile", help="output directory")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=dtypes)
    p.add_argument("--backend", default="auto", choices=backends)
    p.add_argument("--act-mode", default="eager", choices=ACT_MODES, help=ACT_HELP)
    p.set_defaults(fn=_cmd_profile)


def _add_parallel(p, split_help: str) -> None:
    """--tensor-parallel and --nproc, alike for every command that runs a model split."""
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N", help=split_help)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="launch N local ranks through torchrun and split the model over them")


ACT_HELP = ("what the loop does with positions ACT halted: eager (every loop), lazy (exact, "
            "skips loops no later token needs) or reuse (approximate); see "
            "docs/adaptive-depth.md")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mythos-rt", description="Compile and run OpenMythos "
                                "recurrent-depth transformers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dtypes, backends = list(DTYPES), list(BACKEND_CHOICES)

    c = sub.add_parser("compile", help="compile a checkpoint into a runtime artifact directory")
    c.add_argument("checkpoint", help="checkpoint file or directory (see README)")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write")
    c.add_argument("--dtype", choices=dtypes, default=None, help="default: the weights' dtype")
    c.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    c.add_argument("--backend", choices=backends, default="auto")
    c.add_argument("--max-batch-size", type=int, default=8)
    c.add_argument("--max-seq-len", type=int, default=None, help="default: the config's")
    c.add_argument("--max-loops", type=int, default=None, help="default: max_loop_iters")
    c.add_argument("--force", action="store_true", help="overwrite a non-empty output dir")
    c.add_argument("--act-mode", default="eager", choices=ACT_MODES, help=ACT_HELP)
    _add_parallel(c, "split the checkpoint over N ranks, each saving its share into "
                  "OUTPUT/rank{r}of{N}/ (default: torchrun's world size); see docs/parallel.md")
    c.set_defaults(fn=_cmd_compile)

    g = sub.add_parser("generate", help="complete text prompts (or token-id prompts)")
    g.add_argument("model", help="artifact directory (from `compile`) or a checkpoint")
    g.add_argument("--prompt", action="append", default=None,
                   help="one text prompt; repeat for a batch (needs a tokenizer)")
    g.add_argument("--prompt-ids", action="append", default=None,
                   help="one prompt as ids separated by spaces/commas; repeat for a batch")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, mythos_tokenizer.json, a directory holding one, or "
                        "'byte' (default: the artifact's or checkpoint's own)")
    g.add_argument("--stop", action="append", default=None,
                   help="stop string for text prompts (repeatable; not printed)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--n-loops", type=int, default=None, help="default: max_loop_iters")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop-ids", type=int, nargs="*", default=None,
                   help="stop token ids (default for text: the tokenizer's eos id)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print the completion as it is produced (text: default on a "
                        "terminal, one prompt only; ids: each step's tokens)")
    g.add_argument("--device", default=None)
    g.add_argument("--act-mode", default=None, choices=ACT_MODES,
                   help=ACT_HELP + " (default: the artifact's, else eager)")
    _add_parallel(g, "split a checkpoint over N ranks (default: torchrun's world size); "
                  "see docs/parallel.md")
    g.set_defaults(fn=_cmd_generate)

    i = sub.add_parser("inspect", help="print the IR of a checkpoint or artifact (a "
                       "tensor-parallel artifact: what each rank holds)")
    i.add_argument("model", help="checkpoint or artifact directory")
    i.add_argument("--after-pass", default=None, help="run passes up to NAME (or 'all')")
    i.add_argument("--dtype", default=None, choices=dtypes)
    i.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="show one rank's share of the model split over N ranks")
    i.add_argument("--rank", type=int, default=None,
                   help="the rank whose IR --tensor-parallel (or a tensor-parallel "
                        "artifact) shows (default 0; an artifact: the table of every rank)")
    i.set_defaults(fn=_cmd_inspect)

    d = sub.add_parser("demo", help="compile the shipped trained model, complete text, show "
                       "loss vs loop count, ACT halting, agreement and speed vs the reference")
    d.add_argument("--out", help="directory to copy the demo checkpoint to (default: a temp dir)")
    d.add_argument("--new-tokens", type=int, default=40, help="bytes per text completion")
    d.add_argument("--backend", default="auto", choices=backends)
    d.add_argument("--device", default=None)
    d.add_argument("--force", action="store_true", help="replace other files in --out")
    d.set_defaults(fn=_cmd_demo)

    _add_bench(sub)
    _add_profile(sub, dtypes, backends)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        print(f"mythos-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mythos-rt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
