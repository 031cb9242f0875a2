"""Checkpoint formats round-trip; every bad input gives an error that names the problem."""

import json
import pathlib
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from mythos_rt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mythos_rt.config import ConfigError, MythosConfig
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
