"""The runtime artifact's file format: what ``Runtime.save(dir)`` writes and
``mythos_rt.load(dir)`` reads (``mythos_rt.compiler`` turns it back into a Runtime).

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
from typing import Mapping, Union

import torch

from .cache import cache_dir, write_atomic
from .config import ConfigError, MythosConfig
from .errors import ArtifactError
from .ir import Graph, IRError
from .jsonfile import read_json_object
from .options import CompileOptions
from .version import __version__

FORMAT_VERSION = 1
FILES = ("weights.safetensors", "graph.json", "config.json", "options.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _autotune_dir() -> Path:
    return cache_dir("autotune")


def write_artifact(directory: Union[str, os.PathLike], weights: Mapping[str, torch.Tensor],
                   graph: Graph, config: MythosConfig, options: CompileOptions) -> Path:
    """Write an artifact into ``directory`` (created; existing files replaced): the plan's
    ``weights``, the optimized ``graph``, ``config`` and the compile ``options``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Tied weights (the head shares the embedding) are stored once and aliased.
    tensors, aliases, seen = {}, {}, {}
    for k, v in sorted(weights.items()):
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    save_file(tensors, str(d / "weights.safetensors"), metadata={"format": "mythos-rt"})
    (d / "graph.json").write_text(graph.to_json())
    (d / "config.json").write_text(config.to_json() + "\n")
    (d / "options.json").write_text(json.dumps(asdict(options), indent=1) + "\n")
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


def read_artifact(directory: Union[str, os.PathLike]
                  ) -> tuple[MythosConfig, Graph, CompileOptions, dict[str, torch.Tensor]]:
    """Check an artifact's manifest and hashes; return its config, optimized graph, compile
    options and the weights the graph reads (on the CPU, aliases restored)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    return cfg, graph, options, {k: v for k, v in weights.items() if k in used}


def restore_autotune(directory: Union[str, os.PathLike]) -> None:
    """Copy the artifact's autotune entries into the cache (never overwriting newer ones)."""
    src = Path(directory) / "autotune"
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
