"""Tensor/expert parallelism on 2 and 3 local gloo ranks vs the single-process runtime."""

import dataclasses

import pytest
import torch

import mythos_rt
from mythos_rt import parallel
from mythos_rt.checkpoint import load_checkpoint, save_checkpoint
from mythos_rt.config import MythosConfig
from mythos_rt.passes import run_passes
from mythos_rt.reference import OpenMythos
from mythos_rt.slices import bytes_read
from mythos_rt.testing import TOL_FP32_TORCH, assert_rel_close, spread_act_halting
from mythos_rt.trace import build_graph
from mythos_rt.weights import materialize

from .launch import run_ranks

# Odd sizes on purpose: experts (6, 5), heads (4 MLA heads over 3 ranks), KV heads (3 over
# 2 ranks) and the vocabulary (97, 101) do not divide evenly by the world size.
CONFIGS = {
    "mla": lambda: MythosConfig.from_preset("tiny_mla"),
    "gqa": lambda: dataclasses.replace(MythosConfig.from_preset("tiny_gqa"), n_kv_heads=3),
}


def _checkpoint(name, directory):
    cfg = CONFIGS[name]()
    ids = torch.randint(0, cfg.vocab_size, (3, 7))
    model = OpenMythos(cfg).eval()
    spread_act_halting(model, ids)
    save_checkpoint(directory, cfg, model.state_dict())
    ragged = [ids[0, :2], ids[1], ids[2, :5]]
    return dict(path=str(directory), ids=ids, ragged=ragged, n_loops=cfg.max_loop_iters + 1,
                new=3)


def _reference(case):
    rt = mythos_rt.compile(case["path"], backend=case["backend"], max_batch_size=4, chunk=4,
                           max_loops=case["n_loops"], device="cpu",
                           overrides=case.get("overrides"))
    return {"forward": rt.forward(case["ids"], n_loops=case["n_loops"]),
            "generate": rt.generate(case["ids"], case["new"], n_loops=case["n_loops"],
                                    return_logits=True),
            "ragged": rt.generate(case["ragged"], case["new"], n_loops=case["n_loops"])}


# Each world size runs both attention types, one backend each (the other in the other world).
RUNS = {2: {"mla": "torch", "gqa": "cpu"}, 3: {"mla": "cpu", "gqa": "torch"}}


@pytest.mark.parametrize("world", sorted(RUNS))
def test_ranks_match_single_process(world, tmp_path):
    cases = {}
    for name, backend in RUNS[world].items():
        cases[name] = dict(_checkpoint(name, tmp_path / name), backend=backend)
    cases["mla"]["save"] = str(tmp_path / "artifact")  # saved per rank, then reloaded
    if world == 3:  # replaces the shares of another world size there
        for r in range(2):
            (tmp_path / "artifact" / f"rank{r}of2").mkdir(parents=True)
        cases["mla"]["overwrite"] = True
    # then rank 1's share damaged: its own error there, a ParallelError naming it on rank 0
    broken = dict(cases["mla"], load=cases["mla"]["save"], break_rank=1)
    (tmp_path / "partial" / f"rank0of{world}").mkdir(parents=True)  # the others never saved
    partial = dict(broken, load=str(tmp_path / "partial"), break_rank=None)
    results, codes = run_ranks(world, dict(cases, broken=broken, partial=partial), tmp_path,
                               deadline_s=300)  # a hang guard: 3 ranks on 2 busy cores
    assert codes == [0] * world, codes
    _check_ranks(cases, results, world)
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == [
        f"rank{r}of{world}" for r in range(world)]
    assert "ArtifactError" in results[1]["broken"].get("error", ""), results[1]["broken"]
    for r in (0, *range(2, world)):
        error = results[r]["broken"].get("error", "")
        assert error.startswith(f"ParallelError: loading {tmp_path / 'artifact'} failed on "
                                "rank 1: ArtifactError: ") and "config.json" in error, error
    for res in results:  # the same error on every rank
        assert (f"rank{world - 1}of{world} are missing or incomplete (save it again from "
                f"all {world} ranks)") in res["partial"].get("error", ""), res["partial"]


def test_lazy_depth_on_ranks_matches_single_process(tmp_path):
    """Every rank reads the same (replicated) halting flags, so the ranks choose the same
    passes; lazy depth stays exact against the single-process eager runtime."""
    case = dict(_checkpoint("mla", tmp_path / "m"), backend="cpu", act_mode="lazy")
    results, codes = run_ranks(2, {"lazy": case}, tmp_path)
    assert codes == [0, 0], codes
    _check_ranks({"lazy": case}, results, 2)


def test_triton_moe_shards_on_ranks_match_single_process(tmp_path):
    """The Triton MoE runs each rank's expert shard (Triton's interpreter here): 5 experts
    and 4 shared slots over 2 ranks match the single-process runtime's Triton MoE."""
    case = dict(_checkpoint("gqa", tmp_path / "g"), backend="torch",
                overrides={"moe_ffn": "triton"}, new=2, n_loops=2)  # the interpreter is slow
    results, codes = run_ranks(2, {"triton": case}, tmp_path, deadline_s=300)
    assert codes == [0, 0], codes
    _check_ranks({"triton": case}, results, 2)


def _check_ranks(cases: dict, results: list, world: int) -> None:
    for name, case in cases.items():
        if "break_rank" in case:  # the cases that fail
            continue
        ref = _reference(case)
        for r, res in enumerate(results):
            got, what = res[name], f"{name}/{case['backend']} rank {r} of {world}"
            assert "error" not in got, f"{what}: {got['error']}"
            assert_rel_close(got["forward"], ref["forward"], TOL_FP32_TORCH, f"{what} prefill")
            assert_rel_close(got["generate"][1], ref["generate"][1], TOL_FP32_TORCH,
                             f"{what} decode logits")
            assert torch.equal(got["generate"][0], ref["generate"][0]), what
            assert all(torch.equal(a, b) for a, b in zip(got["ragged"], ref["ragged"])), what
            if "save" in case:
                assert torch.equal(got["reloaded"], ref["generate"][0]), what


def test_world_size_mismatch_is_an_error_on_every_rank(tmp_path):
    case = dict(_checkpoint("mla", tmp_path / "m"), backend="torch", tensor_parallel=2)
    for r in range(2):  # an artifact saved by 2 ranks (load stops before reading it)
        (tmp_path / "a" / f"rank{r}of2").mkdir(parents=True)
    load = dict(case, load=str(tmp_path / "a"))
    results, codes = run_ranks(3, {"compile": case, "load": load}, tmp_path, deadline_s=60)
    assert codes == [0] * 3, codes
    for r, res in enumerate(results):
        assert ("tensor_parallel=2 but the process group has 3 ranks"
                in res["compile"].get("error", "")), (r, res["compile"])
        assert "saved for tensor_parallel=2 but the process group has 3" in res["load"].get(
            "error", ""), (r, res["load"])


def test_a_dead_rank_is_an_error_not_a_hang(tmp_path):
    case = dict(_checkpoint("gqa", tmp_path / "g"), backend="torch", die=1)
    results, codes = run_ranks(2, {"g": case}, tmp_path, deadline_s=90,
                               collective_timeout_s=15)
    assert codes[1] == 3
    assert codes[0] is not None, "rank 0 hung past the deadline"
    error = results[0]["g"].get("error", "")
    assert "CollectiveError" in error and "another rank died, left or timed out" in error, error


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_rank_reads_only_its_slices(name, tmp_path):
    """Materializing a rank's share reads the replicated tensors and 1/N of the split ones;
    the ranks' slices of each split tensor partition it (no byte read twice)."""
    case = _checkpoint(name, tmp_path)
    cfg, lazy = load_checkpoint(case["path"], lazy=True)
    g = run_passes(build_graph(cfg))
    whole = _read(lambda: materialize(g, lazy, torch.device("cpu")))
    world = 3
    shares = [_read(lambda: materialize(parallel.shard(g, world, r), lazy,
                                        torch.device("cpu"))) for r in range(world)]
    replicated = (sum(shares) - whole) / (world - 1)
    assert replicated < 0.25 * whole
    for r, got in enumerate(shares):
        assert got - replicated <= 1.25 * (whole - replicated) / world, (r, got, whole)


def _read(fn) -> int:
    before = bytes_read()
    fn()
    return bytes_read() - before


def test_the_split_is_recorded_in_the_ir():
    cfg = CONFIGS["mla"]()
    g = parallel.shard(run_passes(build_graph(cfg)), 3, 2)
    assert g.attrs["parallel"] == {"world_size": 3, "rank": 2}
    kinds = [op.kind for op in g.walk()]
    # embed, prelude attn + ffn, loop attn + moe, coda attn + ffn: one reduction each
    assert kinds.count("all_reduce") == 7 and kinds.count("all_gather") == 1
    attn = next(op for op in g.walk() if op.kind == "mla_attention")
    assert attn.attrs["shard"]["heads"] == [3, 4]  # 4 heads over 3 ranks: 2, 1, 1
    moe = next(op for op in g.walk() if op.kind == "moe")
    assert moe.attrs["shard"]["experts"] == [4, 6]
    assert "all_reduce" in g.to_text()


def test_too_few_heads_for_the_ranks_is_a_clear_error():
    cfg = CONFIGS["gqa"]()  # 3 KV heads
    with pytest.raises(parallel.ParallelError, match="n_kv_heads=3 cannot be split over 4"):
        parallel.shard(run_passes(build_graph(cfg)), 4, 0)


def test_tensor_parallel_without_a_launcher_names_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(parallel.ParallelError, match="torchrun --nproc-per-node 2"):
        mythos_rt.compile(OpenMythos(CONFIGS["mla"]()), tensor_parallel=2, device="cpu")


def test_share_is_contiguous_and_balanced():
    for n in range(1, 12):
        for world in range(1, 5):
            ranges = [parallel.share(n, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_inspect_shows_a_ranks_split(tmp_path, capsys):
    from mythos_rt.cli import main
    case = _checkpoint("mla", tmp_path)
    assert main(["inspect", case["path"], "--tensor-parallel", "3", "--rank", "1"]) == 0
    text = capsys.readouterr().out
    assert "parallel={'world_size': 3, 'rank': 1}" in text
    assert "= all_reduce(" in text and "= all_gather(" in text
    assert "shard={'split': 'heads', 'heads': [2, 3], 'of': 4}" in text


def test_cli_nproc_launches_torchrun_and_rank_0_prints(tmp_path):
    """``generate --nproc 2`` runs torchrun with 2 gloo ranks; the output is the
    single-process runtime's greedy ids, printed once."""
    import subprocess
    import sys

    from .launch import REPO
    case = _checkpoint("gqa", tmp_path)
    prompts = [[5, 6, 7], [8, 9]]
    cmd = [sys.executable, "-m", "mythos_rt.cli", "generate", case["path"], "--device", "cpu",
           "--max-new-tokens", "3", "--nproc", "2"]
    for p in prompts:
        cmd += ["--prompt-ids", " ".join(map(str, p))]
    env = dict(__import__("os").environ, MYTHOS_RT_DIST_TIMEOUT="30", PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rt = mythos_rt.compile(case["path"], device="cpu", max_batch_size=2)
    want = [" ".join(map(str, row.tolist())) for row in rt.generate(
        [torch.tensor(p) for p in prompts], 3)]
    assert done.stdout.split("\n")[-3:-1] == want and done.stdout.count("\n") == 2, done.stdout


def test_cli_compiles_per_rank_artifacts_inspects_and_generates_from_them(tmp_path, capsys):
    """``compile --nproc 2`` saves rank{r}of2/; ``inspect`` shows each rank's share as a
    table (a missing share: one line, exit 2); ``generate --nproc 2`` of the artifact
    prints the single-process runtime's greedy ids."""
    import os
    import subprocess
    import sys

    from mythos_rt.cli import main

    from .launch import REPO
    case = _checkpoint("mla", tmp_path / "m")
    art = tmp_path / "art"
    env = dict(os.environ, MYTHOS_RT_DIST_TIMEOUT="30", PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "mythos_rt.cli"]
    done = subprocess.run([*cli, "compile", case["path"], "-o", str(art), "--device", "cpu",
                           "--max-batch-size", "2", "--nproc", "2"],
                          capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"saved {art} (one rank{{r}}of2/ directory per rank)")
    assert sorted(p.name for p in art.iterdir()) == ["rank0of2", "rank1of2"]

    assert main(["inspect", str(art)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == (f"tensor-parallel artifact {art}: 2 ranks, rank r loads "
                        "rank{r}of2/ (--rank R prints rank R's IR)")
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["embed"][-2:] == ["0-48", "49-96"]  # 97 rows: 49 per rank
    assert rows["prelude.0.attn"][-2:] == ["0-1", "2-3"]  # 4 query heads
    assert rows["recurrent.block.ffn"][-6:] == ["0-2", "+", "0", "3-5", "+", "1"]
    assert main(["inspect", str(art), "--rank", "1"]) == 0
    assert "parallel={'world_size': 2, 'rank': 1}" in capsys.readouterr().out

    cmd = [*cli, "generate", str(art), "--max-new-tokens", "3", "--nproc", "2",
           "--device", "cpu", "--prompt-ids", "5 6 7", "--prompt-ids", "8 9"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rt = mythos_rt.compile(case["path"], device="cpu", max_batch_size=2)
    want = [" ".join(map(str, row.tolist())) for row in rt.generate(
        [torch.tensor([5, 6, 7]), torch.tensor([8, 9])], 3)]
    assert done.stdout.splitlines() == want, done.stdout

    (art / "rank1of2" / "manifest.json").unlink()
    assert main(["inspect", str(art)]) == 2
    err = capsys.readouterr().err
    assert err == (f"mythos-rt inspect: error: {art}: an artifact saved for tensor_parallel=2 "
                   "but rank1of2 is missing or incomplete (save it again from all 2 ranks)\n")
