"""Checkpoint formats round-trip; every bad input gives an error that names the problem."""

import json
import pathlib
import pickle
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from mythos_rt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mythos_rt.config import ConfigError, MythosConfig
from mythos_rt.memory import MemoryLimitError
from mythos_rt.reference import OpenMythos
from tests.upstream import upstream_main


@pytest.fixture
def model():
    return OpenMythos(MythosConfig.from_preset("tiny_mla")).eval()


def _same_model(cfg, sd, model):
    loaded = OpenMythos(cfg)
    loaded.load_state_dict(sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids, n_loops=2), model(ids, n_loops=2))


def test_bare_state_dict_with_config_and_without(tmp_path, model):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    cfg, sd = load_checkpoint(path, config=model.cfg)
    _same_model(cfg, sd, model)
    cfg2, _ = load_checkpoint(path, config=model.cfg.to_dict())
    assert cfg2 == model.cfg
    (tmp_path / "c.json").write_text(model.cfg.to_json())
    assert load_checkpoint(path, config=tmp_path / "c.json")[0] == model.cfg
    with pytest.raises(CheckpointError, match="weights.pt: the checkpoint carries no config"):
        load_checkpoint(path)


def test_upstream_training_checkpoint_loads_without_open_mythos(tmp_path, monkeypatch):
    up = upstream_main()
    cfg = MythosConfig.from_preset("tiny_gqa")
    upstream_model = up.OpenMythos(up.MythosConfig(**cfg.to_dict()))
    opt = torch.optim.AdamW(upstream_model.parameters())
    upstream_model(torch.randint(0, cfg.vocab_size, (1, 4))).sum().backward()
    opt.step()
    wrapped = {"_orig_mod." + k: v for k, v in upstream_model.state_dict().items()}
    path = tmp_path / "step_10.pt"
    torch.save({"model": wrapped, "cfg": upstream_model.cfg, "vocab_size": cfg.vocab_size,
                "step": 10, "optimizer": opt.state_dict()}, path)
    # open_mythos is not importable while loading: the config comes from the stand-in.
    monkeypatch.setitem(sys.modules, "open_mythos", None)
    monkeypatch.setitem(sys.modules, "open_mythos.main", None)
    loaded_cfg, sd = load_checkpoint(path)
    assert loaded_cfg == cfg
    assert "optimizer" not in sd and not any(k.startswith("_orig_mod") for k in sd)
    ours = OpenMythos(loaded_cfg).eval()
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        assert torch.equal(ours(ids, n_loops=2), upstream_model.eval()(ids, n_loops=2))


def test_safetensors_directory_files_and_shards(tmp_path, model):
    d = save_checkpoint(tmp_path / "ckpt", model.cfg, model.state_dict())
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    _same_model(*load_checkpoint(d), model)
    _same_model(*load_checkpoint([d / "model.safetensors", d / "config.json"]), model)
    # Sharded: two files and an index; DDP prefixes and no head.weight.
    sd = {("module." + k): v.contiguous() for k, v in model.state_dict().items()
          if k not in ("head.weight", "freqs_cis", "freqs_cis_mla")}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(sharded / fname))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text(model.cfg.to_json())
    _same_model(*load_checkpoint(sharded), model)


def test_fsdp_prefixes_are_stripped(tmp_path, model):
    sd = {k.replace("prelude.", "_fsdp_wrapped_module.prelude._fsdp_wrapped_module."): v
          for k, v in model.state_dict().items()}
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "w.pt")
    _same_model(*load_checkpoint(tmp_path / "w.pt", config=model.cfg), model)


def test_key_and_shape_errors_list_every_tensor(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["norm.weight"]
    sd["extra.weight"] = torch.randn(3)
    sd["recurrent.lora.B"] = torch.randn(5, 48)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "w.pt", config=model.cfg)
    msg = str(info.value)
    assert "missing tensors: norm.weight" in msg
    assert "unexpected tensors: extra.weight" in msg
    assert "recurrent.lora.B: checkpoint (5, 48) vs config (4, 48)" in msg


def test_wrong_config_shape_mismatch(tmp_path, model):
    save_checkpoint(tmp_path / "c", model.cfg, model.state_dict())
    other = MythosConfig.from_preset("tiny_mla")
    other.vocab_size = 100
    with pytest.raises(CheckpointError, match=r"embed.weight: checkpoint \(97, 48\) vs config \(100, 48\)"):
        load_checkpoint(tmp_path / "c", config=other)
    bad = model.cfg.to_dict() | {"dim": 50}
    with pytest.raises(ConfigError, match="dim=50 is not divisible"):
        load_checkpoint(tmp_path / "c", config=bad)


def test_nan_weight_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    sd["recurrent.block.ffn.routed_experts.3.up.weight"] = sd[
        "recurrent.block.ffn.routed_experts.3.up.weight"].clone()
    sd["recurrent.block.ffn.routed_experts.3.up.weight"][2, 5] = float("nan")
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError,
                       match=r"recurrent.block.ffn.routed_experts.3.up.weight \(16, 48\) contains 1 NaN/Inf"):
        load_checkpoint(tmp_path / "w.pt", config=model.cfg)


def test_truncated_files(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt: truncated or corrupted"):
        load_checkpoint(tmp_path / "cut.pt", config=model.cfg)
    d = save_checkpoint(tmp_path / "st", model.cfg, model.state_dict())
    st = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(st[: len(st) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint(d)


def test_not_a_checkpoint(tmp_path, model):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: not a checkpoint"):
        load_checkpoint(tmp_path / "notes.txt", config=model.cfg)
    with pytest.raises(CheckpointError, match="nothing.pt: no such file"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: expected a state_dict"):
        load_checkpoint(tmp_path / "list.pt", config=model.cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: expected model.safetensors"):
        load_checkpoint(tmp_path / "empty")


class _Payload:
    """Unpickling this calls Path.touch on the target: code execution, if allowed."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_pickle_that_would_run_code_is_refused(tmp_path, model):
    # The payload works when unpickled unrestricted...
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()
    # ...and mythos-rt refuses it before anything runs.
    target = tmp_path / "pwned"
    evil = dict(model.state_dict())
    evil["payload"] = _Payload(target)
    torch.save({"model": evil, "cfg": None}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused to unpickle"):
        load_checkpoint(tmp_path / "evil.pt", config=model.cfg)
    assert not target.exists()


@pytest.mark.parametrize("preset", ["tiny_mla", "tiny_gqa", "small_mla"])
def test_expected_shapes_match_the_reference_model(preset):
    from mythos_rt.checkpoint import expected_shapes
    cfg = MythosConfig.from_preset(preset)
    model_shapes = {k: (tuple(v.shape), v.dtype) for k, v in OpenMythos(cfg).state_dict().items()}
    assert expected_shapes(cfg) == model_shapes


# ---- hostile and careless files ----------------------------------------------------------

def _sharded(tmp_path, model, **extra_map):
    """A two-shard checkpoint directory whose index maps each tensor to its shard."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if k not in ("head.weight", "freqs_cis", "freqs_cis_mla")}
    names = sorted(sd)
    d = tmp_path / "sharded"
    d.mkdir()
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / fname))
    weight_map = {k: f for f, keys in shards.items() for k in keys} | extra_map
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(model.cfg.to_json())
    return d, weight_map


def _outside_shard(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"secret.weight": torch.randn(3)}, str(elsewhere / "s.safetensors"))
    return elsewhere / "s.safetensors"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_index_may_not_point_outside_the_checkpoint(tmp_path, model, how):
    outside = _outside_shard(tmp_path)
    d, weight_map = _sharded(tmp_path, model)
    target = {"absolute": str(outside), "dotdot": "../elsewhere/s.safetensors",
              "symlink": "link.safetensors"}[how]
    if how == "symlink":
        (d / "link.safetensors").symlink_to(outside)
    weight_map["secret.weight"] = target
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="shard '.*' of tensor secret.weight lies outside "
                                              "the checkpoint directory"):
        load_checkpoint(d)


def test_shards_may_hold_only_the_tensors_the_index_lists(tmp_path, model):
    d, weight_map = _sharded(tmp_path, model)
    dropped = sorted(k for k, f in weight_map.items() if f == "b.safetensors")[0]
    del weight_map[dropped]
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"b.safetensors: holds tensor\\(s\\) the index does "
                                              f"not list: {dropped}"):
        load_checkpoint(d)
    weight_map[dropped] = "b.safetensors"
    weight_map["ghost.weight"] = "a.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="a.safetensors: tensor\\(s\\) the index places here "
                                              "are missing: ghost.weight"):
        load_checkpoint(d)


@pytest.mark.parametrize("index, message", [
    ({"weight_map": ["a.safetensors"]}, "must be a non-empty mapping .* got \\['a.safetensors'\\]"),
    ({"weight_map": {}}, "must be a non-empty mapping .* got \\{\\}"),
    ({}, "must be a non-empty mapping .* got None"),
    ({"weight_map": {"embed.weight": 3}}, "tensor embed.weight maps to 3, not a file name"),
    ([1, 2], "expected a JSON object, found list"),
])
def test_malformed_index_is_a_clear_error(tmp_path, model, index, message):
    d, _ = _sharded(tmp_path, model)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: .*" + message):
        load_checkpoint(d)


def _saved(tmp_path, model, **change):
    d = save_checkpoint(tmp_path / "ckpt", model.cfg, model.state_dict())
    if change:
        data = json.loads((d / "config.json").read_text()) | change
        (d / "config.json").write_text(json.dumps(data))
    return d


def test_config_file_problems_name_the_config_not_the_weights(tmp_path, model):
    d = _saved(tmp_path, model, dim=50)
    with pytest.raises(ConfigError, match="ckpt/config.json: config.dim=50 is not divisible") as info:
        load_checkpoint(d)
    assert "model.safetensors" not in str(info.value)
    (d / "config.json").write_bytes(b'{"dim": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="config.json: not UTF-8 text \\(byte 9\\)"):
        load_checkpoint(d)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    with pytest.raises(ConfigError, match="config.json: is a directory, not a JSON file"):
        load_checkpoint(d)
    with pytest.raises(ConfigError, match="config.json: is a directory"):
        load_checkpoint(d / "model.safetensors", config=d / "config.json")


def test_partial_config_json_lists_the_missing_fields(tmp_path, model):
    d = _saved(tmp_path, model)
    data = json.loads((d / "config.json").read_text())
    del data["rope_theta"], data["act_threshold"]
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="config.json: config is missing field\\(s\\) that "
                                          "change results: act_threshold, rope_theta"):
        load_checkpoint(d)
    with pytest.raises(ConfigError, match="config=: config is missing .*: act_threshold, rope_theta"):
        load_checkpoint(d / "model.safetensors", config=data)


def test_artifact_passed_as_a_checkpoint_says_so(tmp_path, model):
    import mythos_rt
    art = tmp_path / "art"
    mythos_rt.compile(model, backend="torch", max_batch_size=1, max_seq_len=16).save(art)
    with pytest.raises(CheckpointError, match="art: this is a mythos-rt artifact .* use "
                                              "mythos_rt.load or pass it to generate"):
        load_checkpoint(art)


def test_config_asking_for_more_memory_than_exists_is_refused_at_once(tmp_path, model):
    d = _saved(tmp_path, model, n_experts=3_000_000, expert_dim=4096)
    t0 = time.perf_counter()
    with pytest.raises(MemoryLimitError, match="ckpt/config.json: config.n_experts=3000000: "
                                               "loading this checkpoint would allocate about "
                                               ".* TB .* of memory available on cpu") as info:
        load_checkpoint(d)
    assert time.perf_counter() - t0 < 1.0 and len(str(info.value)) < 400


def test_a_config_describing_far_more_tensors_is_refused_by_count(tmp_path, model):
    d = _saved(tmp_path, model, n_experts=200_000)  # 600k tensors of 48 x 16: fits in memory
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="the config describes 600053 tensors .*"
                                              "n_experts=200000.*the checkpoint holds 71$"):
        load_checkpoint(d)
    assert time.perf_counter() - t0 < 1.0


def test_long_mismatch_lists_are_cut(tmp_path, model):
    d = _saved(tmp_path, model, n_experts=1000)  # 2982 missing tensors: listed, but briefly
    with pytest.raises(CheckpointError, match="missing tensors: recurrent.block.ffn.routed_experts"
                                              ".* and 2974 more") as info:
        load_checkpoint(d)
    assert len(str(info.value)) < 1500
