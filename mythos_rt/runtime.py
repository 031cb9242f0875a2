"""Runtime: a compiled OpenMythos model — ``mythos_rt.compile(...)`` returns one.

A Runtime runs the plans of one lowering: prefill in chunks of at most ``chunk`` tokens
per row (chunked prefill is exact: causal offsets come from the cache lengths), and
decode one token per step against per-layer / per-loop KV caches. Building one
(trace → passes → lower, or from an artifact) is ``mythos_rt.compiler``'s job.

One request at a time: the KV caches and buffers are the Runtime's, so ``forward``,
``generate`` and ``stream`` hold the runtime for their whole run. Calls from several
threads are serialized (each waits for the one running); a ``stream()`` holds it from
its first step until it is exhausted or closed. A second request started on the thread
that holds a live stream (e.g. two interleaved streams) would wait for itself, so it is
an InputError instead. Use one Runtime per concurrent request stream to run in parallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Protocol, Sequence, Union

import torch

from . import parallel
from .config import MythosConfig
from .depth import COUNTED
from .errors import InputError, clip
from .graphs import DecodeGraphs
from .ir import Graph
from .lower import Lowered, Shape, Step
from .ops.recurrent import ACTState
from .options import CompileOptions, dtype_name
from .sampling import Sampler, SamplingParams
from .text import TextStream, encode_prompts
from .tokenizer import Tokenizer, TokenizerError


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_text(prompts: Any) -> bool:
    """A str, or a non-empty list/tuple of str: text prompts."""
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                        and all(isinstance(p, str) for p in prompts))


def _emit(pieces: list[str], single: bool) -> Iterator:
    """What a text stream yields for one step: the row's piece (when non-empty) for one
    prompt, else the list of pieces (when any is non-empty)."""
    if single:
        if pieces[0]:
            yield pieces[0]
    elif any(pieces):
        yield pieces


class StepObserver(Protocol):
    """Called around every plan step while installed with ``Runtime.observe`` (profiling)."""

    def on_step_start(self, step: Step, shape: Shape) -> None: ...

    def on_step_end(self, step: Step, shape: Shape) -> None: ...


class Runtime:
    """A compiled model: ``forward`` (stateless) and ``generate`` (KV-cached decode)."""

    def __init__(self, lowered: Lowered, options: CompileOptions, *,
                 traced: Optional[Graph] = None, timings: Optional[dict[str, float]] = None,
                 tuning: Optional[Mapping[str, dict]] = None,
                 tokenizer: Optional[Tokenizer] = None):
        self._low = lowered
        self.tokenizer = tokenizer  # text <-> ids for str prompts (None: ids only)
        self.options = options
        self.config: MythosConfig = lowered.cfg
        self.device: torch.device = lowered.device
        self.dtype: torch.dtype = lowered.dtype
        self.graph: Graph = lowered.graph
        self.traced_graph = traced
        self.max_batch_size = lowered.max_batch
        self.max_seq_len = options.max_seq_len
        self.max_loops = lowered.max_loops
        self.timings = dict(timings or {})
        self._plans: dict[int, list[Step]] = {}
        self._observer: Optional[StepObserver] = None
        self._lock = threading.Lock()  # one request at a time (see the module docstring)
        self._owner: Optional[int] = None  # thread id holding the lock
        # MoE tile configs of the artifact this runtime was loaded from (its own, never the
        # user's autotune cache's): the Triton MoE looks them up first.
        self.tuning: dict[str, dict] = dict(tuning or {})
        # Workspaces that look tile configs up (the Triton MoE's) read this runtime's table.
        self._tuned_workspaces = [ws for ws in lowered.buffers.workspaces.values()
                                  if hasattr(ws, "tuned")]
        for ws in self._tuned_workspaces:
            ws.tuned = self.tuning
        buf = lowered.buffers
        self._stats: dict = {}
        self.graphs = DecodeGraphs(
            lambda B, n: self._execute(Shape(B, 1), n), self.device, self.max_batch_size,
            buf.cache_lens, buf.input_ids, static=[buf.cache_lens, buf.input_ids,
                                                   buf.arena["logits"]],
            enabled=options.cuda_graphs and self._capturable, debug=options.debug)

    @property
    def use_cuda_graphs(self) -> bool:
        """Whether decode steps are captured/replayed as CUDA graphs (settable; always off
        when lazy depth decides its decode passes on the host, ``lazy_window=0``)."""
        return self.graphs.enabled

    @use_cuda_graphs.setter
    def use_cuda_graphs(self, on: bool) -> None:
        self.graphs.set_enabled(on and self._capturable)

    @property
    def _capturable(self) -> bool:
        depth = self._low.buffers.depth
        return depth is None or depth.window > 0

    @property
    def act_mode(self) -> str:
        """How the loop treats halted positions: "eager", "lazy" or "reuse"."""
        return self.options.act_mode

    @property
    def last_stats(self) -> dict:
        """Work counters of the last ``forward``/``generate``/``stream``:

        * ``block_evals``: (position, loop) evaluations of the looped block that ran;
        * ``eager_block_evals``: what every depth for every position would have run;
        * ``catchup_evals``: evaluations of earlier positions' deferred loops (lazy);
        * ``reused_entries``: (position, loop) cache entries copied instead (reuse);
        * ``positions``: tokens that ran the loop; ``n_loops``; ``act_mode``;
        * ``passes`` / ``eager_passes``: passes of the looped block that ran (each reads
          every weight the pass's tokens need) and what eager depth would have run (one
          per loop per chunk); ``pass_rows``: the (position, loop) rows those passes
          computed, padding included (``pass_rows - block_evals`` is padding);
          ``empty_passes``: device-resident passes with no real row, whose MoE read no
          expert (``lazy_window``; docs/adaptive-depth.md);
        * ``halt_histogram``: positions by the loop (1-based) at which ACT halted them,
          index 0 = never halted (lazy and reuse only; None under eager).
        """
        st = self._low.buffers.depth
        stats = st.collect_stats() if st is not None else dict(self._stats)
        if st is None:
            stats["halt_histogram"] = None
        stats["act_mode"] = self.act_mode
        stats["n_loops"] = self._stats.get("n_loops")
        return stats

    # ---- introspection --------------------------------------------------------------------
    @property
    def backends(self) -> dict[str, str]:
        """Registry op → backend that runs it."""
        return {name: sel.backend for name, sel in sorted(self._low.impls.items())}

    def __repr__(self) -> str:
        ops = ", ".join(f"{k}={v}" for k, v in self.backends.items())
        kernels = ""
        if "cpu" in self.backends.values():
            from .cpu import native
            kernels = f"; cpu row kernels: {native.describe()}"
        return (f"Runtime({self.config.attn_type}, dim={self.config.dim}, "
                f"device={self.device}, dtype={dtype_name(self.dtype)}, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"max_loops={self.max_loops}, ops: {ops}{kernels})")

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """Every tensor the plans read, by IR weight name (packed and derived ones included)."""
        return self._low.weights

    @property
    def chunk(self) -> int:
        """Prefill tokens per row per plan execution."""
        return self._low.chunk

    @property
    def act_state(self) -> ACTState:
        """The loop's ACT buffers (cumulative halting probability, halted flags) of the
        last plan execution's rows."""
        return self._low.buffers.act

    def save(self, directory: Union[str, os.PathLike], *, overwrite: bool = False) -> str:
        """Write a runtime artifact (packed weights, optimized IR, config, options, the
        MoE tile configs this runtime uses and its tokenizer) that ``mythos_rt.load`` restores without
        tracing or packing.

        The artifact is written beside ``directory`` and swapped in whole: an interrupted
        save leaves the old artifact or the new one. ``directory`` may be new, empty or an
        artifact; any other non-empty directory is refused (InputError) unless
        ``overwrite`` (the artifact's files are then written into it, others kept).
        A tensor-parallel runtime is saved by every rank, each into ``rank{r}of{N}/``.
        """
        from .artifact import write_artifact

        def write(target) -> Path:
            return write_artifact(target, self.weights, self.graph, self.config,
                                  self.options, tuning=self.tuning_used(),
                                  tokenizer=self.tokenizer, overwrite=overwrite)
        sharding = self.graph.attrs.get("parallel")
        if sharding is None:
            return str(write(directory))
        return str(self._save_shares(Path(directory).absolute(), sharding, overwrite, write))

    @staticmethod
    def _save_shares(directory: Path, sharding: dict, overwrite: bool, write) -> Path:
        """Every rank writes its share into ``directory/rank{r}of{N}/``. Another world
        size's shares there are refused, or replaced with ``overwrite`` (left beside the
        new ones they would make the directory unloadable)."""
        world, rank = sharding["world_size"], sharding["rank"]
        parallel.agree("the artifact directory", str(directory))
        old = parallel.together("checking the artifact directory",
                                lambda: parallel.saved_world(directory))
        if old not in (None, world) and not overwrite:
            raise InputError(f"{directory} holds an artifact saved for tensor_parallel={old}; "
                             "choose another directory, or pass overwrite=True (CLI: --force) "
                             "to replace it")
        parallel.together("saving the artifact",
                          lambda: write(parallel.rank_dir(directory, rank, world)))
        if old not in (None, world):
            def remove_old() -> None:
                for r in range(old if rank == 0 else 0):
                    shutil.rmtree(parallel.rank_dir(directory, r, old), ignore_errors=True)
            parallel.together("removing the replaced artifact", remove_old)
        return directory

    def tuning_used(self) -> dict[str, dict]:
        """The MoE tile configs this runtime's Triton MoE finds for its token buckets: its
        own (``tuning``), else the autotune cache's valid entries; {} on other backends."""
        if not self._tuned_workspaces:
            return {}
        ws = self._tuned_workspaces[0]
        import json

        from .ops.moe import PackedMoE
        from .triton_kernels import moe as tmoe
        from .tuning import valid_entries
        try:
            with open(tmoe.cache_path(), "rb") as f:
                cached = valid_entries(json.loads(f.read()))
        except (OSError, ValueError):
            cached = {}
        packed = next(a for a in self._low.args.values() if isinstance(a, PackedMoE))
        used = {}
        for i in range(tmoe.token_bucket(ws.max_tokens).bit_length()):
            key = tmoe.config_key(1 << i, packed, self.dtype, self.device)
            entry = self.tuning.get(key, cached.get(key))
            if entry is not None:
                used[key] = entry
        return used

    def plan(self, n_loops: int) -> list[Step]:
        if n_loops not in self._plans:
            self._plans[n_loops] = self._low.plan(n_loops)
        return self._plans[n_loops]

    # ---- input checks -----------------------------------------------------------------------
    def _check_prompts(self, input_ids: Any) -> tuple[list[torch.Tensor], bool]:
        """Return the prompts as 1-D int64 device tensors and whether the input was ragged."""
        if isinstance(input_ids, (list, tuple)):
            if not input_ids:
                raise InputError("input_ids is an empty list")
            if all(_is_int(x) for x in input_ids):
                input_ids = self._ids_tensor(input_ids, "input_ids")[None]
            else:
                rows = []
                for i, row in enumerate(input_ids):
                    row = self._ids_tensor(row, f"input_ids[{i}]")
                    if row.dim() != 1 or row.numel() == 0:
                        raise InputError(f"input_ids[{i}] must be a non-empty 1-D sequence of "
                                         f"token ids, got shape {tuple(row.shape)}")
                    rows.append(self._check_ids(row[None], what=f"input_ids[{i}]")[0])
                if len(rows) > self.max_batch_size:
                    raise InputError(f"batch size {len(rows)} exceeds max_batch_size="
                                     f"{self.max_batch_size} (recompile with a larger max_batch_size)")
                return rows, True
        ids = self._check_ids(input_ids)
        return list(ids), False

    def _ids_tensor(self, ids: Any, what: str) -> torch.Tensor:
        """A tensor as given, or a list/tuple of int token ids (checked against the
        vocabulary here: ids past int64 cannot become a tensor)."""
        if isinstance(ids, torch.Tensor):
            return ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise InputError(f"{what} must be an integer tensor or a list of int token ids, "
                             f"got {clip(repr(ids))}")
        bad = next((t for t in ids if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise InputError(f"token id {clip(repr(bad))} in {what} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return torch.tensor(list(ids), dtype=torch.long)

    def _check_ids(self, input_ids: Any, what: str = "input_ids") -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise InputError(f"{what} must be a torch.Tensor (or a list of 1-D sequences) of "
                             f"token ids, got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2:
            raise InputError(f"{what} must have shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"{what} must be an integer tensor, got {input_ids.dtype}")
        B, T = input_ids.shape
        if B < 1 or T < 1:
            raise InputError(f"{what} is empty: shape {tuple(input_ids.shape)}")
        if B > self.max_batch_size:
            raise InputError(f"batch size {B} exceeds max_batch_size={self.max_batch_size} "
                             "(recompile with a larger max_batch_size)")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} in {what} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        return input_ids.to(device=self.device, dtype=torch.long)

    def _check_loops(self, n_loops: Optional[int]) -> int:
        n = self.config.max_loop_iters if n_loops is None else n_loops
        if not _is_int(n) or n < 1:
            raise InputError(f"n_loops must be an integer >= 1, got {n_loops!r}")
        if n > self.max_loops:
            raise InputError(f"n_loops={n} exceeds the compiled max_loops={self.max_loops} "
                             "(recompile with max_loops >= n_loops)")
        return n

    def _check_sampling(self, max_new_tokens, longest: int) -> None:
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        # The last sampled token is never fed back: P + N tokens take P + N - 1 cache slots.
        slots = longest + max(max_new_tokens, 1) - 1
        if slots > self.max_seq_len:
            raise InputError(f"prompt length {longest} + max_new_tokens {max_new_tokens} needs "
                             f"{slots} cache positions (the last new token is not cached), which "
                             f"exceeds max_seq_len={self.max_seq_len}")

    # ---- execution --------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(self, observer: StepObserver) -> Iterator[StepObserver]:
        """Call ``observer.on_step_start/on_step_end(step, shape)`` around every plan step
        run inside the block.

        A replayed CUDA graph runs no Python per step, so decode steps run eagerly while
        an observer is installed; without one nothing is added to a step's cost and
        graph capture is untouched.
        """
        if self._observer is not None:
            raise InputError("a step observer is already installed on this Runtime")
        graphs_were = self.use_cuda_graphs
        self.use_cuda_graphs = False
        self._observer = observer
        try:
            yield observer
        finally:
            self._observer = None
            self.use_cuda_graphs = graphs_were

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Hold the runtime for one request (see the module docstring)."""
        if self._owner == threading.get_ident():
            raise InputError(f"{what}: this thread is running a stream() on this Runtime that "
                             "is not exhausted or closed; a Runtime runs one request at a time "
                             "(finish or close() the stream first, or use another Runtime)")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def _execute(self, shape: Shape, n_loops: int) -> None:
        observer = self._observer
        if observer is None:
            for step in self.plan(n_loops):
                step.run(shape)
            return
        for step in self.plan(n_loops):
            inner = [(step, shape)] if step.expand is None else step.expand(shape)
            for sub, sub_shape in inner:
                observer.on_step_start(sub, sub_shape)
                sub.run(sub_shape)
                observer.on_step_end(sub, sub_shape)

    def _start_request(self, n_loops: int) -> None:
        """Zero the work counters (``last_stats``) for a request of ``n_loops`` loops."""
        self._stats = {**dict.fromkeys(COUNTED, 0), "reused_entries": 0, "n_loops": n_loops}
        if self._low.buffers.depth is not None:
            self._low.buffers.depth.reset_stats(n_loops)

    def _run_chunk(self, ids: torch.Tensor, n_loops: int,
                   valid: Optional[list[int]] = None) -> torch.Tensor:
        """Run one chunk (B, T) at the current cache lengths; return logits (B, T, V) view.
        ``valid``: real tokens per row (prefill pads ragged rows; default all T).

        Inference mode: no autograd bookkeeping on the plan's views and in-place updates,
        which is a large share of a CPU decode step's cost.
        """
        B, T = ids.shape
        real = B * T if valid is None else sum(valid)
        depth = self._low.buffers.depth
        if depth is None:
            for key, n in (("block_evals", real * n_loops), ("eager_block_evals", real * n_loops),
                           ("positions", real), ("passes", n_loops), ("eager_passes", n_loops),
                           ("pass_rows", B * T * n_loops)):
                self._stats[key] = self._stats.get(key, 0) + n
        with torch.inference_mode():
            if depth is not None:
                if valid is None:
                    depth.chunk_valid[:B].fill_(T)
                else:
                    depth.chunk_valid[:B].copy_(torch.tensor(valid, dtype=torch.int32))
                depth.chunk_valid[B:].zero_()  # rows a CUDA graph's batch bucket pads
            self._low.buffers.input_ids[:B * T].copy_(ids.reshape(-1))
            if T == 1:
                self.graphs.step(B, n_loops)
            else:
                self._execute(Shape(B, T), n_loops)
            return self._low.buffers.arena["logits"][:B * T].view(B, T, -1)

    def _prefill(self, prompts: list[torch.Tensor], n_loops: int, want_all: bool):
        """Prefill right-padded prompts in chunks; return last-token logits (B, V) or all.

        Padding only follows a row's real tokens: causal attention keeps real queries off
        it, and each row's cache length is set to its real length afterwards, so decode
        overwrites the padded cache slots.
        """
        B = len(prompts)
        lens = [int(p.numel()) for p in prompts]
        T = max(lens)
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, :lens[b]] = p
        buffers = self._low.buffers
        buffers.cache_lens.zero_()
        self._start_request(n_loops)
        chunk = self._low.chunk
        outs, last = [], torch.empty(B, self.config.vocab_size, dtype=self.dtype, device=self.device)
        for start in range(0, T, chunk):
            piece = ids[:, start:start + chunk]
            valid = [min(max(n - start, 0), piece.shape[1]) for n in lens]
            logits = self._run_chunk(piece, n_loops, valid)
            if want_all:
                outs.append(logits.clone())
            for b, n in enumerate(lens):
                if start <= n - 1 < start + chunk:
                    last[b] = logits[b, n - 1 - start]
        buffers.cache_lens[:B] = torch.tensor(lens, dtype=torch.int32, device=self.device)
        return torch.cat(outs, dim=1) if want_all else last

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, n_loops: Optional[int] = None) -> torch.Tensor:
        """Stateless forward: logits (B, T, vocab), as the reference's forward without cache."""
        ids = self._check_ids(input_ids)
        n = self._check_loops(n_loops)
        if ids.shape[1] > self.max_seq_len:
            raise InputError(f"sequence length {ids.shape[1]} exceeds max_seq_len="
                             f"{self.max_seq_len}")
        with self._exclusive("forward"):
            return self._prefill(list(ids), n, want_all=True)

    __call__ = forward

    def stream(self, input_ids, max_new_tokens: int, *, n_loops: Optional[int] = None,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               seed: Optional[int] = None, stop_ids: Optional[Sequence[int]] = None,
               stop: Sequence[str] = ()) -> Iterator:
        """Yield, after each decode step, one new token id per row (None once a row stopped).

        Text: for a str prompt, yield its text pieces (each valid UTF-8: a character split
        across tokens waits for its last byte); for a list of str prompts, one piece per
        row per step ("" when a row has nothing new). Text ends before the first ``stop``
        string or stop id (default for text: the tokenizer's eos id); see ``generate``.

        Arguments are checked here, before the first step; the runtime is held from the
        first step until the stream is exhausted or closed (see the module docstring).
        """
        if _is_text(input_ids):
            return self._stream_text(input_ids, max_new_tokens, n_loops, temperature, top_k,
                                     top_p, seed, stop_ids, stop)
        self._no_stop_strings(stop)
        stop_ids = () if stop_ids is None else stop_ids
        prompts, _ = self._check_prompts(input_ids)
        request = self._check_request(prompts, max_new_tokens, n_loops, temperature, top_k,
                                      top_p, seed, stop_ids)
        return self._stream_steps(prompts, request)

    @torch.no_grad()
    def _stream_steps(self, prompts: list[torch.Tensor], request: tuple):
        finished = None
        with self._exclusive("stream"):
            for nxt, _, done in self._decode(prompts, *request, want_logits=False):
                ids = nxt.tolist()
                yield [None if (finished is not None and finished[b]) else t
                       for b, t in enumerate(ids)]
                finished = done.tolist() if done is not None else None

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, n_loops: Optional[int] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Optional[int] = None, stop_ids: Optional[Sequence[int]] = None,
                 stop: Sequence[str] = (), return_logits: bool = False):
        """Prefill once, then decode one token per step with the KV caches.

        Text in, text out (needs ``rt.tokenizer``): a str prompt returns the completion's
        text, a list of str prompts a list of texts. Each ends before the first of the
        ``stop`` strings (e.g. ``stop=["\\n\\n"]``) or ``stop_ids`` it produces, neither
        included; ``stop_ids`` defaults to the tokenizer's eos id for text. A model whose
        vocabulary is larger than its tokenizer's draws only ids the tokenizer can decode.

        ``input_ids``: a (B, T) tensor, or a list of 1-D sequences of different lengths
        (ragged batch: each row keeps its own positions and cache length, and equals
        running it alone). Returns ids (B, T + new) for a tensor input — rows that hit a
        stop id are padded with it — or a list of 1-D tensors (prompt + generated, ending
        at the stop id) for a list input; plus per-step logits (B, steps, vocab) when
        ``return_logits``. temperature 0 is greedy; ``seed`` makes sampling reproducible;
        generation ends early once every row produced one of ``stop_ids``.
        """
        if _is_text(input_ids):
            if return_logits is not False:
                raise InputError("return_logits needs token-id prompts, not text")
            return self._generate_text(input_ids, max_new_tokens, n_loops, temperature, top_k,
                                       top_p, seed, stop_ids, stop)
        self._no_stop_strings(stop)
        stop_ids = () if stop_ids is None else stop_ids
        prompts, ragged = self._check_prompts(input_ids)
        request = self._check_request(prompts, max_new_tokens, n_loops, temperature, top_k,
                                      top_p, seed, stop_ids)
        if not isinstance(return_logits, bool):
            raise InputError(f"return_logits must be True or False, got {return_logits!r}")
        steps, logits = [], []
        with self._exclusive("generate"):
            for nxt, lg, _ in self._decode(prompts, *request, want_logits=return_logits):
                steps.append(nxt)
                if return_logits:
                    logits.append(lg)
        B, V = len(prompts), self.config.vocab_size
        new = torch.stack(steps, 1) if steps else torch.empty(B, 0, dtype=torch.long, device=self.device)
        stacked = torch.stack(logits, 1) if logits else torch.empty(B, 0, V, device=self.device)
        if ragged:
            out = []
            stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
            for b, p in enumerate(prompts):
                row = new[b]
                hit = torch.isin(row, stops).nonzero()
                if len(hit):
                    row = row[: int(hit[0]) + 1]
                out.append(torch.cat([p, row]))
        else:
            out = torch.cat([torch.stack(prompts), new], dim=1)
        return (out, stacked) if return_logits else out

    # ---- text ------------------------------------------------------------------------------
    @staticmethod
    def _no_stop_strings(stop) -> None:
        if stop:
            raise InputError(f"stop strings ({clip(repr(stop))}) need text prompts; for token-id "
                             "prompts use stop_ids")

    def _text_request(self, prompts, max_new_tokens, n_loops, temperature, top_k, top_p, seed,
                      stop_ids, stop):
        """Encode text prompts and check the request: (id prompts, request, one TextStream
        per row, single)."""
        tok = self.tokenizer
        if tok is None:
            raise InputError("text prompts need a tokenizer: this runtime has none (compile "
                             "or load with tokenizer=..., CLI --tokenizer), or pass token ids")
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        try:
            encoded, single = encode_prompts(tok, prompts)
            if stop_ids is None:
                stop_ids = () if tok.eos_id is None else (tok.eos_id,)
            streams = [TextStream(tok, stop_strings=stop, stop_ids=stop_ids, context=ids)
                       for ids in encoded]
        except TokenizerError as exc:
            raise InputError(str(exc)) from None
        rows, _ = self._check_prompts(encoded)
        steps, n, params = self._check_request(rows, max_new_tokens, n_loops, temperature,
                                               top_k, top_p, seed, stop_ids)
        if tok.vocab_size < self.config.vocab_size:  # ids the tokenizer has no text for
            params = dataclasses.replace(params, vocab_limit=tok.vocab_size)
        return rows, (steps, n, params), streams, single

    def _stream_text(self, prompts, *args):
        rows, request, streams, single = self._text_request(prompts, *args)
        return self._text_steps(rows, request, streams, single)

    def _text_steps(self, rows, request, streams, single):
        steps = self._stream_steps(rows, request)
        try:
            for ids in steps:
                pieces = [s.push(t) if t is not None else s.finish()
                          for s, t in zip(streams, ids)]
                done = all(s.finished for s in streams)
                if done:  # the last step's held text
                    pieces = [p + s.finish() for p, s in zip(pieces, streams)]
                yield from _emit(pieces, single)
                if done:
                    return
            yield from _emit([s.finish() for s in streams], single)
        finally:
            steps.close()

    def _generate_text(self, prompts, *args):
        rows, request, streams, single = self._text_request(prompts, *args)
        texts = [""] * len(rows)
        for pieces in self._text_steps(rows, request, streams, False):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts[0] if single else texts

    def _check_request(self, prompts: list[torch.Tensor], max_new_tokens, n_loops, temperature,
                       top_k, top_p, seed, stop_ids) -> tuple:
        """Check a generation request's arguments; return them as ``_decode`` takes them."""
        n = self._check_loops(n_loops)
        if seed is None and self.options.tensor_parallel > 1:
            seed = parallel.shared_seed()  # every rank must draw the same tokens
        params = SamplingParams(temperature, top_k, top_p, seed, stop_ids).check_vocab(
            self.config.vocab_size)
        self._check_sampling(max_new_tokens, max(int(p.numel()) for p in prompts))
        return max_new_tokens, n, params

    def _decode(self, prompts: list[torch.Tensor], max_new_tokens, n, params: SamplingParams,
                want_logits):
        """Yield (next ids (B,), logits (B, V) or None, finished (B,) or None) per step.

        ``prompts`` and the rest are checked (``_check_prompts``, ``_check_request``).
        """
        if max_new_tokens == 0:
            return
        B = len(prompts)
        sampler = Sampler(params, B, self.device)
        stops = torch.tensor(params.stop_ids, dtype=torch.long, device=self.device)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device) if len(stops) else None
        logits = self._prefill(prompts, n, want_all=False)
        prev = None
        for i in range(max_new_tokens):
            nxt = sampler(logits)
            if finished is not None:
                if prev is not None:  # a stopped row repeats the stop id it produced
                    nxt = torch.where(finished, prev, nxt)
                finished = finished | torch.isin(nxt, stops)
                prev = nxt
            yield nxt, (logits.float().clone() if want_logits else None), finished
            # One host check per step, only when stop ids were given.
            if i + 1 == max_new_tokens or (finished is not None and bool(finished.all())):
                sampler.check()  # one host read of the non-finite flag per call
                return
            logits = self._run_chunk(nxt[:, None], n)[:, -1]
