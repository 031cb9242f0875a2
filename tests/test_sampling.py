"""Sampling: parameter checks, non-finite logits, batch-invariant seeded draws."""

import pytest
import torch

import mythos_rt
from mythos_rt.config import MythosConfig
from mythos_rt.errors import InputError
from mythos_rt.reference import OpenMythos
from mythos_rt.sampling import NonFiniteLogitsError, Sampler, SamplingParams, sample


@pytest.fixture(scope="module")
def rt():
    torch.manual_seed(0)
    cfg = MythosConfig.from_preset("tiny_gqa")
    model = OpenMythos(cfg).eval()  # random init: flat logits, so sampled rows vary
    return mythos_rt.compile(model, backend="torch", max_batch_size=4, chunk=4)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=float("nan")), "temperature=nan .* must be finite"),
    (dict(temperature=float("inf")), "temperature=inf .* must be finite"),
    (dict(temperature=-0.5), "temperature=-0.5 .* must be 0 \\(greedy\\) or >="),
    (dict(temperature=1e-45), "temperature=1e-45 .*smallest normal"),
    (dict(temperature=None), "temperature=None \\(NoneType\\) must be a real number"),
    (dict(temperature="1"), "temperature='1' \\(str\\) must be a real number"),
    (dict(top_k=2.5), "top_k=2.5 \\(float\\) must be an integer"),
    (dict(top_k=-1), "top_k=-1 .* must be >= 0"),
    (dict(top_k=True), "top_k=True .* not a bool"),
    (dict(top_p=0.0), "top_p=0.0 .* must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p=1.5 .* must be in \\(0, 1\\]"),
    (dict(top_p=float("nan")), "top_p=nan .* must be finite"),
    (dict(seed=2 ** 64), "seed=18446744073709551616 .* must be in \\[0, 18446744073709551616\\)"),
    (dict(seed=-1), "seed=-1 .* must be in \\[0, "),
    (dict(seed=1.0), "seed=1.0 \\(float\\) must be an integer"),
    (dict(stop_ids=[3, None]), "stop_ids\\[1\\]=None \\(NoneType\\) must be an integer"),
    (dict(stop_ids=[7.9]), "stop_ids\\[0\\]=7.9 \\(float\\) must be an integer"),
    (dict(stop_ids=[-2]), "stop_ids\\[0\\]=-2 .* must be >= 0"),
    (dict(stop_ids=5), "stop_ids=5 .* must be a sequence"),
    (dict(stop_ids="12"), "stop_ids='12' .* must be a sequence"),
])
def test_invalid_parameters_are_one_line_input_errors(kw, message):
    with pytest.raises(InputError, match="invalid sampling parameters: " + message) as err:
        SamplingParams(**kw)
    assert "\n" not in str(err.value)


def test_valid_parameters_are_normalized():
    p = SamplingParams(temperature=1, top_k=torch.tensor(3), top_p=1, seed=2 ** 64 - 1,
                       stop_ids=torch.tensor([4, 5]))
    assert p == SamplingParams(1.0, 3, 1.0, 2 ** 64 - 1, (4, 5))
    assert type(p.top_k) is int and all(type(s) is int for s in p.stop_ids)
    with pytest.raises(InputError, match="stop_ids\\[1\\]=101 is outside the vocabulary \\[0, 101\\)"):
        SamplingParams(stop_ids=[4, 101]).check_vocab(101)


@pytest.mark.parametrize("kw", [dict(temperature=None), dict(top_k=2.5), dict(stop_ids=[None]),
                                dict(seed=2 ** 64), dict(stop_ids=[7.9]),
                                dict(temperature=1e-45)],
                         ids=["temperature_None", "top_k_2.5", "stop_None", "seed_2**64",
                              "stop_7.9", "temperature_denormal"])
def test_runtime_refuses_bad_sampling_arguments(rt, kw):
    ids = torch.randint(0, rt.config.vocab_size, (1, 5))
    with pytest.raises(InputError, match="invalid sampling parameters"):
        rt.generate(ids, 3, n_loops=2, **kw)
    with pytest.raises(InputError, match="invalid sampling parameters"):
        list(rt.stream(ids, 3, n_loops=2, **kw))


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_are_an_error_not_token_0(temperature, bad):
    logits = torch.randn(3, 11)
    logits[1, 4] = bad
    sampler = Sampler(SamplingParams(temperature, seed=1), 3, torch.device("cpu"))
    sampler(torch.randn(3, 11))  # a finite step first
    with pytest.raises(NonFiniteLogitsError, match="logits for new token 2 contain NaN or Inf"):
        sampler(logits)  # on a CPU: refused before any token is drawn from it


def test_non_finite_flag_is_kept_on_device_until_checked():
    """Where reading the flag costs a sync (a GPU), steps only record it; check() reads it."""
    sampler = Sampler(SamplingParams(0.5, seed=3), 2, torch.device("cpu"))
    sampler._check_each_step = False  # behave as on a GPU
    sampler(torch.randn(2, 7))
    bad = torch.randn(2, 7)
    bad[0, 0] = float("nan")
    sampler(bad)
    sampler(torch.randn(2, 7))
    with pytest.raises(NonFiniteLogitsError, match="new token 2 "):
        sampler.check()


def test_float16_overflow_in_the_runtime_is_reported():
    cfg = MythosConfig.from_preset("tiny_gqa")
    model = OpenMythos(cfg).eval()
    with torch.no_grad():  # finite weights whose logits overflow float16
        model.norm.weight.fill_(3e4)
        model.embed.weight.copy_(torch.randn_like(model.embed.weight).abs() * 40 + 1)
    rt16 = mythos_rt.compile(model, backend="torch", dtype="float16", max_batch_size=1, chunk=4)
    ids = torch.randint(0, cfg.vocab_size, (1, 4))
    with pytest.raises(NonFiniteLogitsError, match="float16 overflows"):
        rt16.generate(ids, 4, n_loops=2)


def test_rows_draw_the_same_tokens_whatever_they_are_batched_with():
    torch.manual_seed(5)
    V = 53
    logits = torch.randn(4, V) * 2
    kw = dict(temperature=1.3, top_k=40, top_p=0.95, seed=11)
    mine = Sampler(SamplingParams(**kw), 4, torch.device("cpu"))
    draws = torch.stack([mine(logits) for _ in range(50)])  # (steps, B)
    for others in range(3):
        mixed = torch.randn(4, V) * 2
        mixed[2] = logits[2]
        other = Sampler(SamplingParams(**kw), 4, torch.device("cpu"))
        assert torch.equal(torch.stack([other(mixed) for _ in range(50)])[:, 2], draws[:, 2])
    alone = Sampler(SamplingParams(**kw), 1, torch.device("cpu"))  # row 0 batched with none
    assert torch.equal(torch.stack([alone(logits[:1]) for _ in range(50)])[:, 0], draws[:, 0])
    assert len(set(draws[:, 2].tolist())) > 3  # really sampled


def test_generate_row_is_independent_of_its_batch(rt):
    V = rt.config.vocab_size
    first = torch.randint(0, V, (7,))
    kw = dict(n_loops=2, temperature=1.0, seed=21)
    a = rt.generate(torch.stack([first, torch.randint(0, V, (7,))]), 8, **kw)
    b = rt.generate(torch.stack([first, torch.randint(0, V, (7,)), torch.randint(0, V, (7,))]),
                    8, **kw)
    assert torch.equal(a[0], b[0])
    assert torch.equal(rt.generate(first[None], 8, **kw)[0], a[0])
    assert len(set(a[0, 7:].tolist())) > 3  # really sampled


def test_one_generator_for_all_rows_still_works():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9)
    out = sample(logits, 0.8, generator=gen)
    assert out.shape == (3,) and out.dtype == torch.long
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample(logits, 0.8, generator=[torch.Generator(), torch.Generator()])
