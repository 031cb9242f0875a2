"""Saved runtime artifacts: ``Runtime.save(dir)`` and ``mythos_rt.load(dir)``.

An artifact holds what compile() computed, so loading skips tracing, passes and weight
packing:
  weights.safetensors   every tensor the plan reads (packed experts, absorbed MLA, ...)
  graph.json            the optimized IR
  config.json           the model config
  options.json          compile options (dtype, max sizes, backend choice)
  autotune/*.json       kernel autotune caches present at save time
  manifest.json         format version, mythos-rt version, sha256 of every file
Every file is hash-checked on load: a corrupted or version-mismatched artifact is an
ArtifactError, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch

from .cache import cache_dir, write_atomic
from .checkpoint import read_json_object
from .config import ConfigError, MythosConfig
from .ir import Graph, IRError

FORMAT_VERSION = 1
FILES = ("weights.safetensors", "graph.json", "config.json", "options.json")


class ArtifactError(ValueError):
    """The directory is not a loadable mythos-rt artifact (names file and problem)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _autotune_dir() -> Path:
    return cache_dir("autotune")


def save_artifact(runtime, directory: Union[str, os.PathLike]) -> Path:
    """Write ``runtime``'s artifact into ``directory`` (created; existing files replaced)."""
    from safetensors.torch import save_file

    from . import __version__

    if runtime.options is None:
        raise ArtifactError("this Runtime was not built by mythos_rt.compile/load; nothing to save")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Tied weights (the head shares the embedding) are stored once and aliased.
    tensors, aliases, seen = {}, {}, {}
    for k, v in sorted(runtime._low.weights.items()):
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, str(d / "weights.safetensors"), metadata={"format": "mythos-rt"})
    (d / "graph.json").write_text(runtime.graph.to_json())
    (d / "config.json").write_text(runtime.config.to_json() + "\n")
    (d / "options.json").write_text(json.dumps(asdict(runtime.options), indent=1) + "\n")
    files = list(FILES)
    src = _autotune_dir()
    if src.is_dir():
        (d / "autotune").mkdir(exist_ok=True)
        for f in sorted(src.glob("*.json")):
            shutil.copyfile(f, d / "autotune" / f.name)
            files.append(f"autotune/{f.name}")
    manifest = {"format_version": FORMAT_VERSION, "mythos_rt_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "aliases": aliases, "files": {f: _sha256(d / f) for f in files}}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return d


def is_artifact(path: Union[str, os.PathLike]) -> bool:
    return (Path(path) / "manifest.json").is_file()


def load(directory: Union[str, os.PathLike], *, device=None, backend: Optional[str] = None,
         overrides: Optional[dict] = None, cuda_graphs: Optional[bool] = None):
    """Restore a Runtime saved with ``Runtime.save``: no tracing, no passes, no packing.

    ``device`` defaults to CUDA if available; ``backend``/``overrides``/``cuda_graphs``
    default to what the artifact was compiled with.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .runtime import CompileOptions, build_runtime, resolve_device

    t0 = time.perf_counter()
    d = Path(directory)
    manifest = _read_json(d / "manifest.json", d)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{d}: artifact format version {manifest.get('format_version')!r} "
                            f"is not supported by this mythos-rt (reads version {FORMAT_VERSION}, "
                            f"artifact written by mythos-rt {manifest.get('mythos_rt_version')}); "
                            "recompile the checkpoint")
    hashes = manifest.get("files")
    if not isinstance(hashes, dict) or any(f not in hashes for f in FILES):
        raise ArtifactError(f"{d / 'manifest.json'}: missing file list")
    for name, digest in hashes.items():
        path = d / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the artifact")
        if _sha256(path) != digest:
            raise ArtifactError(f"{path}: corrupted (sha256 does not match the manifest)")
    try:
        cfg = MythosConfig.from_json((d / "config.json").read_text()).validate()
        graph = Graph.from_json((d / "graph.json").read_text())
        options = CompileOptions(**_read_json(d / "options.json", d))
        weights = load_file(str(d / "weights.safetensors"), device="cpu")
        for name, target in dict(manifest.get("aliases") or {}).items():
            weights[name] = weights[target]
    except (ConfigError, IRError, TypeError, KeyError, SafetensorError) as exc:
        raise ArtifactError(f"{d}: unreadable artifact: {exc}") from None
    used = graph.weight_names_used()
    missing = sorted(used - set(weights))
    if missing:
        raise ArtifactError(f"{d / 'weights.safetensors'}: missing tensors {', '.join(missing[:5])}")
    for name in used:
        want = tuple(graph.weights[name].shape)
        if tuple(weights[name].shape) != want:
            raise ArtifactError(f"{d / 'weights.safetensors'}: tensor {name} has shape "
                                f"{tuple(weights[name].shape)}, the plan expects {want}")
    _restore_autotune(d)
    if backend is not None:
        options.backend = backend
    if overrides is not None:
        options.overrides = dict(overrides)
    if cuda_graphs is not None:
        options.cuda_graphs = cuda_graphs
    device = resolve_device(device)
    moved: dict[int, torch.Tensor] = {}  # keep aliases aliased on the device
    # Fresh, aligned copies: kernels (and BLAS) may pick different paths for the unaligned
    # views safetensors returns, which would change results in the last bits.
    weights = {k: moved.setdefault(id(v), v.to(device, copy=True)) for k, v in weights.items()
               if k in used}
    return build_runtime(graph, cfg, weights, device, options.validate(cfg),
                         timings={"load_s": time.perf_counter() - t0})


def _restore_autotune(d: Path) -> None:
    """Copy the artifact's autotune entries into the cache (never overwriting newer ones)."""
    src = d / "autotune"
    if not src.is_dir():
        return
    dst = _autotune_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.json"):
        target = dst / f.name
        try:
            ours = json.loads(target.read_text()) if target.exists() else {}
            theirs = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(ours, dict) and isinstance(theirs, dict):
            write_atomic(target, json.dumps({**theirs, **ours}, indent=1))


def _read_json(path: Path, d: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{d}: not a mythos-rt artifact ({path.name} is missing)")
    return read_json_object(path, ArtifactError)
