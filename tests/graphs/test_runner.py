"""DecodeGraphs: bucket logic and the eager path on CPU; capture/replay on GPU."""

import pytest
import torch

import mythos_rt
from mythos_rt.config import MythosConfig
from mythos_rt.graphs import DecodeGraphs, batch_buckets
from mythos_rt.reference import OpenMythos


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(50) == [1, 2, 4, 8, 16, 32, 48, 50]


def test_eager_step_pads_to_bucket_and_resets_padding_rows():
    """(The padding a GPU uses, asked for on a CPU to test it here.)"""
    calls = []
    lens = torch.full((8,), 5, dtype=torch.int32)
    ids = torch.full((8,), 7, dtype=torch.long)
    graphs = DecodeGraphs(lambda B, n: calls.append((B, n)), torch.device("cpu"), 8, lens, ids,
                          pad=True)
    assert graphs.step(3, 2) == 4 and calls == [(4, 2)]
    assert lens.tolist() == [5, 5, 5, 0, 5, 5, 5, 5] and ids[3] == 0  # row 3 is padding
    assert not graphs.enabled and graphs.captured == []
    with pytest.raises(ValueError, match="batch 9 exceeds the largest bucket 8"):
        graphs.step(9, 2)


def test_a_cpu_step_runs_the_batch_rows_exactly():
    calls = []
    lens = torch.full((16,), 5, dtype=torch.int32)
    graphs = DecodeGraphs(lambda B, n: calls.append((B, n)), torch.device("cpu"), 16, lens,
                          torch.zeros(16, dtype=torch.long))
    assert not graphs.pad and graphs.step(9, 2) == 9 and calls == [(9, 2)]
    assert lens.tolist() == [5] * 16


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_padded_bucket_rows_do_not_change_live_rows(backend):
    cfg = MythosConfig.from_preset("tiny_gqa")
    model = OpenMythos(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 5))
    rt = mythos_rt.compile(model, backend=backend, max_batch_size=8)
    rt.graphs.pad = True  # as on a GPU: decode steps run at bucket 4 with one padding row
    out = rt.generate(ids, 4, n_loops=2)
    assert torch.equal(out, model.generate(ids, 4, n_loops=2, temperature=0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3])
def test_graph_replay_is_bitwise_equal_to_eager_plan(B):
    cfg = MythosConfig.from_preset("small_mla")
    model = OpenMythos(cfg).eval().cuda()
    ids = torch.randint(0, cfg.vocab_size, (B, 7), device="cuda")
    eager = mythos_rt.compile(model, max_batch_size=8, cuda_graphs=False)
    graphed = mythos_rt.compile(model, max_batch_size=8, cuda_graphs=True, debug=True)
    a, la = eager.generate(ids, 6, n_loops=4, return_logits=True)
    b, lb = graphed.generate(ids, 6, n_loops=4, return_logits=True)
    assert graphed.graphs.captured, "no decode step was captured"
    assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.gpu
def test_capture_failure_of_any_type_falls_back_to_eager_with_reason():
    """The warm-up runs on the capture's side stream; an exception during capture that is
    no RuntimeError (here a ValueError) still leaves the step eager, saying why."""
    streams, runs = [], []
    lens = torch.zeros(4, dtype=torch.int32, device="cuda")
    ids = torch.zeros(4, dtype=torch.long, device="cuda")

    def run_plan(B, n_loops):
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("a launcher checked a device value")
        streams.append(torch.cuda.current_stream())
        runs.append(B)

    g = DecodeGraphs(run_plan, torch.device("cuda"), 4, lens, ids)
    with pytest.warns(UserWarning, match="ValueError: a launcher checked"):
        g.step(3, 2)
    assert streams[0] != torch.cuda.default_stream()  # warm-up on the side stream
    assert g.fallbacks == {(4, 2): "ValueError: a launcher checked a device value"}
    assert not g.captured
    g.step(3, 2)
    assert runs == [4, 4]  # eager from then on, no second capture attempt
