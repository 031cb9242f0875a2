"""Lazy-depth ACT (act_mode "lazy"/"reuse", mythos_rt.depth) against the eager reference.

Models are fresh random ones with the halting head calibrated so positions halt at
spread-out loops and some never (``spread_act_halting``); ``n_loops`` exceeds
``max_loop_iters`` so depth extrapolation is covered, and ``chunk`` is smaller than the
prompts so passes cross chunk boundaries.
"""

import pytest
import torch

import mythos_rt
from mythos_rt.config import MythosConfig
from mythos_rt.errors import InputError
from mythos_rt.reference import OpenMythos
from mythos_rt.testing import (TOL_FP32_INTERPRET, TOL_FP32_TORCH, assert_rel_close,
                               halting_loops, rel_err, spread_act_halting)

TOL = {"torch": TOL_FP32_TORCH, "cpu": TOL_FP32_TORCH, "triton": TOL_FP32_INTERPRET}


def _model(preset: str, ids: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    model = OpenMythos(MythosConfig.from_preset(preset)).eval()
    spread_act_halting(model, ids, seed=seed)
    return model


def _suffix_max(k: list[int]) -> list[int]:
    out, m = [], 0
    for x in reversed(k):
        m = max(m, x)
        out.append(m)
    return out[::-1]


def _check_generate(rt, model, prompts, new, n_loops, tol):
    """Greedy ids equal the reference's and every step's logits match it (teacher-forced)."""
    ragged = isinstance(prompts, list)
    rows = prompts if ragged else list(prompts)
    for b, p in enumerate(rows):
        out, logits = rt.generate(p[None], new, n_loops=n_loops, return_logits=True)
        assert torch.equal(out[0], model.generate(p[None], new, n_loops=n_loops,
                                                  temperature=0.0)[0]), f"row {b} ids"
        with torch.no_grad():
            ref = model(out[:, :-1], n_loops=n_loops)[:, p.numel() - 1:]
        assert_rel_close(logits, ref, tol, f"row {b} per-step logits")
    if ragged:  # the batch together equals each row alone
        outs = rt.generate(rows, new, n_loops=n_loops)
        for b, p in enumerate(rows):
            assert torch.equal(outs[b], model.generate(p[None], new, n_loops=n_loops,
                                                       temperature=0.0)[0]), f"ragged row {b}"


@pytest.mark.parametrize("preset", ["tiny_mla", "tiny_gqa"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lazy_is_exact(preset, backend):
    ids = torch.randint(0, 97, (3, 9))
    model = _model(preset, ids)
    n = model.cfg.max_loop_iters + 1
    loops = halting_loops(model, ids, n)
    assert (loops == 0).any() and len(set(loops.flatten().tolist())) >= 3, loops
    rt = mythos_rt.compile(model, backend=backend, max_batch_size=3, chunk=4, max_loops=n,
                           act_mode="lazy")
    with torch.no_grad():
        assert_rel_close(rt.forward(ids, n_loops=n), model(ids, n_loops=n), TOL[backend])
    assert rt.last_stats["block_evals"] <= rt.last_stats["eager_block_evals"]
    _check_generate(rt, model, [ids[0, :3], ids[1], ids[2, :6]], 4, n, TOL[backend])


@pytest.mark.parametrize("preset, seed, backend", [
    ("tiny_mla", 0, "torch"), ("tiny_gqa", 3, "torch"), ("tiny_mla", 0, "cpu"),
    ("tiny_gqa", 3, "cpu"), ("tiny_mla", 0, "triton")])
def test_passes_span_only_the_rows_with_work(preset, seed, backend, monkeypatch):
    """A gathered pass covers the batch rows from its first to its last with work (a row
    catching up alone runs alone, at its own cache rows): a ragged batch's logits equal
    each row's alone, and such narrower passes occur (Triton: under the interpreter)."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (4, 9))
    model = _model(preset, ids, seed)  # seeds whose halting makes narrower passes
    n = model.cfg.max_loop_iters + 1
    rt = mythos_rt.compile(model, backend=backend, max_batch_size=4, chunk=4, max_loops=n,
                           act_mode="lazy")
    spans = []
    piece = mythos_rt.depth._piece

    def recording(st, lo, n, k, W, lens, T, spare, row0=0):
        spans.append((row0, len(lo)))
        return piece(st, lo, n, k, W, lens, T, spare, row0)
    monkeypatch.setattr(mythos_rt.depth, "_piece", recording)
    rows = [ids[0, :5], ids[1], ids[2, :2], ids[3, :7]]
    out, logits = rt.generate(rows, 3, n_loops=n, return_logits=True)
    assert any(row0 > 0 or B < 4 for row0, B in spans), spans
    for b, p in enumerate(rows):
        alone, ref = rt.generate(p[None], 3, n_loops=n, return_logits=True)
        assert torch.equal(out[b], alone[0]), f"row {b} ids"
        assert_rel_close(logits[b], ref[0], TOL[backend], f"row {b} logits")


@pytest.mark.parametrize("preset", ["tiny_mla", "tiny_gqa"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("window", [2, 4])
def test_device_resident_decode_is_exact(preset, backend, window):
    """Decode passes decided on the device (``lazy_window``), narrow enough that rows
    reach the bound and are caught up (forced) several times, ragged."""
    ids = torch.randint(0, 97, (3, 9))
    model = _model(preset, ids, seed=4)
    n = model.cfg.max_loop_iters + 1
    rt = mythos_rt.compile(model, backend=backend, max_batch_size=3, chunk=4, max_loops=n,
                           act_mode="lazy", lazy_window=window)
    _check_generate(rt, model, [ids[0, :3], ids[1], ids[2, :6]], 7, n, TOL[backend])
    s = rt.last_stats
    assert s["block_evals"] <= s["eager_block_evals"] and s["positions"] == 3 + 9 + 6 + 3 * 6
    assert sum(s["halt_histogram"]) == s["positions"]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_a_pass_with_no_real_row_skips_the_moe(backend, monkeypatch):
    """One row, device-resident: once its new token halts, the step's later loops have
    no real row; those passes set ``skip`` (the MoE returns zeros without reading an
    expert; Triton: its kernels read the flag) and the result stays exact."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(100)  # a prompt whose generated tokens halt early
    ids = torch.randint(0, 97, (1, 6))
    model = _model("tiny_mla", ids, seed=0)
    n = model.cfg.max_loop_iters + 1
    rt = mythos_rt.compile(model, backend=backend, max_batch_size=1, chunk=4, max_loops=n,
                           act_mode="lazy", lazy_window=4)
    with rt.observe(_SkipFlags(rt)) as flags:
        _check_generate(rt, model, ids, 8, n, TOL[backend])
    assert set(flags.seen) == {0, 1}
    assert rt.last_stats["empty_passes"] == flags.seen.count(1)  # the counter agrees


class _SkipFlags:
    """The ``skip`` flag each device-resident pass ran with (read after its window step)."""

    def __init__(self, rt):
        self.depth, self.seen = rt._low.buffers.depth, []

    def on_step_start(self, step, shape):
        pass

    def on_step_end(self, step, shape):
        if step.name.startswith("depth_window"):
            self.seen.append(int(self.depth.skip[0]))


def test_device_resident_decode_reads_nothing_on_the_host(monkeypatch):
    """The depth steps of a decode step (window, gather, scatter, start, finish) never
    read a device value on the host: what lets a CUDA graph capture them."""
    ids = torch.randint(0, 97, (2, 5))
    model = _model("tiny_mla", ids, seed=5)
    n = model.cfg.max_loop_iters
    rt = mythos_rt.compile(model, backend="torch", max_batch_size=2, chunk=4, max_loops=n,
                           act_mode="lazy", lazy_window=4)
    checked = []

    def forbidden(*args, **kwargs):
        raise AssertionError("a host read in a device-resident depth step")

    class NoHostReads:
        decoding = False

        def on_step_start(self, step, shape):
            if step.name == "depth_start":
                self.decoding = shape.T == 1
            if self.decoding and step.name.startswith("depth_"):
                checked.append(step.name)
                for name in ("tolist", "item", "__bool__", "__int__", "__index__"):
                    monkeypatch.setattr(torch.Tensor, name, forbidden)

        def on_step_end(self, step, shape):
            monkeypatch.undo()
    with rt.observe(NoHostReads()):
        out = rt.generate(ids, 4, n_loops=n)
    assert torch.equal(out, model.generate(ids, 4, n_loops=n, temperature=0.0))
    assert {"depth_start", "depth_window[t=0]", "depth_gather[t=0]", "depth_scatter[t=0]",
            "depth_finish"} <= set(checked)


@pytest.mark.parametrize("window", [0, 3])
def test_lazy_is_exact_on_triton_interpreted(monkeypatch, window):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ids = torch.randint(0, 97, (2, 6))
    model = _model("tiny_mla", ids, seed=1)
    n = model.cfg.max_loop_iters + 1
    rt = mythos_rt.compile(model, backend="triton", max_batch_size=2, chunk=4, max_loops=n,
                           act_mode="lazy", lazy_window=window)
    assert set(rt.backends.values()) == {"triton"}
    out, logits = rt.generate([ids[0, :3], ids[1]], 2, n_loops=n, return_logits=True)
    for b, p in enumerate([ids[0, :3], ids[1]]):
        assert torch.equal(out[b], model.generate(p[None], 2, n_loops=n, temperature=0.0)[0])
        with torch.no_grad():
            ref = model(out[b][None, :-1], n_loops=n)[:, p.numel() - 1:]
        assert_rel_close(logits[b:b + 1], ref, TOL_FP32_INTERPRET, f"row {b}")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny_mla", "tiny_gqa"])
@pytest.mark.parametrize("mode", ["lazy", "reuse"])
def test_lazy_depth_on_cuda(preset, mode):
    """The CUDA device's default backends (Triton, CUDA kernels) in float32: lazy equals the
    reference; reuse runs and counts what it copied."""
    ids = torch.randint(0, 97, (3, 9))
    model = _model(preset, ids)
    n = model.cfg.max_loop_iters + 1
    rt = mythos_rt.compile(model.cuda(), device="cuda", dtype="float32", max_batch_size=3,
                           chunk=4, max_loops=n, act_mode=mode)
    ids = ids.cuda()
    logits = rt.forward(ids, n_loops=n)
    if mode == "reuse":
        assert torch.isfinite(logits).all()
        assert rt.last_stats["reused_entries"] >= 0
        return
    with torch.no_grad():
        assert_rel_close(logits, model(ids, n_loops=n), TOL_FP32_TORCH)
    _check_generate(rt, model, [ids[0, :3], ids[1], ids[2, :6]], 4, n, TOL_FP32_TORCH)
    # lazy decode steps are device-resident by default on CUDA: captured, not eager
    assert rt.use_cuda_graphs and rt.graphs.captured and not rt.graphs.fallbacks, \
        rt.graphs.fallbacks


@pytest.mark.parametrize("window", [0, 16])
def test_counters_follow_the_halting_depths(window):
    """Each (position, loop) runs at most once, so the lazy runtime evaluates exactly
    every position's final depth: the deepest halting loop at or after it (also with
    device-resident decode passes wider than the sequence: nothing is forced)."""
    ids = torch.randint(0, 97, (1, 7))
    model = _model("tiny_mla", ids, seed=2)
    n = model.cfg.max_loop_iters + 1
    rt = mythos_rt.compile(model, backend="torch", max_batch_size=1, chunk=16, max_loops=n,
                           act_mode="lazy", lazy_window=window)
    out = rt.generate(ids, 6, n_loops=n)
    stats = rt.last_stats
    k = [n if x == 0 else x for x in halting_loops(model, out[:, :-1], n)[0].tolist()]
    P = ids.shape[1]
    final = _suffix_max(k)
    in_own_pass = _suffix_max(k[:P]) + k[P:]  # prompt: one chunk; then one token per step
    assert stats["positions"] == len(k) and stats["n_loops"] == n
    assert stats["eager_block_evals"] == n * len(k)
    assert stats["block_evals"] == sum(final)
    assert stats["catchup_evals"] == sum(final) - sum(in_own_pass)
    # one chunk for the prompt, then 5 decode steps: eager runs one pass per loop of each;
    # lazy at most that (a loop with nothing to run is skipped; device-resident steps run
    # every loop), and its passes' rows cover the evaluations, padding included
    assert stats["eager_passes"] == 6 * n
    assert stats["passes"] <= stats["eager_passes"] and stats["pass_rows"] >= stats["block_evals"]
    if window:  # every decode step: n passes of `window` rows
        assert stats["passes"] >= 5 * n and stats["pass_rows"] >= 5 * n * window
    hist = stats["halt_histogram"]
    assert sum(hist) == len(k) and hist[0] == sum(x == 0 for x in
                                                 halting_loops(model, out[:, :-1], n)[0].tolist())


def test_all_halt_at_once_or_never():
    ids = torch.randint(0, 97, (2, 5))
    model = _model("tiny_gqa", ids)
    n = 4
    for bias, depth in ((30.0, 1), (-30.0, n)):
        model.recurrent.act.halt.bias.data.fill_(bias)
        rt = mythos_rt.compile(model, backend="torch", max_batch_size=2, chunk=4, max_loops=n,
                               act_mode="lazy")
        out = rt.generate(ids, 3, n_loops=n)
        assert torch.equal(out, model.generate(ids, 3, n_loops=n, temperature=0.0))
        s = rt.last_stats
        assert s["block_evals"] == depth * s["positions"] and s["catchup_evals"] == 0
        assert s["halt_histogram"][0 if depth == n else depth] == s["positions"]


def test_sequence_up_to_max_seq_len():
    ids = torch.randint(0, 97, (2, 10))
    model = _model("tiny_mla", ids, seed=3)
    n = model.cfg.max_loop_iters
    kw = dict(backend="cpu", max_batch_size=2, chunk=4, max_loops=n, max_seq_len=16)
    lazy = mythos_rt.compile(model, act_mode="lazy", **kw)
    eager = mythos_rt.compile(model, **kw)
    a, la = lazy.generate(ids, 7, n_loops=n, return_logits=True)  # 10 + 7 - 1 = 16 slots
    b, lb = eager.generate(ids, 7, n_loops=n, return_logits=True)
    assert torch.equal(a, b)
    assert_rel_close(la, lb, TOL_FP32_TORCH)


def test_reuse_is_reported_not_exact():
    ids = torch.randint(0, 97, (1, 8))
    model = _model("tiny_mla", ids)
    n = model.cfg.max_loop_iters + 1
    kw = dict(backend="torch", max_batch_size=1, chunk=4, max_loops=n)
    exact, reuse = mythos_rt.compile(model, **kw), mythos_rt.compile(model, act_mode="reuse", **kw)
    _, le = exact.generate(ids, 6, n_loops=n, return_logits=True)
    _, lr = reuse.generate(ids, 6, n_loops=n, return_logits=True)
    s = reuse.last_stats
    assert s["catchup_evals"] == 0 and s["reused_entries"] > 0
    assert s["block_evals"] < s["eager_block_evals"]
    print(f"reuse: logit deviation {rel_err(lr, le):.3e} relative to exact")
    assert torch.isfinite(lr).all()


def test_options_artifacts_and_graphs(tmp_path):
    ids = torch.randint(0, 97, (1, 5))
    model = _model("tiny_gqa", ids)
    with pytest.raises(InputError, match="act_mode must be one of eager, lazy, reuse, got 'fast'"):
        mythos_rt.compile(model, backend="torch", act_mode="fast")
    for bad in (-1, True, 1.5, 300):
        with pytest.raises(InputError, match="lazy_window must be None or an integer in"):
            mythos_rt.compile(model, backend="torch", act_mode="lazy", lazy_window=bad)
    rt = mythos_rt.compile(model, backend="torch", max_batch_size=1, act_mode="lazy")
    assert rt.act_mode == "lazy" and not rt.use_cuda_graphs
    rt.use_cuda_graphs = True
    assert not rt.use_cuda_graphs  # lazy depth decides its work on the host
    rt.save(tmp_path / "art")
    assert mythos_rt.load(tmp_path / "art").act_mode == "lazy"
    eager = mythos_rt.load(tmp_path / "art", act_mode="eager")
    assert eager.act_mode == "eager"
    out = eager.generate(ids, 3, n_loops=3)
    assert eager.last_stats["block_evals"] == eager.last_stats["eager_block_evals"] == 3 * 7
    assert eager.last_stats["passes"] == eager.last_stats["eager_passes"] == 3 * 3
    assert eager.last_stats["pass_rows"] == 3 * 7
    assert eager.last_stats["halt_histogram"] is None
    assert torch.equal(out, rt.generate(ids, 3, n_loops=3))


def test_observer_sees_every_inner_step():
    ids = torch.randint(0, 97, (1, 6))
    model = _model("tiny_mla", ids)
    rt = mythos_rt.compile(model, backend="torch", max_batch_size=1, act_mode="lazy")
    seen = []

    class Observer:
        def on_step_start(self, step, shape):
            seen.append((step.name, shape))

        def on_step_end(self, step, shape):
            pass
    with rt.observe(Observer()):
        rt.forward(ids, n_loops=3)
    names = [n for n, _ in seen]
    assert "depth_start" in names and "loop_epilogue[t=0]" in names
    assert not any(n.startswith("loop[") for n in names)  # the region itself is expanded
