"""Generation API: sampling modes, ragged batches, stop ids, streaming (CPU, torch backend)."""

import pytest
import torch

import mythos_rt
from mythos_rt.config import MythosConfig
from mythos_rt.reference import OpenMythos
from mythos_rt.sampling import sample
from mythos_rt.testing import spread_act_halting


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = MythosConfig.from_preset("tiny_mla")
    model = OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    spread_act_halting(model, ids)
    with torch.no_grad():  # a livelier head so greedy output is not one repeated token
        model.embed.weight.mul_(20)
    return model, mythos_rt.compile(model, backend="torch", max_batch_size=4, chunk=4), ids


def test_sampling_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    probs = torch.softmax(logits, -1)[0]  # 0.64, 0.24, ... : top_p 0.7 keeps two tokens
    assert probs[0] < 0.7 < probs[0] + probs[1]
    draws = {int(sample(logits, 1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample(logits, 1.0, top_p=0.5, generator=gen)) == 0  # first token alone > 0.5
    assert sample(logits, 0.0).tolist() == [0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(1)
    counts = torch.bincount(torch.stack([sample(logits, 1.0, generator=gen) for _ in range(3000)])[:, 0],
                            minlength=3).float() / 3000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_seeded_generation_is_reproducible(setup):
    _, rt, ids = setup
    kw = dict(n_loops=2, temperature=1.0, top_k=30, top_p=0.95)
    a, b = rt.generate(ids, 5, seed=3, **kw), rt.generate(ids, 5, seed=3, **kw)
    assert torch.equal(a, b)
    assert not all(torch.equal(a, rt.generate(ids, 5, seed=s, **kw)) for s in (4, 5, 6))


def test_ragged_batch_rows_equal_each_sequence_alone(setup):
    model, rt, ids = setup
    prompts = [ids[0, :3], ids[1, :9], ids[2, :6]]
    out = rt.generate(prompts, 5, n_loops=3)
    assert isinstance(out, list) and [len(o) for o in out] == [8, 14, 11]
    for p, row in zip(prompts, out):
        assert torch.equal(row, rt.generate(p[None], 5, n_loops=3)[0])
        assert torch.equal(row, model.generate(p[None], 5, n_loops=3, temperature=0.0)[0])


def test_stop_ids_end_rows_and_generation(setup):
    _, rt, ids = setup
    free = rt.generate(ids, 6, n_loops=2)
    stop = int(free[0, 10])  # row 0's second new token
    out = rt.generate(ids, 6, n_loops=2, stop_ids=[stop])
    row0 = out[0, 9:].tolist()
    assert row0[: row0.index(stop) + 1] == free[0, 9:9 + row0.index(stop) + 1].tolist()
    assert all(t == stop for t in row0[row0.index(stop):])
    ragged = rt.generate(list(ids), 6, n_loops=2, stop_ids=[stop])
    assert ragged[0].tolist() == ids[0].tolist() + row0[: row0.index(stop) + 1]


def test_stream_yields_each_step(setup):
    _, rt, ids = setup
    steps = list(rt.stream(ids, 4, n_loops=2))
    full = rt.generate(ids, 4, n_loops=2)
    assert torch.equal(torch.tensor(steps).T, full[:, 9:])
    stop = steps[0][0]
    streamed = list(rt.stream(ids, 4, n_loops=2, stop_ids=[stop]))
    assert all(step[0] is None for step in streamed[1:])


def test_max_seq_len_is_checked_before_any_work(setup):
    _, rt, ids = setup
    with pytest.raises(mythos_rt.InputError, match="exceeds max_seq_len=64"):
        rt.generate([ids[0], torch.arange(60)], 10)
    with pytest.raises(mythos_rt.InputError, match=r"input_ids\[1\] must be a non-empty 1-D"):
        rt.generate([ids[0], torch.tensor([])], 2)
    with pytest.raises(mythos_rt.InputError, match="max_new_tokens must be a non-negative"):
        rt.generate(ids, -1)


def test_stopped_rows_repeat_their_own_stop_id(setup):
    _, rt, ids = setup
    kw = dict(n_loops=2, temperature=5.0, seed=0)  # hot sampling: varied, reproducible ids
    free = rt.generate(ids[:2], 8, **kw)
    own = int(free[0, 9])  # row 0 stops at its first new token
    row1 = free[1, 9:].tolist()
    # row 1 stops later, on a token different from its first one (and from row 0's)
    j = next(i for i, t in enumerate(row1) if i > 0 and t != row1[0] and t != own)
    other = row1[j]
    assert own not in row1[:j + 1] and other not in row1[:j]
    out = rt.generate(ids[:2], 8, stop_ids=[other, own], **kw)
    assert out.shape[1] == 9 + j + 1
    assert out[0, 9:].tolist() == [own] * (j + 1)
    assert out[1, 9:].tolist() == row1[:j + 1]


def test_a_runtime_shared_by_two_threads_serves_each_its_own_tokens(setup):
    import threading
    _, rt, ids = setup
    prompts = [ids[0, :5], ids[1], ids[2, :7]]
    want = [rt.generate(p[None], 5, n_loops=2) for p in prompts]
    got, errors = {}, []

    def worker(w):
        try:
            for i in range(6):
                j = (w + i) % len(prompts)
                got[w, i] = torch.equal(rt.generate(prompts[j][None], 5, n_loops=2), want[j])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 12 and all(got.values())


def test_interleaved_streams_are_refused_and_streams_hold_the_runtime(setup):
    import threading
    _, rt, ids = setup
    want = rt.generate(ids[:1], 4, n_loops=2)[0, 9:].tolist()
    first, second = rt.stream(ids[:1], 4, n_loops=2), rt.stream(ids[1:2], 4, n_loops=2)
    assert next(first) == [want[0]]
    with pytest.raises(mythos_rt.InputError, match="one request at a time"):
        next(second)
    with pytest.raises(mythos_rt.InputError, match="one request at a time"):
        rt.generate(ids[:1], 2)
    # another thread waits for the live stream instead of taking its caches
    other = {}
    t = threading.Thread(target=lambda: other.update(out=rt.generate(ids[1:2], 4, n_loops=2)))
    t.start()
    t.join(timeout=0.5)
    assert t.is_alive()
    assert [s[0] for s in first] == want[1:]  # undisturbed by the waiting thread
    t.join()
    assert torch.equal(other["out"], rt.generate(ids[1:2], 4, n_loops=2))
    closed = rt.stream(ids[:1], 4, n_loops=2)
    next(closed)
    closed.close()  # closing releases the runtime
    assert rt.generate(ids[:1], 4, n_loops=2)[0, 9:].tolist() == want


def test_stream_checks_its_arguments_when_called(setup):
    _, rt, ids = setup
    with pytest.raises(mythos_rt.InputError, match="exceeds max_seq_len"):
        rt.stream(ids, 1000)
    with pytest.raises(mythos_rt.InputError, match="n_loops"):
        rt.stream(ids, 2, n_loops=0)


def test_the_last_new_token_needs_no_cache_slot():
    """P prompt tokens + N new ones fill P + N - 1 cache positions: the last sampled token
    is never fed back, so a prompt of max_seq_len tokens may still get one new token."""
    torch.manual_seed(0)
    cfg = MythosConfig.from_preset("tiny_gqa")  # max_seq_len 64
    model = OpenMythos(cfg).eval()
    rt = mythos_rt.compile(model, backend="torch", max_batch_size=1, max_seq_len=16, chunk=8)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    out = rt.generate(ids, 1, n_loops=2)
    assert torch.equal(out, model.generate(ids, 1, n_loops=2, temperature=0.0))
    out = rt.generate(ids[:, :12], 5, n_loops=2)  # 12 + 5 - 1 = 16 positions
    assert torch.equal(out, model.generate(ids[:, :12], 5, n_loops=2, temperature=0.0))
    with pytest.raises(mythos_rt.InputError, match="needs 17 cache positions"):
        rt.generate(ids[:, :12], 6, n_loops=2)
    assert torch.equal(rt.generate(ids, 0), ids)


@pytest.mark.parametrize("prompt, message", [
    (["1 2 3"], "text prompts need a tokenizer: this runtime has none"),
    ([[1, 2 ** 64]], r"token id 18446744073709551616 in input_ids\[0\] is outside"),
    ([1, 2 ** 70], "token id 1180591620717411303424 in input_ids is outside"),
    ([1.5, 2], r"input_ids\[0\] must be an integer tensor or a list"),
    ([[1, True]], r"input_ids\[0\] must be an integer tensor or a list"),
    ([None], r"input_ids\[0\] must be an integer tensor"),
    ("1 2 3", "text prompts need a tokenizer"),
    (["1 2 3", [1, 2]], r"input_ids\[0\] must be an integer tensor or a list of int token ids"),
])
def test_wrong_prompt_types_are_input_errors(setup, prompt, message):
    _, rt, _ = setup
    with pytest.raises(mythos_rt.InputError, match=message):
        rt.generate(prompt, 2)
    with pytest.raises(mythos_rt.InputError, match=message):
        rt.stream(prompt, 2)


def test_return_logits_must_be_a_bool(setup):
    _, rt, ids = setup
    with pytest.raises(mythos_rt.InputError, match="return_logits must be True or False"):
        rt.generate(ids, 2, return_logits="no")
