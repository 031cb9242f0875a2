"""Memory estimates: refused before anything is allocated, naming the field that drives it."""

import math
import time

import pytest
import torch

import mythos_rt
from mythos_rt import memory
from mythos_rt.checkpoint import expected_shapes
from mythos_rt.config import PRESETS, ConfigError, MythosConfig
from mythos_rt.errors import InputError
from mythos_rt.memory import MemoryLimitError, check_fits, estimate, parameter_count
from mythos_rt.reference import OpenMythos

GB = 10 ** 9


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_is_the_reference_models(name):
    cfg = MythosConfig.from_preset(name)
    shapes = [s for k, (s, _) in expected_shapes(cfg).items() if not k.startswith("freqs")]
    assert parameter_count(cfg) == (sum(math.prod(s) for s in shapes), len(shapes))


def test_estimate_counts_caches_tables_and_arena():
    cfg = MythosConfig.from_preset("tiny_gqa")  # head_dim 8, 2 kv heads, 3 layers
    est = estimate(cfg, dtype_bytes=4, max_batch=3, max_seq_len=40, max_loops=5, chunk=7)
    assert est.kv_caches == (1 + 2 + 5) * 3 * 40 * (2 * 2 * 8) * 4
    # the reference builds both tables: GQA head_dim 8 and the (unused) MLA rope dim 64
    assert est.rope_tables == 40 * (4 + 32) * memory.ROPE_BYTES_PER_ENTRY
    params = parameter_count(cfg)[0] - cfg.vocab_size * cfg.dim  # tied head counted once
    assert est.weights == params * 4 + parameter_count(cfg)[1] * memory.TENSOR_OVERHEAD_BYTES
    assert est.activations > 3 * 7 * cfg.vocab_size * 4
    assert estimate(cfg, dtype_bytes=4, weights=False).weights == 0


@pytest.mark.parametrize("field, value", [("n_experts", 3_000_000), ("prelude_layers", 2_000_000),
                                          ("max_seq_len", 200_000_000), ("dim", 2 ** 20),
                                          ("vocab_size", 10 ** 10)])
def test_refused_within_a_second_naming_field_estimate_and_memory(monkeypatch, field, value):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * GB)
    cfg = MythosConfig.from_preset("tiny_mla")
    setattr(cfg, field, value)
    t0 = time.perf_counter()
    with pytest.raises(MemoryLimitError) as info:
        check_fits(cfg, "cpu", "loading this checkpoint", dtype_bytes=2)
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    assert msg.startswith(f"config.{field}={value}: loading this checkpoint would allocate about ")
    assert msg.endswith("more than the 8.0 GB of memory available on cpu") and len(msg) < 300
    assert isinstance(info.value, ConfigError) and isinstance(info.value, InputError)


def test_the_reference_model_refuses_before_allocating():
    cfg = MythosConfig.from_preset("mythos_1b")
    cfg.n_experts = 3_000_000  # ~75 TB of experts
    t0 = time.perf_counter()
    with pytest.raises(MemoryLimitError, match="config.n_experts=3000000: building the "
                                               "reference model would allocate about .* TB"):
        OpenMythos(cfg)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("option, value, other", [("max_batch_size", 4096, {}),
                                                  ("max_loops", 1024, {})])
def test_compile_refuses_caches_that_cannot_fit(option, value, other, monkeypatch):
    """Within the options' own bounds (4096 rows, 1024 loops) the caches still have to fit
    the machine (here one of 1 MiB): refused by the estimate, naming the option that drives
    it, before allocating."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    model = OpenMythos(MythosConfig.from_preset("tiny_gqa"))
    t0 = time.perf_counter()
    with pytest.raises(MemoryLimitError, match=f"^{option}={value}: compiling \\(KV caches, "
                                               "activation arena\\) would allocate about"):
        mythos_rt.compile(model, backend="torch", **{option: value}, **other)
    assert time.perf_counter() - t0 < 30  # tracing and packing tiny weights, no allocation


def test_available_memory_is_read_from_the_machine():
    free = memory.available_bytes(torch.device("cpu"))
    assert 0 < free < 1 << 50
    assert memory.format_bytes(1_234_567) == "1.2 MB" and memory.format_bytes(999) == "999 B"


# Odd splits on purpose: 4 MLA heads, 6 experts, 2 shared slots, 97 vocabulary rows over
# 3 ranks; 3 KV heads, 5 experts, 101 rows over 2.
SPLITS = {"mla": ("tiny_mla", {}, 3), "gqa": ("tiny_gqa", {"n_kv_heads": 3}, 2)}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_a_ranks_estimate_is_the_bytes_of_its_share(name):
    """``tensor_parallel=N`` estimates rank 0's share (the busiest: the first ranks hold
    the extra heads, columns and experts) to within 0.1% of the bytes its materialized
    plan holds, leaving out MLA's absorbed copies of kv_up rows (derived for decode; the
    estimate counts the checkpoint's parameters). No rank holds more."""
    import dataclasses

    from mythos_rt import parallel
    from mythos_rt.passes import run_passes
    from mythos_rt.trace import build_graph
    from mythos_rt.weights import materialize
    preset, changes, world = SPLITS[name]
    cfg = dataclasses.replace(MythosConfig.from_preset(preset), **changes)
    sd = OpenMythos(cfg).state_dict()
    optimized = run_passes(build_graph(cfg))
    est = estimate(cfg, dtype_bytes=4, tensor_parallel=world)
    want = est.weights - parameter_count(cfg, world)[1] * memory.TENSOR_OVERHEAD_BYTES
    held = []
    for rank in range(world):
        g = parallel.shard(optimized, world, rank)
        tensors = {v.data_ptr(): v.numel() * v.element_size()
                   for k, v in materialize(g, sd, torch.device("cpu")).items()
                   if not (g.weights[k].derive or {}).get("fn", "").startswith("mla_absorb")}
        held.append(sum(tensors.values()))
    assert abs(held[0] - want) <= 1e-3 * want, (held, want)
    assert max(held) == held[0]
    whole = estimate(cfg, dtype_bytes=4).weights
    assert want < 0.75 * whole  # the split weights dominate even these tiny models


def test_a_model_that_fits_split_over_the_ranks_is_not_refused(monkeypatch):
    """Memory for 60% of the model: refused whole, accepted as one of 3 ranks' shares;
    GQA's caches are split by KV heads, MLA's latent cache is not."""
    cfg = MythosConfig.from_preset("mythos_1b")
    whole = estimate(cfg, dtype_bytes=2, max_batch=1, max_seq_len=4096, chunk=256)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(0.6 * whole.total))
    kw = dict(dtype_bytes=2, max_batch=1, max_seq_len=4096, chunk=256)
    with pytest.raises(MemoryLimitError):
        check_fits(cfg, "cpu", "compiling", **kw)
    share = check_fits(cfg, "cpu", "compiling", **kw, tensor_parallel=3)
    assert share.weights < 0.6 * whole.weights and share.kv_caches == whole.kv_caches
    gqa = MythosConfig.from_preset("tiny_gqa")  # 2 KV heads
    assert (estimate(gqa, dtype_bytes=4, max_batch=1, max_loops=2, tensor_parallel=2).kv_caches
            * 2 == estimate(gqa, dtype_bytes=4, max_batch=1, max_loops=2).kv_caches)
