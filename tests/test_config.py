import json

import pytest

from mythos_rt.config import PRESETS, ConfigError, MythosConfig
from tests.upstream import upstream_main


def test_defaults_and_presets_match_upstream():
    up = upstream_main()
    import importlib
    variants = importlib.import_module("open_mythos.variants")
    assert MythosConfig().to_dict() == up.MythosConfig().__dict__
    for name in ["mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b",
                 "mythos_500b", "mythos_1t"]:
        ours = MythosConfig.from_preset(name)
        assert ours.to_dict() == getattr(variants, name)().__dict__, name
        ours.validate()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = MythosConfig.from_preset(name).validate()
    assert MythosConfig.from_json(cfg.to_json()) == cfg
    assert MythosConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(dim=50, n_heads=4), "dim=50 is not divisible by n_heads=4"),
    (dict(attn_type="gqa", n_heads=6, n_kv_heads=4), "n_heads=6 is not divisible by n_kv_heads=4"),
    (dict(n_experts_per_tok=7, n_experts=6), "n_experts_per_tok=7 exceeds n_experts=6"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim must be even"),
    (dict(attn_type="gqa", dim=36, n_heads=4, n_kv_heads=2), "even head_dim"),
    (dict(dim=40, n_heads=4), "dim//8"),
    (dict(attn_type="mqa"), "attn_type must be 'mla' or 'gqa'"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(expert_dim=-3), "expert_dim must be a positive integer"),
    (dict(prelude_layers=-1), "prelude_layers must be a non-negative integer"),
    (dict(act_threshold=0.0), "act_threshold must be a positive finite number"),
    (dict(dropout=1.5), "dropout must be in [0, 1)"),
    (dict(max_loop_iters=2.5), "max_loop_iters must be a positive integer"),
])
def test_validate_names_the_problem(change, message):
    cfg = MythosConfig.from_preset("tiny_mla")
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        cfg.validate()


def test_unknown_fields_and_presets_are_errors():
    with pytest.raises(ConfigError, match="unknown config field.*: bogus"):
        MythosConfig.from_dict({"dim": 64, "bogus": 1})
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        MythosConfig.from_preset("nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MythosConfig.from_json("{")


def test_a_config_file_must_state_every_field_that_changes_results():
    data = json.loads(MythosConfig.from_preset("tiny_mla").to_json())
    for name in ("rope_theta", "act_threshold", "max_loop_iters"):
        del data[name]
    with pytest.raises(ConfigError, match="missing field.*: max_loop_iters, act_threshold, "
                                          "rope_theta \\(no default is assumed"):
        MythosConfig.from_dict(data)
    # Fields no result depends on may be left out; so may the other attention type's.
    gqa = json.loads(MythosConfig.from_preset("tiny_gqa").to_json())
    for name in ("dropout", "max_output_tokens", "kv_lora_rank", "q_lora_rank",
                 "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        del gqa[name]
    assert MythosConfig.from_dict(gqa).n_kv_heads == 2
    del gqa["n_kv_heads"]
    with pytest.raises(ConfigError, match="missing field\\(s\\) that change results: n_kv_heads"):
        MythosConfig.from_dict(gqa)
    with pytest.raises(ConfigError, match="missing .*: vocab_size, dim, .* and \\d+ more"):
        MythosConfig.from_dict({})


@pytest.mark.parametrize("change, message", [
    (dict(max_seq_len=2 ** 40), "max_seq_len=1099511627776 exceeds 2147483647 \\(positions are int32\\)"),
    (dict(dim=10 ** 5000), "dim must be a positive integer below 2\\*\\*63, got an integer of 16610 bits"),
    (dict(n_experts=2 ** 63), "n_experts must be a positive integer below 2\\*\\*63"),
    (dict(rope_theta=float("inf")), "rope_theta must be a positive finite number, got inf"),
    (dict(act_threshold=float("nan")), "act_threshold must be a positive finite number, got nan"),
    (dict(attn_type="x" * 10 ** 6), "attn_type must be 'mla' or 'gqa', got 'xxxx.*\\.\\.\\.$"),
])
def test_absurd_values_are_short_one_line_errors(change, message):
    cfg = MythosConfig.from_preset("tiny_mla")
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=message) as info:
        cfg.validate()
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


def test_unparseable_numbers_and_long_names_stay_short():
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        MythosConfig.from_json('{"dim": ' + "7" * 5000 + "}")
    assert len(str(info.value)) < 300
    bogus = {f"field_{i}_" + "y" * 500: 1 for i in range(1000)}
    with pytest.raises(ConfigError, match="unknown config field.* and 992 more") as info:
        MythosConfig.from_dict(bogus)
    assert len(str(info.value)) < 1000
