"""mythos_rt.reference against the real open-mythos 0.5.0 package (fp32, ≤ 1e-5)."""

import dataclasses

import pytest
import torch

from mythos_rt.config import MythosConfig
from mythos_rt.reference import OpenMythos
from mythos_rt.testing import (TOL_FP32_TORCH, assert_rel_close, halting_loops,
                               spread_act_halting)
from tests.upstream import upstream_main


def _no_shared_prelude2():
    return dataclasses.replace(MythosConfig.from_preset("tiny_mla"), n_shared_experts=0,
                               prelude_layers=2, coda_layers=0, n_experts_per_tok=3)


CONFIGS = {
    "mla": lambda: MythosConfig.from_preset("tiny_mla"),
    "gqa": lambda: MythosConfig.from_preset("tiny_gqa"),
    "mla-noshared-nocoda": _no_shared_prelude2,
}


def _pair(cfg, ids):
    """Our model and upstream's with identical weights and ACT set to halt unevenly."""
    up = upstream_main()
    ours = OpenMythos(cfg).eval()
    spread_act_halting(ours, ids)
    theirs = up.OpenMythos(up.MythosConfig(**cfg.to_dict())).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_cached_decode_match_upstream(name):
    cfg = CONFIGS[name]()
    B, T = 3, 7
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    ours, theirs = _pair(cfg, ids)
    for n_loops in (1, cfg.max_loop_iters, 2 * cfg.max_loop_iters + 1):
        with torch.no_grad():
            assert_rel_close(ours(ids, n_loops=n_loops), theirs(ids, n_loops=n_loops),
                             TOL_FP32_TORCH, f"prefill n_loops={n_loops}")
    # ACT really is exercised: positions halt at different loops, some never.
    loops = halting_loops(ours, ids, 2 * cfg.max_loop_iters + 1)
    assert len(loops.unique()) >= 2 and (loops > 0).any()
    # Prefill + decode with caches, n_loops above max_loop_iters (LoRA clamp, extra caches).
    n_loops = cfg.max_loop_iters + 2
    cache_a, cache_b = {}, {}
    with torch.no_grad():
        assert_rel_close(ours(ids, n_loops, cache_a), theirs(ids, n_loops, cache_b),
                         TOL_FP32_TORCH, "cached prefill")
        for step in range(4):
            nxt = torch.randint(0, cfg.vocab_size, (B, 1))
            a = ours(nxt, n_loops, cache_a, start_pos=T + step)
            b = theirs(nxt, n_loops, cache_b, start_pos=T + step)
            assert_rel_close(a, b, TOL_FP32_TORCH, f"decode step {step}")


def test_halting_never_is_not_given_a_remainder():
    cfg = MythosConfig.from_preset("tiny_mla")
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    ours, theirs = _pair(cfg, ids)
    with torch.no_grad():  # nothing ever halts: h_out is the p-weighted sum only
        for m in (ours, theirs):
            m.recurrent.act.halt.bias.fill_(-30.0)
        assert_rel_close(ours(ids, n_loops=3), theirs(ids, n_loops=3), TOL_FP32_TORCH)


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_generate_matches_upstream_sampling_and_greedy(name):
    cfg = CONFIGS[name]()
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    ours, theirs = _pair(cfg, ids)
    torch.manual_seed(123)
    a = ours.generate(ids, max_new_tokens=5, n_loops=3, temperature=0.8, top_k=10)
    torch.manual_seed(123)
    b = theirs.generate(ids, max_new_tokens=5, n_loops=3, temperature=0.8, top_k=10)
    assert torch.equal(a, b)
    greedy = ours.generate(ids, max_new_tokens=5, n_loops=3, temperature=0.0)
    # Greedy equals argmax over the upstream model's cache-free forward, step by step.
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, theirs(seq, n_loops=3)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq)


def test_generate_stop_ids_pad_finished_rows():
    cfg = MythosConfig.from_preset("tiny_mla")
    model = OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    free = model.generate(ids, max_new_tokens=6, n_loops=2, temperature=0.0)
    stop = int(free[0, 4])  # the second token generated for row 0
    out = model.generate(ids, max_new_tokens=6, n_loops=2, temperature=0.0, stop_ids=[stop])
    row0 = out[0, 3:].tolist()
    first = row0.index(stop)
    assert all(t == stop for t in row0[first:])
    assert out.shape[1] <= free.shape[1]


def test_chunked_prefill_equals_one_shot():
    cfg = MythosConfig.from_preset("tiny_mla")
    model = OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids, n_loops=3, kv_cache={})
        cache = {}
        parts = [model(ids[:, :4], 3, cache), model(ids[:, 4:7], 3, cache, start_pos=4),
                 model(ids[:, 7:], 3, cache, start_pos=7)]
    assert_rel_close(torch.cat(parts, 1), full, TOL_FP32_TORCH)


def test_changing_n_loops_mid_sequence_is_an_error():
    cfg = MythosConfig.from_preset("tiny_gqa")
    model = OpenMythos(cfg).eval()
    cache = {}
    ids = torch.randint(0, cfg.vocab_size, (1, 3))
    with torch.no_grad():
        model(ids, 2, cache)
        with pytest.raises(ValueError, match="filled with n_loops=2.*got 3"):
            model(ids[:, :1], 3, cache, start_pos=3)
        with pytest.raises(ValueError, match="n_loops must be >= 1"):
            model(ids, 0)
        with pytest.raises(ValueError, match="exceed max_seq_len"):
            model(ids, 2, start_pos=cfg.max_seq_len - 1)


def test_bf16_runs_and_tracks_fp32():
    cfg = MythosConfig.from_preset("tiny_mla")
    model = OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    spread_act_halting(model, ids)
    with torch.no_grad():
        ref = model(ids, n_loops=4)
        low = model.to(torch.bfloat16)
        assert low.freqs_cis_mla.is_complex()  # upstream's bug: tables turned real
        out = low(ids, n_loops=4)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out.float(), ref, 3e-2, "bf16 logits vs fp32 (docs/design.md e2e bound)")
