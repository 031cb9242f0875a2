"""mythos_rt.reference against the real open-mythos 0.5.0 package (fp32, ≤ 1e-5)."""

import dataclasses

import pytest
import torch

from mythos_rt import reference as R
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


# ---- drop-in for open_mythos.main: the public surface, compared programmatically ----------

def _public(module):
    """Public classes and functions a module defines itself (not the names it imports)."""
    import inspect
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__}


def _assert_callable_like(ours, theirs, what):
    """Upstream's parameters, in order, with its names, kinds and defaults; anything ours
    adds comes after them and has a default (so every upstream call binds the same)."""
    import inspect
    a = list(inspect.signature(ours).parameters.values())
    b = list(inspect.signature(theirs).parameters.values())
    assert [(p.name, p.kind, p.default) for p in a[:len(b)]] == \
        [(p.name, p.kind, p.default) for p in b], what
    assert all(p.default is not p.empty or p.kind is p.VAR_KEYWORD for p in a[len(b):]), what


def test_public_names_and_signatures_match_upstream():
    import inspect

    from mythos_rt import reference
    up = upstream_main()
    ours = vars(reference)
    for name, theirs in _public(up).items():
        assert name in ours, f"mythos_rt.reference lacks open_mythos.main.{name}"
        if inspect.isfunction(theirs):
            _assert_callable_like(ours[name], theirs, name)
            continue
        for attr, member in vars(theirs).items():
            if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                assert hasattr(ours[name], attr), f"{name}.{attr} missing"
                _assert_callable_like(getattr(ours[name], attr), member, f"{name}.{attr}")


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_modules_and_attributes_match_upstream(name):
    """Same submodule tree (dropouts included), types and public attributes, so code that
    reaches into upstream's model (``model.prelude[0].resid_drop.p = ...``) runs unchanged."""
    cfg = CONFIGS[name]()
    ours, theirs = _pair(cfg, torch.randint(0, cfg.vocab_size, (1, 5)))
    mods = dict(ours.named_modules())
    for path, module in theirs.named_modules():
        assert path in mods and type(mods[path]).__name__ == type(module).__name__, path
        public = {k for k in vars(module) if not k.startswith("_")}
        assert public <= set(vars(mods[path])), (path, public - set(vars(mods[path])))


def test_dropout_acts_in_training_as_upstream_does():
    cfg = dataclasses.replace(MythosConfig.from_preset("tiny_gqa"), dropout=0.3)
    ours = OpenMythos(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    torch.manual_seed(1)
    a = ours(ids, n_loops=2)
    torch.manual_seed(2)
    assert not torch.equal(a, ours(ids, n_loops=2))  # dropout is live in training
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(ids, n_loops=2), ours(ids, n_loops=2))


def test_rope_theta_defaults_to_upstreams():
    up = upstream_main()
    d, n = 14, 23
    assert torch.equal(R.precompute_rope_freqs(d, n), up.precompute_rope_freqs(d, n))
    assert torch.equal(R.precompute_rope_freqs(d, n), R.precompute_rope_freqs(d, n, 500000.0))


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_kv_cache_holds_only_upstreams_entries(name):
    """Code that walks a kv_cache as upstream fills it (every value a dict of tensors)
    runs on ours: same keys, same entry names and shapes, nothing else."""
    cfg = CONFIGS[name]()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    ours, theirs = _pair(cfg, ids)
    cache_a, cache_b = {}, {}
    with torch.no_grad():
        ours(ids, 3, cache_a)
        theirs(ids, 3, cache_b)
    assert cache_a.keys() == cache_b.keys()
    for key, entry in cache_a.items():
        assert isinstance(entry, dict) and entry.keys() == cache_b[key].keys(), key
        for part, tensor in entry.items():
            assert tensor.shape == cache_b[key][part].shape, (key, part)
