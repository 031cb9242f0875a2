"""The runtime artifact's file format: what ``Runtime.save(dir)`` writes and
``mythos_rt.load(dir)`` reads (``mythos_rt.compiler`` turns it back into a Runtime).

An artifact holds what compile() computed, so loading skips tracing, passes and weight
packing:
  weights.safetensors   every tensor the plan reads (packed experts, absorbed MLA, ...)
  graph.json            the optimized IR
  config.json           the model config
  options.json          compile options (dtype, max sizes, backend choice)
  autotune/moe.json     the MoE tile configs the saved runtime used (optional)
  mythos_tokenizer.json or tokenizer.json (+ tokenizer_config.json)
                        the runtime's tokenizer (optional; ``mythos_rt.tokenizer``)
  manifest.json         format version, mythos-rt version, tied-weight aliases, sha256 of
                        every file above
  manifest.sha256       sha256 of manifest.json's bytes
Loading checks the manifest's own hash, then every file's, then that every copy of the
config agrees (config.json, the config inside graph.json, the IR attributes copied from
it, the embedding's shape) and that the tuning table passes ``mythos_rt.tuning``'s schema:
a corrupted, edited or version-mismatched artifact is an ArtifactError, never a wrong
answer. (Hashes catch damage and piecemeal edits; they are no signature: whoever rewrites
every file and every hash makes a new artifact.) Nothing outside the artifact is written
or read: its tuning table serves the loaded Runtime only.

Saving writes the whole artifact into a fresh directory beside the target and swaps it in
(an atomic exchange where the OS has one, else two renames), so an interrupted save leaves
the old artifact or the new one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .config import ConfigError, MythosConfig
from .errors import ArtifactError, InputError
from .ir import Graph, IRError
from .jsonfile import read_json_object
from .options import CompileOptions
from .tokenizer import (BYTE_FILE, HF_CONFIG, HF_FILE, TOKENIZER_FILES, Tokenizer, TokenizerError,
                        load_tokenizer)
from .tuning import MAX_FILE_BYTES, check_table
from .version import __version__

FORMAT_VERSION = 2
FILES = ("weights.safetensors", "graph.json", "config.json", "options.json")
TUNING_FILE = "autotune/moe.json"
MANIFEST, SEAL = "manifest.json", "manifest.sha256"
# Everything Runtime.save may leave in a directory (older formats' autotune files included):
# a directory holding only these is an artifact that a new save may replace whole.
_ARTIFACT_ENTRIES = {*FILES, *TOKENIZER_FILES, MANIFEST, SEAL, "autotune"}
_OPTIONAL_FILES = {TUNING_FILE, *TOKENIZER_FILES}
_MAX_JSON_BYTES = 64 << 20  # graph.json of the largest presets is well below this

# IR attributes that copy a config field: (op kind, attribute) -> MythosConfig field
_CONFIG_ATTRS = {("loop", "max_loop_iters"): "max_loop_iters", ("loop", "threshold"): "act_threshold",
                 ("loop_epilogue", "max_loops"): "max_loop_iters",
                 ("loop_epilogue", "threshold"): "act_threshold",
                 ("lora", "max_loops"): "max_loop_iters", ("act_update", "threshold"): "act_threshold",
                 ("loop_prologue", "loop_dim"): "loop_dim", ("loop_embed", "loop_dim"): "loop_dim",
                 ("moe", "top_k"): "n_experts_per_tok", ("moe", "n_experts"): "n_experts",
                 ("moe", "n_shared"): "n_shared_experts", ("moe", "expert_dim"): "expert_dim"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- writing ----------------------------------------------------------------------------

def _write(path: Path, data: Union[str, bytes]) -> None:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def _write_files(d: Path, weights: Mapping[str, torch.Tensor], graph: Graph,
                 config: MythosConfig, options: CompileOptions, tuning: Mapping[str, dict],
                 tokenizer: Optional[Tokenizer]) -> None:
    """Write every file of an artifact into the empty directory ``d``."""
    from safetensors.torch import save_file

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
    _write(d / "graph.json", graph.to_json())
    _write(d / "config.json", config.to_json() + "\n")
    _write(d / "options.json", json.dumps(asdict(options), indent=1) + "\n")
    files = list(FILES)
    if tuning:
        (d / "autotune").mkdir()
        _write(d / TUNING_FILE, json.dumps(dict(tuning), indent=1, sort_keys=True) + "\n")
        files.append(TUNING_FILE)
    if tokenizer is not None:
        files += [p.name for p in tokenizer.save(d)]
    manifest = json.dumps({"format_version": FORMAT_VERSION, "mythos_rt_version": __version__,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "aliases": aliases, "files": {f: _sha256(d / f) for f in files}},
                          indent=1) + "\n"
    _write(d / SEAL, hashlib.sha256(manifest.encode()).hexdigest() + "\n")
    _write(d / MANIFEST, manifest)


def _replace_mode(target: Path, overwrite: bool) -> str:
    """How a save lands on ``target``: "new" (absent or empty), "swap" (an artifact: replaced
    whole) or "into" (a non-empty directory, only with ``overwrite``: files written in)."""
    if not target.exists():
        return "new"
    if not target.is_dir():
        raise InputError(f"{target} exists and is not a directory; choose another artifact path")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return "new"
    if MANIFEST in entries and set(entries) <= _ARTIFACT_ENTRIES:
        return "swap"
    if overwrite:
        return "into"
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise InputError(f"{target} is not empty and not a mythos-rt artifact (holds {shown}); "
                     "choose an empty or new directory, or pass overwrite=True (CLI: --force) "
                     "to write the artifact's files into it")


def check_destination(target: Union[str, os.PathLike], overwrite: bool = False) -> str:
    """How a save would land on ``target`` (see ``_replace_mode``), after checking that it
    can be written there; InputError naming the path otherwise. Cheap: run it before a
    long compile."""
    target = Path(target).absolute()
    mode = _replace_mode(target, overwrite)
    probe = target if mode == "into" else target.parent
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is not a directory")
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".mythos-rt-probe-"))
    except OSError as exc:
        raise InputError(f"cannot write an artifact at {target}: "
                         f"{exc.strerror or exc}{f' ({probe})' if probe != target else ''}") from None
    return mode


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where
    the OS or file system cannot."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _land(tmp: Path, target: Path, mode: str) -> None:
    """Put the complete artifact ``tmp`` at ``target`` (see ``_replace_mode``)."""
    if mode == "new":
        if target.is_dir():
            target.rmdir()  # empty, checked; a file appearing meanwhile makes this fail
        os.rename(tmp, target)
    elif mode == "swap":
        if not _exchange(tmp, target):
            # Two renames: for an instant the old artifact sits at its temporary name.
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.rename(target, old / "artifact")
            os.rename(tmp, target)
            tmp = old
        shutil.rmtree(tmp)
    else:  # "into": the directory holds other files; replace ours one by one, manifest last
        names = list(FILES) + [n for n in TOKENIZER_FILES if (tmp / n).exists()]
        if (tmp / TUNING_FILE).exists():
            (target / "autotune").mkdir(exist_ok=True)
            names.append(TUNING_FILE)
        for name in [*names, SEAL, MANIFEST]:
            os.replace(tmp / name, target / name)
        shutil.rmtree(tmp)


def write_artifact(directory: Union[str, os.PathLike], weights: Mapping[str, torch.Tensor],
                   graph: Graph, config: MythosConfig, options: CompileOptions, *,
                   tuning: Optional[Mapping[str, dict]] = None,
                   tokenizer: Optional[Tokenizer] = None, overwrite: bool = False) -> Path:
    """Write an artifact at ``directory``: the plan's ``weights``, the optimized ``graph``,
    ``config``, the compile ``options``, the MoE ``tuning`` entries the runtime uses and
    its ``tokenizer`` (when it has one).

    Written beside ``directory`` and swapped in whole (see the module docstring).
    ``directory`` may be absent, empty or an artifact; another non-empty directory is an
    InputError unless ``overwrite``. Raises InputError where it cannot be written.
    """
    target = Path(directory).absolute()
    mode = check_destination(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    except OSError as exc:
        raise InputError(f"cannot write an artifact at {target}: {exc.strerror or exc}") from None
    try:
        _write_files(tmp, weights, graph, config, options, dict(tuning or {}), tokenizer)
        _land(tmp, target, mode)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- reading ----------------------------------------------------------------------------

def is_artifact(path: Union[str, os.PathLike]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _json(path: Path, data: Optional[bytes] = None) -> Any:
    """A JSON file of the artifact (``data``: its bytes when already read)."""
    if data is None:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise ArtifactError(f"{path}: larger than {_MAX_JSON_BYTES >> 20} MiB")
        data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid UTF-8 JSON: {str(exc)[:200]}") from None


def _read_manifest(d: Path) -> dict:
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d}: not a mythos-rt artifact ({MANIFEST} is missing)")
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ArtifactError(f"{path}: larger than {_MAX_JSON_BYTES >> 20} MiB")
    body = path.read_bytes()
    manifest = _json(path, body)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{d}: artifact format version {manifest.get('format_version')!r:.20} "
                            f"is not supported by this mythos-rt (reads version {FORMAT_VERSION}, "
                            f"artifact written by mythos-rt "
                            f"{str(manifest.get('mythos_rt_version'))[:20]}); recompile the checkpoint")
    seal = d / SEAL
    if not seal.is_file() or seal.stat().st_size > 100:
        raise ArtifactError(f"{seal}: missing or malformed (the manifest's own sha256)")
    if seal.read_text(errors="replace").strip() != hashlib.sha256(body).hexdigest():
        raise ArtifactError(f"{path}: edited or corrupted (sha256 does not match {SEAL})")
    hashes, aliases = manifest.get("files"), manifest.get("aliases", {})
    if not isinstance(hashes, dict) or any(f not in hashes for f in FILES):
        raise ArtifactError(f"{path}: missing file list")
    if set(hashes) - {*FILES, *_OPTIONAL_FILES}:
        extra = sorted(set(hashes) - {*FILES, *_OPTIONAL_FILES})
        raise ArtifactError(f"{path}: lists unknown files {', '.join(map(str, extra[:3]))[:200]}")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in aliases.items()):
        raise ArtifactError(f"{path}: aliases must map weight names to weight names")
    unlisted = sorted(f"autotune/{p.name}" for p in (d / "autotune").glob("*")
                      if f"autotune/{p.name}" not in hashes) if (d / "autotune").is_dir() else []
    if unlisted:
        raise ArtifactError(f"{d / unlisted[0]}: not listed in the manifest (an artifact "
                            "carries only the tuning data it was saved with)")
    for name, digest in hashes.items():
        if not (d / name).is_file():
            raise ArtifactError(f"{d / name}: missing from the artifact")
        if _sha256(d / name) != digest:
            raise ArtifactError(f"{d / name}: corrupted (sha256 does not match the manifest)")
    return manifest


def check_config_copies(cfg: MythosConfig, graph: Graph, options: CompileOptions,
                        where: Path) -> None:
    """Every copy of the config in an artifact agrees with config.json, or ArtifactError."""
    if graph.attrs.get("config") != cfg.to_dict():
        theirs = graph.attrs.get("config")
        fields = sorted(k for k, v in cfg.to_dict().items()
                        if not isinstance(theirs, dict) or theirs.get(k) != v)
        raise ArtifactError(f"{where}: config.json and the config inside graph.json disagree "
                            f"(on {', '.join(fields[:5]) or 'their field names'})")
    if graph.attrs.get("dtype", options.dtype) != options.dtype:
        raise ArtifactError(f"{where}: options.json's dtype {options.dtype!r} disagrees with "
                            f"graph.json's {str(graph.attrs.get('dtype'))[:20]!r}")
    for op in graph.walk():
        for attr, value in op.attrs.items():
            field = _CONFIG_ATTRS.get((op.kind, attr))
            if field is not None and value != getattr(cfg, field):
                raise ArtifactError(f"{where}: graph.json op {op.name!r} has {attr}="
                                    f"{str(value)[:20]}, config.json says {field}="
                                    f"{getattr(cfg, field)}")
    embed = graph.weights.get("embed.weight")
    rows = cfg.vocab_size
    sharding = graph.attrs.get("parallel")
    if isinstance(sharding, dict):  # a rank's vocabulary rows and the zero row
        from .parallel import vocab_rows
        rows = vocab_rows(cfg.vocab_size, int(sharding.get("world_size", 1))) + 1
    if embed is None or tuple(embed.shape) != (rows, cfg.dim):
        raise ArtifactError(f"{where}: graph.json's embedding "
                            f"{None if embed is None else tuple(embed.shape)} does not match "
                            f"config.json's (vocab_size, dim) = ({cfg.vocab_size}, {cfg.dim})")


def _read_tuning(d: Path, hashes: dict) -> dict[str, dict]:
    if TUNING_FILE not in hashes:
        return {}
    path = d / TUNING_FILE
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ArtifactError(f"{path}: larger than {MAX_FILE_BYTES >> 10} KiB")
    return check_table(_json(path), str(path), ArtifactError)


def _read_tokenizer(d: Path, hashes: dict, vocab_size: int) -> Optional[Tokenizer]:
    """The artifact's tokenizer (its files are hash-checked already), or None."""
    name = next((n for n in (BYTE_FILE, HF_FILE) if n in hashes), None)
    if name is None:
        return None
    if (d / HF_CONFIG).exists() and HF_CONFIG not in hashes:
        raise ArtifactError(f"{d / HF_CONFIG}: not listed in the manifest (it would change "
                            "the tokenizer's special ids)")
    try:
        tok = load_tokenizer(d / name)
    except TokenizerError as exc:
        raise ArtifactError(f"{d / name}: unreadable tokenizer: {str(exc)[:300]}") from None
    if tok.vocab_size > vocab_size:
        raise ArtifactError(f"{d / name}: the tokenizer's {tok.vocab_size} ids exceed "
                            f"config.json's vocab_size {vocab_size}")
    return tok


def read_artifact(directory: Union[str, os.PathLike]
                  ) -> tuple[MythosConfig, Graph, CompileOptions, dict[str, torch.Tensor],
                             dict[str, dict], Optional[Tokenizer]]:
    """Check an artifact (see the module docstring); return its config, optimized graph,
    compile options, the weights the graph reads (on the CPU, aliases restored), its
    MoE tuning table and its tokenizer (None when it carries none)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    manifest = _read_manifest(d)
    try:
        cfg = MythosConfig.from_dict(_json(d / "config.json")).validate()
        graph = Graph.from_json((d / "graph.json").read_text())
        options = CompileOptions(**_json(d / "options.json"))
    except (ConfigError, IRError, TypeError, KeyError, AttributeError) as exc:
        raise ArtifactError(f"{d}: unreadable artifact: {str(exc)[:300]}") from None
    try:
        options.validate(cfg)
    except InputError as exc:
        raise ArtifactError(f"{d / 'options.json'}: {exc}") from None
    check_config_copies(cfg, graph, options, d)
    tuning = _read_tuning(d, manifest["files"])
    tokenizer = _read_tokenizer(d, manifest["files"], cfg.vocab_size)
    try:
        weights = load_file(str(d / "weights.safetensors"), device="cpu")
    except SafetensorError as exc:
        raise ArtifactError(f"{d / 'weights.safetensors'}: unreadable: {str(exc)[:300]}") from None
    for name, target in manifest["aliases"].items():
        if name in weights or target not in weights:
            raise ArtifactError(f"{d / MANIFEST}: alias {name[:60]!r} -> {target[:60]!r} does not "
                                "name a missing weight and a stored one")
        weights[name] = weights[target]
    used = graph.weight_names_used()
    missing = sorted(used - set(weights))
    if missing:
        raise ArtifactError(f"{d / 'weights.safetensors'}: missing {len(missing)} tensors "
                            f"({', '.join(missing[:5])[:300]})")
    for name in used:
        want = tuple(graph.weights[name].shape)
        if tuple(weights[name].shape) != want:
            raise ArtifactError(f"{d / 'weights.safetensors'}: tensor {name} has shape "
                                f"{tuple(weights[name].shape)}, the plan expects {want}")
    return (cfg, graph, options, {k: v for k, v in weights.items() if k in used}, tuning,
            tokenizer)
