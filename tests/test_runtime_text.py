"""Runtime text API: str prompts in, str completions out; streaming text; stop strings."""

import dataclasses

import pytest
import torch

import mythos_rt
from mythos_rt.config import MythosConfig
from mythos_rt.errors import InputError
from mythos_rt.reference import OpenMythos
from mythos_rt.text import decode_completion
from tests.test_demo_model import ASSET

PROMPTS = ["def mean(values):\n    \"\"\"", "Return the ", "x = 1  # é"]


@pytest.fixture(scope="module")
def rt():
    return mythos_rt.compile(ASSET, device="cpu", max_batch_size=3,
                             max_seq_len=96)


def test_text_in_text_out_equals_the_id_path(rt):
    tok = rt.tokenizer
    assert tok is not None and tok.eos_id == 257
    texts = rt.generate(PROMPTS, 17, n_loops=3)
    assert isinstance(texts, list) and len(texts) == 3
    for prompt, text in zip(PROMPTS, texts):
        ids = tok.encode(prompt)
        out = rt.generate([ids], 17, n_loops=3, stop_ids=[tok.eos_id])[0]
        assert text == decode_completion(tok, out[len(ids):].tolist(), stop_ids=[tok.eos_id],
                                         context=ids)
    assert rt.generate(PROMPTS[1], 17, n_loops=3) == texts[1]
    ids = torch.tensor([tok.encode("abc")])
    assert rt.generate(ids, 5).shape == (1, 8)  # ids in, ids out, unchanged


def test_stream_pieces_are_text_and_join_to_generate(rt):
    pieces = list(rt.stream(PROMPTS[0], 23, n_loops=2, temperature=0.9, seed=11))
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    assert all(p.encode("utf-8") for p in pieces)
    assert "".join(pieces) == rt.generate(PROMPTS[0], 23, n_loops=2, temperature=0.9, seed=11)
    steps = list(rt.stream(PROMPTS, 9, n_loops=2))
    joined = ["".join(step[b] for step in steps) for b in range(3)]
    assert joined == rt.generate(PROMPTS, 9, n_loops=2)


def test_stop_strings_cut_the_completion(rt):
    full = rt.generate(PROMPTS[1], 30, n_loops=2)
    assert len(full) > 6
    stop = full[3:6]
    cut = rt.generate(PROMPTS[1], 30, n_loops=2, stop=[stop, "\x00never"])
    assert cut == full[:full.index(stop)]
    assert "".join(rt.stream(PROMPTS[1], 30, n_loops=2, stop=stop)) == cut
    assert rt.generate(PROMPTS[1], 30, n_loops=2, stop_ids=[]) .startswith(full)


def test_text_errors_are_input_errors(rt):
    bare = mythos_rt.compile(OpenMythos(MythosConfig.from_preset("tiny_gqa")), backend="torch",
                             max_batch_size=1, max_seq_len=32)
    with pytest.raises(InputError, match="text prompts need a tokenizer"):
        bare.generate("hello", 3)
    with pytest.raises(InputError, match="stop strings .* need text prompts"):
        bare.generate([[1, 2, 3]], 3, stop=["x"])
    with pytest.raises(InputError, match="prompt 0 encodes to no tokens"):
        rt.generate("", 3)
    with pytest.raises(InputError, match="stop strings must be non-empty"):
        rt.generate("a", 3, stop=[""])
    with pytest.raises(InputError, match="return_logits needs token-id prompts"):
        rt.generate("a", 3, return_logits=True)


def test_a_closed_text_stream_frees_the_runtime(rt):
    pieces = rt.stream("Return the ", 20, n_loops=2, stop_ids=[])
    first = next(pieces)
    assert isinstance(first, str) and first
    pieces.close()
    assert isinstance(rt.generate("Return the ", 3, n_loops=2), str)


def test_a_tokenizer_smaller_than_the_model_draws_only_ids_it_can_decode():
    """Ids beyond the tokenizer's vocabulary have no text: text generation never draws them
    (the id path still may), instead of failing mid-stream in the tokenizer."""
    cfg = dataclasses.replace(MythosConfig.from_preset("tiny_gqa"), vocab_size=300)
    torch.manual_seed(5)
    model = OpenMythos(cfg)
    with torch.no_grad():  # make the ids beyond the tokenizer the model's favourites
        model.head.weight[259:] *= 40.0
    rt = mythos_rt.compile(model, backend="torch", max_batch_size=2, max_seq_len=48,
                           tokenizer="byte")
    ids = torch.tensor([rt.tokenizer.encode("Hello")])
    assert int(rt.generate(ids, 6)[0, 5:].max()) >= 259  # the premise: the id path draws them
    for kwargs in ({}, {"temperature": 1.0, "seed": 3}):
        texts = rt.generate(["Hello", "a"], 6, stop_ids=[], **kwargs)
        assert all(isinstance(t, str) for t in texts)
        assert "".join(rt.stream("Hello", 6, stop_ids=[], **kwargs)) == texts[0]
