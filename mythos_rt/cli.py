"""The ``mythos-rt`` command line. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .artifact import ArtifactError
from .checkpoint import CheckpointError
from .config import ConfigError
from .ir import IRError
from .ops.registry import BackendError
from .runtime import InputError
from .trace import TraceError

# Errors that describe a user's mistake; anything else is a bug and keeps its traceback.
USER_ERRORS = (CheckpointError, ConfigError, TraceError, IRError, BackendError, InputError,
               ArtifactError, FileNotFoundError)


def _runtime(path: str, args, **compile_kw):
    """An artifact directory is loaded; anything else is compiled as a checkpoint."""
    from . import artifact, runtime
    if artifact.is_artifact(path):
        return artifact.load(path, device=args.device)
    return runtime.compile(path, device=args.device, progress=True, **compile_kw)


def _cmd_compile(args) -> int:
    from .runtime import compile as compile_model
    if Path(args.output).exists() and any(Path(args.output).iterdir()) and not args.force:
        raise InputError(f"output directory {args.output} is not empty (use --force to overwrite)")
    rt = compile_model(args.checkpoint, device=args.device, dtype=args.dtype,
                       backend=args.backend, max_batch_size=args.max_batch_size,
                       max_seq_len=args.max_seq_len, max_loops=args.max_loops, progress=True)
    print(f"saved {rt.save(args.output)}: {rt!r}")
    return 0


def _parse_prompt(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"--prompt-ids {text!r}: expected integers separated by spaces or commas") from None
    if not ids:
        raise InputError("--prompt-ids is empty")
    return ids


def _cmd_generate(args) -> int:
    import torch
    prompts = [torch.tensor(_parse_prompt(p)) for p in args.prompt_ids]
    rt = _runtime(args.model, args)
    kw = dict(n_loops=args.n_loops, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop_ids=args.stop_ids)
    if args.stream:
        rows = [p.tolist() for p in prompts]
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


def _cmd_inspect(args) -> int:
    from . import artifact
    from .passes import PIPELINE, convert_dtype, run_passes
    from .trace import trace
    if artifact.is_artifact(args.model):
        if args.after_pass:
            raise InputError("--after-pass needs a checkpoint; an artifact holds the final IR")
        from .ir import Graph
        print(Graph.from_json((Path(args.model) / "graph.json").read_text()).to_text(), end="")
        return 0
    graph, _, _ = trace(args.model)
    if args.after_pass is None:
        print(graph.to_text(), end="")
        return 0
    names = [p.__name__ for p in PIPELINE]
    if args.after_pass not in names + ["all"]:
        raise InputError(f"unknown pass {args.after_pass!r}; choose one of: {', '.join(names)}, all")
    pipeline = list(PIPELINE)
    if args.after_pass != "all":
        pipeline = pipeline[: names.index(args.after_pass) + 1]
    if args.dtype:
        pipeline.append(convert_dtype(args.dtype))
    print(run_passes(graph, pipeline).to_text(), end="")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo
    if args.out:
        result = run_demo(args.out, new_tokens=args.new_tokens, backend=args.backend,
                          device=args.device)
    else:
        with tempfile.TemporaryDirectory(prefix="mythos-demo-") as d:
            result = run_demo(d, new_tokens=args.new_tokens, backend=args.backend,
                              device=args.device)
    return 0 if result["same_ids"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mythos-rt", description="Compile and run OpenMythos "
                                "recurrent-depth transformers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dtypes = ["float32", "float16", "bfloat16"]
    backends = ["auto", "torch", "triton", "cuda"]

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
    c.set_defaults(fn=_cmd_compile)

    g = sub.add_parser("generate", help="generate tokens from prompt ids")
    g.add_argument("model", help="artifact directory (from `compile`) or a checkpoint")
    g.add_argument("--prompt-ids", action="append", required=True,
                   help="one prompt as ids separated by spaces/commas; repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--n-loops", type=int, default=None, help="default: max_loop_iters")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop-ids", type=int, nargs="*", default=[])
    g.add_argument("--stream", action="store_true", help="print each step's tokens as produced")
    g.add_argument("--device", default=None)
    g.set_defaults(fn=_cmd_generate)

    i = sub.add_parser("inspect", help="print the IR of a checkpoint or artifact")
    i.add_argument("model", help="checkpoint or artifact directory")
    i.add_argument("--after-pass", default=None, help="run passes up to NAME (or 'all')")
    i.add_argument("--dtype", default=None, choices=dtypes)
    i.set_defaults(fn=_cmd_inspect)

    d = sub.add_parser("demo", help="write a small checkpoint, compile it, generate, compare "
                       "against the eager reference")
    d.add_argument("--out", help="directory for the demo checkpoint (default: a temp dir)")
    d.add_argument("--new-tokens", type=int, default=16)
    d.add_argument("--backend", default="auto", choices=backends)
    d.add_argument("--device", default=None)
    d.set_defaults(fn=_cmd_demo)

    from .profiling import add_commands  # bench, profile
    add_commands(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
