"""The ``mythos-rt`` command line. User mistakes print one line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
import tempfile

from .checkpoint import CheckpointError
from .config import ConfigError
from .ir import IRError
from .ops.registry import BackendError
from .trace import TraceError

USER_ERRORS = (CheckpointError, ConfigError, TraceError, IRError, BackendError, ValueError,
               FileNotFoundError)


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


def _cmd_inspect(args) -> int:
    from .passes import DEFAULT_PASSES, convert_dtype, run_passes
    from .trace import trace
    graph, _, _ = trace(args.checkpoint)
    if args.after_pass is None:
        print(graph.to_text(), end="")
        return 0
    names = [p.__name__ for p in DEFAULT_PASSES]
    if args.after_pass not in names + ["all"]:
        raise ValueError(f"unknown pass {args.after_pass!r}; choose one of: {', '.join(names)}, all")
    pipeline = list(DEFAULT_PASSES)
    if args.after_pass != "all":
        pipeline = pipeline[: names.index(args.after_pass) + 1]
    if args.dtype:
        pipeline.append(convert_dtype(args.dtype))
    print(run_passes(graph, pipeline).to_text(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mythos-rt", description="Compile and run OpenMythos "
                                "recurrent-depth transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write a small checkpoint, compile it, generate, compare "
                       "against the eager reference")
    d.add_argument("--out", help="directory for the demo checkpoint (default: a temp dir)")
    d.add_argument("--new-tokens", type=int, default=16)
    d.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    d.add_argument("--device", default=None)
    d.set_defaults(fn=_cmd_demo)
    i = sub.add_parser("inspect", help="print the IR of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--after-pass", default=None, help="run passes up to NAME (or 'all')")
    i.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    i.set_defaults(fn=_cmd_inspect)
    __import__("mythos_rt.profiling", fromlist=["add_commands"]).add_commands(sub)  # bench, profile
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as exc:
        print(f"mythos-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
