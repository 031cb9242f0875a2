"""Building a Runtime: ``mythos_rt.compile`` (trace → passes → weights → lower) and
``mythos_rt.load`` (a saved artifact → lower, no tracing, passes or packing)."""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn

from . import artifact, parallel
from .config import MythosConfig
from .errors import InputError
from .ir import Graph
from .lower import lower
from .memory import check_fits
from .ops.registry import BACKENDS
from .options import DEFAULT_CHUNK, CompileOptions, dtype_name
from .passes import run_passes
from .progress import stage
from .runtime import Runtime
from .tokenizer import Tokenizer, resolve_tokenizer
from .trace import trace
from .weights import materialize

BACKEND_CHOICES = ("auto", *BACKENDS)


def resolve_device(device) -> torch.device:
    """The device to run on: as given (a CPU, or a CUDA device that exists here), else
    CUDA if available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"invalid device {device!r}: {str(exc).splitlines()[0]}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {device!r}: no CUDA device is available here "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                             "use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {device!r}: only {count} CUDA device(s) here")
    elif dev.type != "cpu":
        raise InputError(f"device {device!r}: mythos-rt runs on 'cpu' or 'cuda' devices")
    return dev


def check_plan_fits(cfg: MythosConfig, device: torch.device, options: CompileOptions,
                    what: str, weights: bool) -> None:
    """The plan's memory (``weights`` or not; a tensor-parallel rank's share) fits on
    ``device``, else MemoryLimitError naming what drives it."""
    check_fits(cfg, device, what, weights=weights,
               dtype_bytes=getattr(torch, options.dtype).itemsize,
               max_batch=options.max_batch_size, max_seq_len=options.max_seq_len,
               max_loops=options.max_loops, chunk=min(options.chunk, options.max_seq_len),
               lazy_depth=options.act_mode != "eager", tensor_parallel=options.tensor_parallel)


def build_runtime(optimized: Graph, cfg: MythosConfig, weights: Mapping[str, torch.Tensor],
                  device: torch.device, options: CompileOptions,
                  traced: Optional[Graph] = None, timings: Optional[dict] = None,
                  tuning: Optional[Mapping[str, dict]] = None,
                  tokenizer: Optional[Tokenizer] = None) -> Runtime:
    """Lower an optimized graph with materialized weights into a Runtime (``tuning``: an
    artifact's MoE tile configs, for this runtime only; ``tokenizer``: its text layer)."""
    t0 = time.perf_counter()
    check_plan_fits(cfg, device, options, "compiling (KV caches, activation arena)",
                    weights=False)
    lowered = lower(optimized, cfg, weights, device, getattr(torch, options.dtype),
                    max_batch=options.max_batch_size,
                    chunk=min(options.chunk, options.max_seq_len),
                    max_seq_len=options.max_seq_len, max_loops=options.max_loops,
                    backend=options.backend, overrides=options.overrides,
                    act_mode=options.act_mode, lazy_window=options.lazy_window)
    timings = dict(timings or {}, lower_s=time.perf_counter() - t0)
    return Runtime(lowered, options, traced=traced, timings=timings, tuning=tuning,
                   tokenizer=tokenizer)


def compile(model_or_path: Union[nn.Module, str, os.PathLike], *, device=None, dtype=None,
            backend: str = "auto", max_batch_size: int = 8, max_seq_len: Optional[int] = None,
            max_loops: Optional[int] = None, config: Any = None, chunk: int = DEFAULT_CHUNK,
            overrides: Optional[Mapping[str, str]] = None, cuda_graphs: bool = True,
            debug: bool = False, progress: bool = False, tokenizer=None,
            act_mode: str = "eager", tensor_parallel: int = 1,
            lazy_window: Optional[int] = None) -> Runtime:
    """Compile an OpenMythos model (module or checkpoint path) into a Runtime.

    device: default CUDA if available else CPU. dtype: default the weights' dtype.
    backend: one of {backends} (per-op ``overrides`` win).
    max_seq_len: KV-cache length (default the config's). max_loops: the largest n_loops
    you will ask for (default max_loop_iters). chunk: prefill tokens per row per launch.
    cuda_graphs: capture decode steps in CUDA graphs (on a CUDA device). debug: check
    that captured graphs' buffers never move. progress: report steps on stderr.
    tokenizer: a Tokenizer, "byte" or a tokenizer file/directory (default: the one saved
    beside a checkpoint path, none for a module); ``rt.tokenizer``, used for text prompts.
    act_mode: what the loop does with positions ACT has halted (docs/adaptive-depth.md):
    "eager" (every loop for every position, as the reference), "lazy" (exact: a halted
    position's deeper loops run only when a later position needs them, batched) or
    "reuse" (approximate: halted positions' deeper cache entries repeat their last ones).
    lazy_window: lazy decode steps as fixed passes of this many positions per row, decided
    on the device and CUDA-graph-capturable (default 16 on CUDA); 0 decides each loop's
    pass on the host (default on CPU, where it does the least work).
    tensor_parallel: split the model over this many processes, one per device, started by
    ``torchrun --nproc-per-node N`` (every rank calls compile, and then generate, alike);
    each rank reads only its share of a safetensors checkpoint. docs/parallel.md.
    """
    t0 = time.perf_counter()
    rank, world = 0, 1
    if tensor_parallel != 1:
        device = resolve_device(device) if device is not None else parallel.default_device()
        rank, world = parallel.setup(tensor_parallel, device)
    with stage("loading and tracing", progress):
        if world == 1:
            graph, cfg, sd = trace(model_or_path, config)
        else:  # a checkpoint one rank cannot read is an error on every rank
            graph, cfg, sd = parallel.together(
                "loading the model", lambda: trace(model_or_path, config, lazy=True))
    checkpoint = None if isinstance(model_or_path, nn.Module) else model_or_path
    tok = resolve_tokenizer(checkpoint, tokenizer, cfg.vocab_size)
    t1 = time.perf_counter()
    device = resolve_device(device)
    dtype = dtype if dtype is not None else sd["embed.weight"].dtype
    options = CompileOptions(
        dtype=dtype if isinstance(dtype, str) else dtype_name(dtype), backend=backend,
        max_batch_size=max_batch_size,
        max_seq_len=cfg.max_seq_len if max_seq_len is None else max_seq_len,
        max_loops=cfg.max_loop_iters if max_loops is None else max_loops, chunk=chunk,
        overrides=dict(overrides or {}), cuda_graphs=cuda_graphs, debug=debug,
        act_mode=act_mode, tensor_parallel=tensor_parallel,
        lazy_window=lazy_window).validate(cfg)
    if world > 1:
        parallel.agree("the model and compile options", (cfg.to_dict(), vars(options)))
        # nothing is read yet (lazy): the rank's share must fit its device, not the model
        check_plan_fits(cfg, device, options, f"one rank's share of the model "
                        f"(tensor_parallel={world})", weights=True)
    with stage("running passes", progress):
        optimized = parallel.shard(run_passes(graph, dtype=options.dtype), world, rank)
    t2 = time.perf_counter()
    weights = materialize(optimized, sd, device, progress=progress)
    t3 = time.perf_counter()
    return build_runtime(optimized, cfg, weights, device, options, traced=graph,
                         timings={"trace_s": t1 - t0, "passes_s": t2 - t1, "weights_s": t3 - t2},
                         tokenizer=tok)


if compile.__doc__:  # None under python -OO
    compile.__doc__ = compile.__doc__.format(backends=", ".join(map(repr, BACKEND_CHOICES)))


def load(directory: Union[str, os.PathLike], *, device=None, backend: Optional[str] = None,
         overrides: Optional[dict] = None, cuda_graphs: Optional[bool] = None,
         tokenizer=None, act_mode: Optional[str] = None) -> Runtime:
    """Restore a Runtime saved with ``Runtime.save``: no tracing, no passes, no packing.

    A tensor-parallel artifact (one ``rank{r}of{N}`` directory per rank) loads in an
    N-process group (torchrun), each rank reading its own.
    ``device`` defaults to CUDA if available; ``backend``/``overrides``/``cuda_graphs``/
    ``act_mode`` default to what the artifact was compiled with. The artifact's MoE tile
    configs (``autotune/moe.json``) serve the returned Runtime only: the user's autotune
    cache is never written. ``tokenizer`` overrides the artifact's own (see ``compile``).
    """
    t0 = time.perf_counter()
    world = parallel.saved_world(directory)
    if world is None:
        cfg, graph, options, weights, tuning, tok = artifact.read_artifact(directory)
    else:  # a tensor-parallel artifact: this rank reads its own directory
        device = resolve_device(device) if device is not None else parallel.default_device()
        rank, _ = parallel.setup(world, device, what=f"{directory}: saved for tensor_parallel")
        parallel.check_complete(directory, world)  # the same error on every rank
        mine = parallel.rank_dir(directory, rank, world)

        def read():
            parts = artifact.read_artifact(mine)
            parallel.check_share(parts[1], world, rank, mine)
            return parts
        cfg, graph, options, weights, tuning, tok = parallel.together(
            f"loading {directory}", read)
        parallel.agree("the artifact's model and options", (cfg.to_dict(), vars(options)))
    if tokenizer is not None:
        tok = resolve_tokenizer(None, tokenizer, cfg.vocab_size)
    if backend is not None:
        options.backend = backend
    if overrides is not None:
        options.overrides = dict(overrides)
    if cuda_graphs is not None:
        options.cuda_graphs = cuda_graphs
    if act_mode is not None:
        options.act_mode = act_mode
    device = resolve_device(device)
    moved: dict[int, torch.Tensor] = {}  # keep aliases aliased on the device
    # Fresh, aligned copies: kernels (and BLAS) may pick different paths for the unaligned
    # views safetensors returns, which would change results in the last bits.
    weights = {k: moved.setdefault(id(v), v.to(device, copy=True)) for k, v in weights.items()}
    return build_runtime(graph, cfg, weights, device, options.validate(cfg),
                         timings={"load_s": time.perf_counter() - t0}, tuning=tuning,
                         tokenizer=tok)
