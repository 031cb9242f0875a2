"""mythos_rt.buildcache: the cache root follows the environment; files land whole or not at all."""

import pytest

from mythos_rt import buildcache as cache


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MYTHOS_RT_CACHE_DIR", str(tmp_path))
    assert cache.cache_dir("cpu") == tmp_path / "cpu"
    monkeypatch.delenv("MYTHOS_RT_CACHE_DIR")
    assert cache.cache_dir("nvrtc").parts[-3:] == (".cache", "mythos_rt", "nvrtc")


def test_write_atomic_replaces_and_creates_the_directory(tmp_path):
    target = tmp_path / "a" / "b.json"
    cache.write_atomic(target, "first")
    cache.write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["b.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "k.so"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="compiler failed"):
        with cache.replacing(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("compiler failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["k.so"]
