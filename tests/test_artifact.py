"""Runtime.save / mythos_rt.load: identical outputs; corruption and version errors."""

import json

import pytest
import torch

import mythos_rt
from mythos_rt.artifact import ArtifactError
from mythos_rt.config import MythosConfig
from mythos_rt.reference import OpenMythos


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
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        mythos_rt.load(d)
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "graph.json").unlink()
    with pytest.raises(ArtifactError, match="graph.json: missing from the artifact"):
        mythos_rt.load(d)
    with pytest.raises(ArtifactError, match="not a mythos-rt artifact"):
        mythos_rt.load(d.parent)
