"""Every mythos-rt command through a subprocess, including error exits (one line, no traceback)."""

import subprocess
import sys

import pytest

import mythos_rt
from mythos_rt.cli import main
from mythos_rt.demo import write_demo_checkpoint


def cli(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "mythos_rt.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt"))


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
])
def test_user_errors_are_one_line(ckpt, art, tmp_path, args, message, capsys):
    fill = {"art": art, "ckpt": ckpt, "tmp": tmp_path}
    assert main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("mythos-rt ")


def test_user_error_exit_through_a_real_process(art):
    proc = cli("generate", art, "--prompt-ids", "1", "--max-new-tokens", "1000", ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("mythos-rt generate: error: prompt length 1 + max_new_tokens "
                                   "1000 = 1001 exceeds max_seq_len=64")


def test_demo_runs(tmp_path):
    out = cli("demo", "--out", tmp_path / "d", "--new-tokens", 3).stdout
    assert "identical ids" in out and "max |logits - reference|" in out


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
