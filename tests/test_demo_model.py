"""The shipped demo model (scripts/train_demo_model.py): both formats load, compile, and
the compiled runtime's greedy text equals the eager reference's."""

import math
from pathlib import Path

import pytest
import torch

import mythos_rt
from mythos_rt.checkpoint import load_checkpoint
from mythos_rt.reference import OpenMythos
from mythos_rt.testing import TOL_FP32_TORCH, assert_rel_close
from mythos_rt.tokenizer import ByteTokenizer, check_vocab, find_tokenizer
from tests.upstream import upstream_main

ASSET = Path(__file__).resolve().parent.parent / "mythos_rt" / "assets" / "docstrings_lm"
UPSTREAM = ASSET / "training_checkpoint.pt"
PROMPTS = ["Return the number of ", "Raise ValueError if "]


@pytest.fixture(scope="module")
def reference():
    cfg, sd = load_checkpoint(ASSET)
    model = OpenMythos(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def test_both_formats_hold_the_same_model_and_a_byte_tokenizer():
    cfg, sd = load_checkpoint(ASSET)
    up_cfg, up_sd = load_checkpoint(UPSTREAM)
    assert up_cfg == cfg and sorted(up_sd) == sorted(sd)
    for name, tensor in sd.items():
        assert torch.equal(up_sd[name], tensor), name
    tok = find_tokenizer(ASSET)
    assert tok == ByteTokenizer() and check_vocab(tok, cfg.vocab_size) is tok


def test_training_checkpoint_is_upstreams_format():
    """The real open_mythos package unpickles the file and runs the same model."""
    up = upstream_main()
    ckpt = torch.load(UPSTREAM, map_location="cpu", weights_only=False)
    assert sorted(ckpt) == ["cfg", "model", "optimizer", "step", "vocab_size"]
    assert isinstance(ckpt["cfg"], up.MythosConfig) and ckpt["vocab_size"] == 259
    model = up.OpenMythos(ckpt["cfg"]).eval()
    model.load_state_dict(ckpt["model"], strict=True)
    ours = OpenMythos(load_checkpoint(UPSTREAM)[0]).eval()
    ours.load_state_dict(load_checkpoint(UPSTREAM)[1], strict=True)
    ids = torch.tensor([ByteTokenizer().encode("Return a new list ")])
    with torch.no_grad():
        assert_rel_close(ours(ids, n_loops=3), model(ids, n_loops=3), TOL_FP32_TORCH)


@pytest.mark.parametrize("source", ["safetensors", "training_checkpoint"])
def test_compiled_greedy_text_equals_the_reference(reference, source):
    rt = mythos_rt.compile(ASSET if source == "safetensors" else UPSTREAM, device="cpu",
                           max_batch_size=len(PROMPTS), max_loops=12)
    tok = ByteTokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    for n_loops in (2, 12):  # 12 > max_loop_iters = 8: depth extrapolation
        got = rt.generate([torch.tensor(p) for p in prompts], 16, n_loops=n_loops,
                          stop_ids=[tok.eos_id])
        for p, row in zip(prompts, got):
            want = reference.generate(torch.tensor([p]), 16, n_loops=n_loops, temperature=0,
                                      stop_ids=[tok.eos_id])[0]
            assert torch.equal(row, want), (n_loops, tok.decode(p))


def test_the_model_learned_text_and_depth_pays(reference):
    """Bits per byte of an English sentence: far below 8 (uniform), and 4 loops beat 1
    (held-out: 2.88 -> 2.76 bits/byte, bench/results/2026-12-01-demo-model.json)."""
    text = ("Return a new list containing all items from the iterable in ascending order. "
            "A custom key function can be supplied to customize the sort order.")
    ids = torch.tensor([ByteTokenizer().encode(text)])
    bits = {}
    with torch.no_grad():
        for n in (1, 4):
            logits = reference(ids[:, :-1], n_loops=n)[0]
            bits[n] = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item() / math.log(2)
    assert bits[4] < 3.2 and bits[4] < bits[1] - 0.05, bits
