"""Every mythos-rt command through a subprocess, including error exits (one line, no traceback)."""

import subprocess
import sys

import pytest
import torch

import mythos_rt
from mythos_rt.checkpoint import save_checkpoint
from mythos_rt.cli import main
from mythos_rt.config import MythosConfig
from mythos_rt.reference import OpenMythos
from mythos_rt.testing import spread_act_halting


def cli(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "mythos_rt.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A seeded small_mla checkpoint (no tokenizer), ACT tuned to halt at different loops."""
    cfg = MythosConfig.from_preset("small_mla")
    torch.manual_seed(0)
    model = OpenMythos(cfg).eval()
    with torch.no_grad():  # N(0, 0.02) weights make greedy decoding repeat one token
        model.embed.weight.normal_(0.0, 0.5)
    spread_act_halting(model, torch.randint(0, cfg.vocab_size, (2, 8)), seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, model.state_dict())


@pytest.fixture(scope="module")
def art(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("art") / "art"
    mythos_rt.compile(ckpt, max_seq_len=64).save(d)
    return d


def test_help_on_every_command(capsys):
    assert "usage: mythos-rt" in cli("--help").stdout
    for cmd in ("compile", "generate", "inspect", "demo"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0 and f"usage: mythos-rt {cmd}" in capsys.readouterr().out


def test_compile_generate_inspect(ckpt, tmp_path, capsys):
    art = tmp_path / "art"
    out = cli("compile", ckpt, "-o", art, "--max-batch-size", 2, "--max-seq-len", 64)
    assert "saved" in out.stdout and "packing weights" in out.stderr
    assert (art / "manifest.json").is_file()
    gen = cli("generate", art, "--prompt-ids", "1 2 3", "--prompt-ids", "4,5",
              "--max-new-tokens", 3, "--n-loops", 2).stdout.splitlines()
    assert [len(line.split()) for line in gen] == [6, 5]
    assert gen[0].startswith("1 2 3 ") and gen[1].startswith("4 5 ")
    streamed = cli("generate", art, "--prompt-ids", "1 2 3", "--prompt-ids", "4,5",
                   "--max-new-tokens", 3, "--n-loops", 2, "--stream").stdout.splitlines()
    assert streamed[-2:] == gen and len(streamed) == 5
    direct = cli("generate", ckpt, "--prompt-ids", "1 2 3", "--max-new-tokens", 3,
                 "--n-loops", 2).stdout.splitlines()
    assert direct == gen[:1]
    for args, text in [([ckpt], "loop("), ([art], "loop_epilogue"),
                       ([ckpt, "--after-pass", "fuse_recurrent_step"], "loop_epilogue")]:
        assert main(["inspect", *map(str, args)]) == 0 and text in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["generate", "{art}", "--prompt-ids", "1 x"], "expected integers"),
    (["generate", "{art}", "--prompt-ids", "100000"], "outside the vocabulary"),
    (["generate", "{art}", "--prompt-ids", "1", "--n-loops", "0"], "n_loops must be"),
    (["generate", "{tmp}/missing", "--prompt-ids", "1"], "no such file or directory"),
    (["compile", "{tmp}/missing", "-o", "{tmp}/x"], "no such file or directory"),
    (["compile", "{ckpt}", "-o", "{art}"], "is not empty"),
    (["inspect", "{ckpt}", "--after-pass", "nope"], "unknown pass 'nope'"),
    (["generate", "{art}", "--prompt-ids", "1", "--device", "bogus"], "invalid device 'bogus'"),
    (["generate", "{art}", "--prompt-ids", "1", "--seed", str(2**64)], "--seed 18446744073709551616"),
    (["generate", "{art}", "--prompt-ids", "1", "--stop-ids", "3", str(2**64)],
     "--stop-ids 18446744073709551616: must be in [0, 9223372036854775808)"),
    (["generate", "{art}", "--prompt-ids", f"1 {2**64}"],
     "token id 18446744073709551616 in input_ids[0] is outside the vocabulary"),
    (["generate", "{art}", *["--prompt-ids", "1"] * 9],
     "9 prompts exceed the 8 the artifact {art} was compiled for: recompile it with "
     "mythos-rt compile --max-batch-size 9"),
    (["generate", "{art}", "--prompt-ids", "1", "--n-loops", "99"],
     "recompile it with mythos-rt compile --max-loops 99"),
    (["generate", "{art}", "--prompt-ids", "1", "--device", "cuda"], "no CUDA device"),
    (["compile", "{ckpt}", "-o", "{tmp}/y", "--max-batch-size", str(10**9)],
     "max_batch_size=1000000000 is larger than mythos-rt supports"),
    (["compile", "{ckpt}", "-o", "{ckpt}/config.json"], "exists and is not a directory"),
    (["compile", "{ckpt}", "-o", "{ckpt}/config.json/sub"], "cannot write an artifact at"),
    (["compile", "{ckpt}", "-o", "{tmp}/tp", "--tensor-parallel", "2"],
     "tensor_parallel=2 needs one process per rank: launch with 'torchrun --nproc-per-node 2"),
    (["compile", "{ckpt}", "-o", "{tmp}/tp", "--nproc", "0"],
     "--nproc must be a positive integer, got 0"),
    (["demo", "--new-tokens", "0"], "new_tokens must be a positive integer, got '0'"),
    (["demo", "--out", "{ckpt}"], "holds files that are not the demo checkpoint's"),
])
def test_user_errors_are_one_line(ckpt, art, tmp_path, args, message, capsys):
    fill = {"art": art, "ckpt": ckpt, "tmp": tmp_path}
    if args[0] == "demo":  # the demo's own files are fine; foreign ones are refused
        (ckpt / "notes.txt").write_text("mine")
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mythos-rt ")
    if "-o" in args and "{ckpt}/" in args[-1]:  # a bad destination is refused before compiling
        assert "loading" not in err
    (ckpt / "notes.txt").unlink(missing_ok=True)


def test_user_error_exit_through_a_real_process(art):
    proc = cli("generate", art, "--prompt-ids", "1", "--max-new-tokens", "1000", ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("mythos-rt generate: error: prompt length 1 + max_new_tokens "
                                   "1000 needs 1000 cache positions (the last new token is not "
                                   "cached), which exceeds max_seq_len=64")


def test_demo_runs(tmp_path):
    out = cli("demo", "--out", tmp_path / "d", "--new-tokens", 12).stdout
    for text in ["'Return the number of ' -> '", "Held-out bits/byte", "n_loops=1: ",
                 "n_loops=8: ", "ACT halting", "never: ", "max |logits - reference|",
                 "greedy ids identical over 12 tokens", "tokens/s"]:
        assert text in out, out
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "config.json", "model.safetensors", "mythos_tokenizer.json"]


def test_demo_replaces_only_its_own_files_unless_forced(tmp_path):
    from mythos_rt.demo import place_demo_checkpoint
    d = place_demo_checkpoint(tmp_path / "d")
    own = {p.name: p.read_bytes() for p in d.iterdir()}
    assert place_demo_checkpoint(d) == d  # the demo's own bytes: rewritten without --force
    (d / "config.json").write_text("{}")  # a different checkpoint's config
    with pytest.raises(mythos_rt.InputError, match=r"\(config.json\); .*--force"):
        place_demo_checkpoint(d)
    assert (d / "config.json").read_text() == "{}"
    (d / "notes.txt").write_text("keep")
    place_demo_checkpoint(d, overwrite=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == dict(own, **{"notes.txt": b"keep"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging left beside


def test_generate_compiles_a_checkpoint_to_fit_the_request(ckpt):
    out = cli("generate", ckpt, *["--prompt-ids", "1 2"] * 9, "--max-new-tokens", 1,
              "--n-loops", 9).stdout.splitlines()
    assert len(out) == 9 and len(set(out)) == 1 and out[0].startswith("1 2 ")


def test_backend_choices_come_from_the_registry(capsys):
    from mythos_rt.ops.registry import BACKENDS
    for cmd in ("compile", "demo", "profile"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "{auto," + ",".join(BACKENDS) + "}" in capsys.readouterr().out
    assert ", ".join(map(repr, ("auto", *BACKENDS))) in mythos_rt.compile.__doc__


def test_inspect_shows_the_pipeline_compile_runs(ckpt, capsys):
    from mythos_rt import passes
    from mythos_rt.trace import trace
    graph, _, _ = trace(ckpt)
    seen = {}
    final = passes.run_passes(graph, dtype="float16", after=seen.__setitem__)
    for name in [*seen, "all"]:
        assert main(["inspect", str(ckpt), "--after-pass", name, "--dtype", "float16"]) == 0
        want = final if name == "all" else seen[name]
        assert capsys.readouterr().out == want.to_text()


def test_bench_outside_a_source_checkout_says_so(monkeypatch, tmp_path, capsys):
    from mythos_rt import cli as cli_module
    monkeypatch.setattr(cli_module, "__file__", str(tmp_path / "site-packages" / "mythos_rt" / "cli.py"))
    assert main(["bench", "--preset", "tiny_mla", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a source checkout" in err[0]


def test_generate_text_prompts(tmp_path):
    from tests.test_demo_model import ASSET
    rt = mythos_rt.compile(ASSET, device="cpu", max_batch_size=2, max_seq_len=64)
    prompts = ["Return the ", "def f(x):\n    \"\"\""]
    want = rt.generate(prompts, 9, n_loops=2)
    out = cli("generate", ASSET, "--prompt", prompts[0], "--prompt", prompts[1],
              "--max-new-tokens", 9, "--n-loops", 2).stdout
    assert out == "\n\n".join(p + t for p, t in zip(prompts, want)) + "\n"
    rt.save(tmp_path / "art")
    streamed = cli("generate", tmp_path / "art", "--prompt", prompts[0], "--max-new-tokens", 9,
                   "--n-loops", 2, "--stream").stdout
    assert streamed == prompts[0] + want[0] + "\n"
    cut = want[0][2:4]
    stopped = cli("generate", tmp_path / "art", "--prompt", prompts[0], "--max-new-tokens", 9,
                  "--n-loops", 2, "--stop", cut).stdout
    assert stopped == prompts[0] + want[0][:want[0].index(cut)] + "\n"


def test_text_generation_errors_are_one_line(ckpt, art, tmp_path):
    from tests.test_tokenizer import make_hf_tokenizer
    for args, message in [
            ([art, "--prompt", "hi"], "this model has no tokenizer for --prompt text"),
            ([art, "--prompt", "hi", "--prompt-ids", "1"], "give --prompt TEXT"),
            ([art], "give --prompt TEXT"),
            ([art, "--prompt-ids", "1", "--stop", "x"], "--stop strings need --prompt text"),
            ([art, "--prompt", "hi", "--tokenizer", tmp_path / "none.json"],
             "no such tokenizer file"),
            ([art, "--prompt", "hi", "--tokenizer", make_hf_tokenizer(tmp_path / "big", 600)],
             "vocabulary of 600 ids but the model's vocab_size is 512")]:
        proc = cli("generate", *args, ok=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_the_tokenizer_flag_gives_a_tokenizer_less_model_text(art):
    out = cli("generate", art, "--prompt", "hi", "--tokenizer", "byte", "--max-new-tokens", 3,
              "--n-loops", 2, "--stop-ids").stdout
    assert out.startswith("hi") and out.endswith("\n")
