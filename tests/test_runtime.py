"""Compiled Runtime vs the eager reference (CPU): torch and interpreted Triton backends."""

import dataclasses

import pytest
import torch

import mythos_rt
from mythos_rt.checkpoint import save_checkpoint
from mythos_rt.config import MythosConfig
from mythos_rt.lower import Shape
from mythos_rt.reference import OpenMythos
from mythos_rt.runtime import InputError
from mythos_rt.testing import (TOL_BF16_E2E, TOL_FP32_INTERPRET, TOL_FP32_TORCH, assert_rel_close,
                               spread_act_halting)

TOL = {"torch": TOL_FP32_TORCH, "cpu": TOL_FP32_TORCH, "triton": TOL_FP32_INTERPRET}

CONFIGS = {
    "mla": lambda: MythosConfig.from_preset("tiny_mla"),
    "gqa": lambda: MythosConfig.from_preset("tiny_gqa"),
    "mla-noshared": lambda: dataclasses.replace(MythosConfig.from_preset("tiny_mla"),
                                                n_shared_experts=0, coda_layers=2),
    # dense hidden 42 (the Triton FFN pads it to 64), latent 40 (Triton decode: tiles 32 + 16)
    "mla-awkward": lambda: dataclasses.replace(MythosConfig.from_preset("tiny_mla"), dim=32,
                                               kv_lora_rank=40),
}


def _model(cfg, ids):
    model = OpenMythos(cfg).eval()
    spread_act_halting(model, ids)
    return model


CASES = ([(name, b) for name in sorted(CONFIGS) for b in ("torch", "cpu")]
         + [("mla", "triton"), ("gqa", "triton"), ("mla-awkward", "triton")])


@pytest.mark.parametrize("name, backend", CASES)
def test_forward_and_decode_match_reference(name, backend):
    cfg = CONFIGS[name]()
    B, T = 3, 6
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    model = _model(cfg, ids)
    # The interpreter runs each launch in Python: fewer loop depths and steps for Triton,
    # and one prefill chunk (chunked prefill is covered with the torch backend).
    interpreted = backend == "triton"
    rt = mythos_rt.compile(model, backend=backend, max_batch_size=4, chunk=8 if interpreted else 4,
                           max_loops=2 * cfg.max_loop_iters)
    assert set(rt.backends.values()) == {backend}
    depths = (1, 2 * cfg.max_loop_iters) if interpreted else (1, cfg.max_loop_iters, 2 * cfg.max_loop_iters)
    for n_loops in depths:
        with torch.no_grad():
            assert_rel_close(rt.forward(ids, n_loops=n_loops), model(ids, n_loops=n_loops),
                             TOL[backend], f"forward n_loops={n_loops}")
    n_loops, new = cfg.max_loop_iters + 1, (2 if interpreted else 3)
    out, logits = rt.generate(ids, new, n_loops=n_loops, return_logits=True)
    assert torch.equal(out, model.generate(ids, new, n_loops=n_loops, temperature=0.0))
    with torch.no_grad():  # every decode step's logits, teacher-forced through the reference
        ref = model(out[:, :-1], n_loops=n_loops)[:, T - 1:]
    assert_rel_close(logits, ref, TOL[backend], "per-step logits")


def test_triton_mla_prefill_in_chunks_matches_reference(monkeypatch):
    """Prefill in chunks of 5 + 5 + 2 on the interpreted Triton backend: tiny_mla's short
    chunks attend in latent space over what the earlier chunks cached."""
    from mythos_rt.triton_kernels import attention as TA
    chosen = []
    rule = TA.latent_prefill_wins
    monkeypatch.setattr(TA, "latent_prefill_wins",
                        lambda T, *dims: chosen.append((T, rule(T, *dims))) or chosen[-1][1])
    cfg = CONFIGS["mla"]()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    model = _model(cfg, ids)
    rt = mythos_rt.compile(model, backend="triton", max_batch_size=2, chunk=5)
    with torch.no_grad():
        assert_rel_close(rt.forward(ids, n_loops=2), model(ids, n_loops=2), TOL_FP32_INTERPRET)
    assert set(chosen) == {(5, True), (2, True)}


def test_checkpoint_path_compiles_and_prefill_chunks_are_exact(tmp_path):
    cfg = MythosConfig.from_preset("tiny_mla")
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    model = _model(cfg, ids)
    save_checkpoint(tmp_path, cfg, model.state_dict())
    one_shot = mythos_rt.compile(tmp_path, backend="torch", chunk=64)
    chunked = mythos_rt.compile(tmp_path, backend="torch", chunk=3)
    a, b = one_shot.forward(ids, n_loops=2), chunked.forward(ids, n_loops=2)
    assert_rel_close(b, a, TOL_FP32_TORCH)
    with torch.no_grad():
        assert_rel_close(a, model(ids, n_loops=2), TOL_FP32_TORCH)


def test_sampling_is_seeded_and_reproducible():
    cfg = MythosConfig.from_preset("tiny_gqa")
    rt = mythos_rt.compile(OpenMythos(cfg), backend="torch", max_batch_size=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    kw = dict(n_loops=2, temperature=1.3, top_k=20, top_p=0.9)
    a = rt.generate(ids, 6, seed=7, **kw)
    assert torch.equal(a, rt.generate(ids, 6, seed=7, **kw))
    assert a.shape == (2, 10) and torch.equal(a[:, :4], ids)


def test_repr_says_which_backend_runs_each_op():
    rt = mythos_rt.compile(OpenMythos(MythosConfig.from_preset("tiny_mla")), backend="auto",
                           overrides={"moe_ffn": "triton"})
    text = repr(rt)
    assert "moe_ffn=triton" in text and "mla_attention=cpu" in text
    assert "; cpu row kernels: " in text  # compiled (and on how many threads), or why not
    assert rt.config.attn_type == "mla" and rt.device.type == "cpu" and rt.dtype == torch.float32
    assert "cpu row kernels" not in repr(mythos_rt.compile(
        OpenMythos(MythosConfig.from_preset("tiny_mla")), backend="torch"))


def test_input_errors_are_clear():
    cfg = MythosConfig.from_preset("tiny_mla")
    rt = mythos_rt.compile(OpenMythos(cfg), backend="torch", max_batch_size=2, max_seq_len=16)
    ok = torch.randint(0, cfg.vocab_size, (1, 4))
    cases = [
        (lambda: rt.forward(torch.tensor([[1, 97]])), "token id 97 in input_ids is outside the vocabulary \\[0, 97\\)"),
        (lambda: rt.forward(torch.tensor([[-1, 2]])), "token id -1 in input_ids is outside"),
        (lambda: rt.forward(torch.zeros(3, 2, dtype=torch.long)), "batch size 3 exceeds max_batch_size=2"),
        (lambda: rt.forward(torch.zeros(1, 2, 2, dtype=torch.long)), "shape \\(B, T\\)"),
        (lambda: rt.forward(torch.zeros(1, 2)), "integer tensor"),
        (lambda: rt.forward([1, 2]), "must be a torch.Tensor"),
        (lambda: rt.forward(ok, n_loops=0), "n_loops must be an integer >= 1"),
        (lambda: rt.forward(ok, n_loops=5), "n_loops=5 exceeds the compiled max_loops=4"),
        (lambda: rt.generate(ok, 14), "4 \\+ max_new_tokens 14 needs 17 cache positions"),
        (lambda: rt.generate([[1, 2**64]], 1), "token id 18446744073709551616 in input_ids"),
        (lambda: rt.generate(ok, 2, top_p=0.0), "invalid sampling parameters"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()
    with pytest.raises(InputError, match="max_seq_len=100 exceeds the model's max_seq_len=64"):
        mythos_rt.compile(OpenMythos(cfg), max_seq_len=100)
    with pytest.raises(InputError, match="cuda_graphs must be True or False, got 'yes'"):
        mythos_rt.compile(OpenMythos(cfg), cuda_graphs="yes")
    with pytest.raises(InputError, match="overrides must map op names to backend names"):
        mythos_rt.compile(OpenMythos(cfg), overrides={"moe_ffn": 3})
    for name in ("max_batch_size", "max_loops"):
        with pytest.raises(InputError, match=f"{name}=1000000000 is larger than mythos-rt supports"):
            mythos_rt.compile(OpenMythos(cfg), **{name: 10**9})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_an_input_error():
    cfg = MythosConfig.from_preset("tiny_gqa")
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(InputError, match="no CUDA device is available here"):
            mythos_rt.compile(OpenMythos(cfg), device=device)
    with pytest.raises(InputError, match="runs on 'cpu' or 'cuda'"):
        mythos_rt.compile(OpenMythos(cfg), device="meta")


def test_bf16_compile_runs_and_keeps_tied_weights_tied():
    cfg = MythosConfig.from_preset("tiny_mla")
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    model = _model(cfg, ids)
    rt = mythos_rt.compile(model, dtype="bfloat16", backend="torch")
    w = rt.weights
    assert w["head.weight"] is w["embed.weight"] and w["embed.weight"].dtype == torch.bfloat16
    assert w["recurrent.injection.A"].dtype == torch.float32
    with torch.no_grad():  # docs/design.md's end-to-end bf16 bound, here on CPU
        assert_rel_close(rt.forward(ids, n_loops=4).float(), model(ids, n_loops=4), TOL_BF16_E2E)


class _Recorder:
    """A step observer that records what it sees and checks starts and ends pair up."""

    def __init__(self):
        self.events, self.open = [], None

    def on_step_start(self, step, shape):
        assert self.open is None, "steps do not nest"
        self.open = step
        self.events.append(("start", step.name, tuple(shape)))

    def on_step_end(self, step, shape):
        assert self.open is step
        self.open = None
        self.events.append(("end", step.name, tuple(shape)))


def test_observer_sees_every_plan_step_and_is_removed_after():
    cfg = MythosConfig.from_preset("tiny_gqa")
    rt = mythos_rt.compile(OpenMythos(cfg).eval(), backend="torch", max_batch_size=2, chunk=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    plan = [s.name for s in rt.plan(3)]
    runs = [s.run for s in rt.plan(3)]
    expected = rt.generate(ids, 2, n_loops=3)
    with rt.observe(_Recorder()) as rec:
        assert torch.equal(rt.generate(ids, 2, n_loops=3), expected)  # observing changes nothing
        with pytest.raises(InputError, match="already installed"):
            with rt.observe(_Recorder()):
                pass
    # 7 prompt tokens prefill in chunks of 5 and 2, then one decode step of one token per row
    shapes = [Shape(2, 5), Shape(2, 2), Shape(2, 1)]
    starts = [(name, shape) for kind, name, shape in rec.events if kind == "start"]
    assert starts == [(name, shape) for shape in shapes for name in plan]
    assert len(rec.events) == 2 * len(starts) and rec.open is None
    assert [s.run for s in rt.plan(3)] == runs  # no step was rebound
    rt.generate(ids, 2, n_loops=3)
    assert len(rec.events) == 2 * len(starts)  # uninstalled on exit


def test_runtime_keeps_its_options():
    cfg = MythosConfig.from_preset("tiny_mla")
    rt = mythos_rt.compile(OpenMythos(cfg), backend="torch", max_batch_size=3, max_seq_len=40,
                           max_loops=5, chunk=7)
    o = rt.options
    assert (o.max_batch_size, o.max_seq_len, o.max_loops, o.chunk, o.backend, o.dtype) == \
        (3, 40, 5, 7, "torch", "float32")
    assert (rt.max_batch_size, rt.max_seq_len, rt.max_loops, rt.chunk) == (3, 40, 5, 7)
