"""Runtime.save / mythos_rt.load: identical outputs; corruption and version errors."""

import dataclasses
import hashlib
import json

import pytest
import torch

import mythos_rt
from mythos_rt.artifact import ArtifactError
from mythos_rt.config import MythosConfig
from mythos_rt.errors import InputError
from mythos_rt.reference import OpenMythos
from mythos_rt.tokenizer import ByteTokenizer
from tests.test_tokenizer import make_hf_tokenizer


@pytest.fixture
def saved(tmp_path):
    cfg = MythosConfig.from_preset("tiny_gqa")
    rt = mythos_rt.compile(OpenMythos(cfg), backend="torch", max_batch_size=2, max_seq_len=32)
    rt.save(tmp_path / "art")
    return rt, tmp_path / "art"


def test_round_trip_gives_identical_outputs(saved):
    rt, d = saved
    loaded = mythos_rt.load(d)
    assert "trace_s" not in loaded.timings and "load_s" in loaded.timings  # no re-tracing
    assert loaded.max_seq_len == 32 and loaded.max_batch_size == 2 and loaded.config == rt.config
    ids = torch.randint(0, rt.config.vocab_size, (2, 5))
    assert torch.equal(loaded.forward(ids, n_loops=2), rt.forward(ids, n_loops=2))
    assert torch.equal(loaded.generate(ids, 4, n_loops=3), rt.generate(ids, 4, n_loops=3))
    files = json.loads((d / "manifest.json").read_text())
    assert files["aliases"] == {"head.weight": "embed.weight"}  # tied weights stored once


def test_corrupted_weights_are_refused(saved):
    _, d = saved
    data = bytearray((d / "weights.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (d / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors: corrupted"):
        mythos_rt.load(d)


def test_version_mismatch_and_missing_files(saved):
    _, d = saved
    body = (d / "manifest.json").read_bytes()
    (d / "manifest.json").write_text(json.dumps(dict(json.loads(body), format_version=99)))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        mythos_rt.load(d)
    (d / "manifest.json").write_bytes(body)
    (d / "graph.json").unlink()
    with pytest.raises(ArtifactError, match="graph.json: missing from the artifact"):
        mythos_rt.load(d)
    with pytest.raises(ArtifactError, match="not a mythos-rt artifact"):
        mythos_rt.load(d.parent)


# ---- hostile and careless files -----------------------------------------------------------

def reseal(d):
    """Rehash every file and the manifest, as a careful editor of an artifact would."""
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest()
                         for f in manifest["files"]}
    body = json.dumps(manifest, indent=1) + "\n"
    (d / "manifest.json").write_text(body)
    (d / "manifest.sha256").write_text(hashlib.sha256(body.encode()).hexdigest() + "\n")


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def test_editing_the_manifest_is_detected(saved):
    rt, d = saved
    edit_json(d / "manifest.json", lambda m: m["aliases"].update({"head.weight": "norm.weight"}))
    with pytest.raises(ArtifactError, match="manifest.json: edited or corrupted"):
        mythos_rt.load(d)
    (d / "manifest.sha256").unlink()
    with pytest.raises(ArtifactError, match="manifest.sha256: missing"):
        mythos_rt.load(d)
    reseal(d)  # even a consistently rehashed alias must name a missing and a stored weight
    edit_json(d / "manifest.json", lambda m: m["aliases"].update({"head.weight": "nowhere"}))
    reseal(d)
    with pytest.raises(ArtifactError, match="alias 'head.weight' -> 'nowhere'"):
        mythos_rt.load(d)


@pytest.mark.parametrize("where", ["config.json", "graph.json", "graph attrs", "both"])
def test_every_copy_of_the_config_must_agree(saved, where):
    _, d = saved

    def vocab(c):
        c["vocab_size"] = 400
    if where in ("config.json", "both"):
        edit_json(d / "config.json", vocab)
    if where in ("graph.json", "both"):
        edit_json(d / "graph.json", lambda g: vocab(g["graph"]["attrs"]["config"]))
    if where == "graph attrs":
        def threshold(g):
            loop = next(op for op in g["graph"]["ops"] if op["kind"] == "loop")
            loop["attrs"]["threshold"] = 0.5
        edit_json(d / "graph.json", threshold)
    reseal(d)
    message = {"config.json": "disagree \\(on vocab_size\\)", "graph.json": "disagree",
               "graph attrs": "threshold=0.5, config.json says act_threshold=0.99",
               "both": "embedding \\(101, 48\\) does not match"}[where]
    with pytest.raises(ArtifactError, match=message):
        mythos_rt.load(d)


def test_hostile_options_are_refused(saved):
    _, d = saved
    edit_json(d / "options.json", lambda o: o.update(max_batch_size=10**12))
    reseal(d)
    with pytest.raises(ArtifactError, match="options.json: max_batch_size=1000000000000 is larger"):
        mythos_rt.load(d)


def _triton_runtime():
    """A runtime whose MoE runs on the Triton backend (lowered only: nothing runs here)."""
    cfg = MythosConfig.from_preset("tiny_mla")
    return mythos_rt.compile(OpenMythos(cfg), backend="triton", max_batch_size=2, max_seq_len=16,
                             chunk=8)


def test_tuning_is_the_models_own_and_never_reaches_the_cache(tmp_path, monkeypatch):
    from mythos_rt.ops.moe import PackedMoE
    from mythos_rt.triton_kernels import moe as tmoe
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path / "cache"))
    rt = _triton_runtime()
    packed = next(a for a in rt._low.args.values() if isinstance(a, PackedMoE))
    ours = tmoe.config_key(16, packed, rt.dtype, rt.device)
    other = ours.replace("|D48|", "|D64|")  # another model's entry
    entry = dict(tmoe.INTERPRETER_CONFIG.to_dict(), _ms=0.5)
    cache = tmp_path / "cache" / "autotune" / "moe.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({ours: entry, other: entry,
                                 "junk": {"num_warps": 1024}}))  # invalid entries stay out too
    before = cache.read_bytes()
    rt.save(tmp_path / "art")
    assert json.loads((tmp_path / "art" / "autotune" / "moe.json").read_text()) == {ours: entry}
    cache.unlink()
    loaded = mythos_rt.load(tmp_path / "art")
    assert loaded.tuning == {ours: entry} and loaded._low.buffers.workspaces["recurrent.block.ffn"].tuned == {ours: entry}
    assert not cache.exists()  # loading wrote nothing outside the artifact
    cache.write_text(before.decode())
    mythos_rt.load(tmp_path / "art")
    assert cache.read_bytes() == before
    # a resave of the loaded runtime carries its own table
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "autotune" / "moe.json").read_text()) == {ours: entry}


@pytest.mark.parametrize("change, message", [
    (lambda t, k: t[k].update(num_warps=1024), "num_warps=1024 is not one of the allowed"),
    (lambda t, k: t[k].update(block_n1=48), "block_n1=48 is not one of the allowed"),
    (lambda t, k: t[k].pop("num_stages"), "num_stages=None"),
    (lambda t, k: t[k].update(evil=1), "unknown field"),
    (lambda t, k: t.update({"not a key": t[k]}), "is not a MoE config key"),
    (lambda t, k: t.update({k.replace("|n16|", "|n12|"): t[k]}), "not a power of two"),
    (lambda t, k: t.update({k.replace("|n16|", f"|n{1 << i}|"): t[k] for i in range(1100)}),
     "entries, more than"),
])
def test_tuning_tables_are_validated(tmp_path, monkeypatch, change, message):
    from mythos_rt.triton_kernels import moe as tmoe
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path / "cache"))
    rt = _triton_runtime()
    key = "cpu|n16|D48|I16|E6|k2|S2|float32"
    rt.tuning[key] = tmoe.INTERPRETER_CONFIG.to_dict()
    d = tmp_path / "art"
    rt.save(d)
    assert mythos_rt.load(d).tuning == {key: tmoe.INTERPRETER_CONFIG.to_dict()}
    edit_json(d / "autotune" / "moe.json", lambda t: change(t, key))
    reseal(d)
    with pytest.raises(ArtifactError, match=message):
        mythos_rt.load(d)


def test_unlisted_tuning_files_are_refused(saved):
    _, d = saved
    (d / "autotune").mkdir()
    (d / "autotune" / "moe.json").write_text("{}")
    with pytest.raises(ArtifactError, match="moe.json: not listed in the manifest"):
        mythos_rt.load(d)


# ---- where a save may write, and interrupted saves -----------------------------------------

def test_save_refuses_a_foreign_directory_unless_forced(saved, tmp_path):
    rt, _ = saved
    d = tmp_path / "mine"
    d.mkdir()
    (d / "config.json").write_text("my own")
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and not a mythos-rt artifact .*config.json, "
                                         "notes.txt.*overwrite=True"):
        rt.save(d)
    assert (d / "config.json").read_text() == "my own"
    rt.save(d, overwrite=True)
    assert (d / "notes.txt").read_text() == "keep me"
    mythos_rt.load(d)
    with pytest.raises(InputError, match="exists and is not a directory"):
        rt.save(d / "notes.txt")
    (tmp_path / "empty").mkdir()
    rt.save(tmp_path / "empty")
    rt.save(tmp_path / "empty")  # an artifact is replaced whole
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "config.json", "graph.json", "manifest.json", "manifest.sha256", "options.json",
        "weights.safetensors"]


def _other_runtime():
    cfg = MythosConfig.from_preset("tiny_gqa")
    return mythos_rt.compile(OpenMythos(cfg), backend="torch", max_batch_size=2, max_seq_len=32)


@pytest.mark.parametrize("fail_at", ["weights", "manifest"])
def test_an_interrupted_save_keeps_the_old_artifact(saved, monkeypatch, fail_at):
    import safetensors.torch

    from mythos_rt import artifact
    rt, d = saved
    old = {f.name: f.read_bytes() for f in d.iterdir()}
    new = _other_runtime()
    if fail_at == "weights":
        def crash(tensors, path, metadata=None):
            open(path, "wb").write(b"partial")
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(safetensors.torch, "save_file", crash)
    else:
        write = artifact._write

        def crash(path, data):
            if path.name == "manifest.json":
                raise KeyboardInterrupt
            write(path, data)
        monkeypatch.setattr(artifact, "_write", crash)
    with pytest.raises((OSError, KeyboardInterrupt)):
        new.save(d)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == old
    assert sorted(p.name for p in d.parent.iterdir()) == ["art"]  # nothing left beside it
    ids = torch.randint(0, rt.config.vocab_size, (1, 5))
    assert torch.equal(mythos_rt.load(d).forward(ids), rt.forward(ids))


_SAVER = """
import dataclasses, sys, torch, mythos_rt
from mythos_rt.config import MythosConfig
from mythos_rt.errors import InputError
from mythos_rt.reference import OpenMythos
cfg = dataclasses.replace(MythosConfig.from_preset("tiny_gqa"), vocab_size=30011)
rts = []
for seed in (0, 1):
    torch.manual_seed(seed)
    rts.append(mythos_rt.compile(OpenMythos(cfg), backend="torch", max_batch_size=1,
                                 max_seq_len=16))
rts[0].save(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    i += 1
    rts[i % 2].save(sys.argv[1])
"""


def test_a_killed_save_leaves_the_old_or_the_new_artifact(tmp_path):
    """SIGKILL a process that saves two runtimes in turn onto one path, at random moments."""
    import random
    import signal
    import subprocess
    import sys
    import time

    d = tmp_path / "art"
    embeds = set()
    rng = random.Random()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(d)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rt = mythos_rt.load(d)
        embeds.add(float(rt.weights["embed.weight"][0, 0]))
    assert 1 <= len(embeds) <= 2


def test_the_tuning_schema_covers_every_moe_config_and_accepts_the_tuners_own():
    from dataclasses import fields

    from mythos_rt.triton_kernels import moe as tmoe
    from mythos_rt.tuning import MOE_FIELDS, valid_entries
    assert set(MOE_FIELDS) == {f.name for f in fields(tmoe.MoEConfig)}
    assert set(tmoe.BLOCK_M_CHOICES) == MOE_FIELDS["block_m"]
    proposed = {f"NVIDIA_H200|n{n}|D2048|I1024|E64|k4|S8|{dt}": dict(c.to_dict(), _ms=0.1)
                for dt in ("bfloat16", "float32") for n in (1, 16, 128, 1024, 8192)
                for c in [tmoe.heuristic_config(n, 2048, 1024, 64, 4, 8, getattr(torch, dt))]}
    proposed["cpu|n1|D48|I16|E6|k2|S2|float32"] = tmoe.INTERPRETER_CONFIG.to_dict()
    assert valid_entries(proposed) == proposed


# ---- the tokenizer travels with the artifact ----------------------------------------------

def _byte_vocab_model():
    cfg = dataclasses.replace(MythosConfig.from_preset("tiny_gqa"), vocab_size=263)
    return OpenMythos(cfg)


def test_the_tokenizer_round_trips_and_is_hash_checked(tmp_path):
    rt = mythos_rt.compile(_byte_vocab_model(), backend="torch", max_batch_size=2,
                           max_seq_len=32, tokenizer="byte")
    assert rt.tokenizer == ByteTokenizer()
    rt.save(tmp_path / "art")
    assert "mythos_tokenizer.json" in json.loads((tmp_path / "art" / "manifest.json").read_text())["files"]
    loaded = mythos_rt.load(tmp_path / "art")
    assert loaded.tokenizer == ByteTokenizer()
    edit_json(tmp_path / "art" / "mythos_tokenizer.json", lambda t: t.update(eos_id=3))
    with pytest.raises(ArtifactError, match="mythos_tokenizer.json: corrupted"):
        mythos_rt.load(tmp_path / "art")


def test_a_module_has_no_tokenizer_unless_given_and_an_hf_one_round_trips(tmp_path):
    rt = mythos_rt.compile(_byte_vocab_model(), backend="torch", max_batch_size=2,
                           max_seq_len=32)
    assert rt.tokenizer is None
    rt.save(tmp_path / "plain")
    assert mythos_rt.load(tmp_path / "plain").tokenizer is None
    path = make_hf_tokenizer(tmp_path / "hf", vocab_size=261)
    loaded = mythos_rt.load(tmp_path / "plain", tokenizer=path)  # an override at load
    text = "sum = a+b  # twice"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    loaded.save(tmp_path / "hf_art")
    again = mythos_rt.load(tmp_path / "hf_art")
    assert again.tokenizer.encode(text) == loaded.tokenizer.encode(text)
    (tmp_path / "hf_art" / "tokenizer_config.json").write_text('{"eos_token": "<s>"}')
    with pytest.raises(ArtifactError, match="tokenizer_config.json: not listed"):
        mythos_rt.load(tmp_path / "hf_art")
    with pytest.raises(ValueError, match="vocabulary of 259 ids but the model's vocab_size is 101"):
        mythos_rt.compile(OpenMythos(MythosConfig.from_preset("tiny_gqa")), backend="torch",
                          max_seq_len=32, tokenizer="byte")


def test_a_checkpoint_directory_brings_its_tokenizer(tmp_path):
    model = _byte_vocab_model()
    mythos_rt.save_checkpoint(tmp_path / "ckpt", model.cfg, model.state_dict())
    ByteTokenizer().save(tmp_path / "ckpt")
    rt = mythos_rt.compile(tmp_path / "ckpt", backend="torch", max_batch_size=1, max_seq_len=32)
    assert rt.tokenizer == ByteTokenizer()
