"""Checkpoint loading and saving: any supported format → (MythosConfig, state_dict).

Formats read:
  * a bare state_dict saved with ``torch.save`` (``.pt``/``.pth``/``.bin``);
  * OpenMythos's training checkpoint: ``{"model", "cfg", "vocab_size", "step",
    "optimizer"}`` with ``cfg`` pickled as ``open_mythos.main.MythosConfig``;
  * ``config.json`` + ``model.safetensors`` (or shards listed in
    ``model.safetensors.index.json``), given as a directory or as file paths.

Files are input from anyone: an index may name only files inside its own directory and
its shards may hold only the tensors it lists; before a config is turned into tensors
(RoPE tables, the list of expected names) its memory is estimated and refused when it
does not fit (``mythos_rt.memory``); error messages list a few names and a count.

Pickles are never unpickled unrestricted: ``torch.load(weights_only=True)`` with one
allow-listed stand-in for upstream's config class, so a file whose unpickling would
run code is refused before any of it runs. Files are memory-mapped, so optimizer state
in a training checkpoint is never read into memory.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from .artifact import is_artifact
from .config import ConfigError, MythosConfig
from .errors import clip, listed
from .jsonfile import read_json_object
from .memory import check_fits, parameter_count
from .reference import precompute_rope_freqs

PathLike = Union[str, os.PathLike]
ConfigLike = Union[MythosConfig, Mapping[str, Any], PathLike, None]

WRAPPER_PREFIXES = ("module", "_orig_mod", "_fsdp_wrapped_module")  # DDP, torch.compile, FSDP
DERIVED_BUFFERS = ("freqs_cis", "freqs_cis_mla")  # RoPE tables, rebuilt from the config
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Narrowest dtype a checkpoint stores (bf16/fp16): the memory check's lower bound.
MIN_WEIGHT_BYTES = 2
# Beyond this difference between the tensors a config describes and those a checkpoint
# holds, the mismatch is reported as counts: naming them would cost more than it tells.
MAX_LISTED_MISMATCH = 4096


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file, tensor and problem."""


class _UpstreamConfig:
    """Stand-in unpickled in place of ``open_mythos.main.MythosConfig``: holds fields only."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("unexpected state for open_mythos.main.MythosConfig")
        self.__dict__.update(state)


_SAFE_GLOBALS = [(_UpstreamConfig, "open_mythos.main.MythosConfig")]


# ---- public API ---------------------------------------------------------------------

def load_checkpoint(path: PathLike | Iterable[PathLike], config: ConfigLike = None, *,
                    check_finite: bool = True,
                    lazy: bool = False) -> tuple[MythosConfig, dict[str, torch.Tensor]]:
    """Load a checkpoint in any supported format.

    Returns ``(config, state_dict)`` with the reference model's names: wrapper prefixes
    stripped, a missing tied ``head.weight`` filled from ``embed.weight`` and the RoPE
    tables rebuilt, so ``mythos_rt.reference.OpenMythos(config).load_state_dict(sd,
    strict=True)`` succeeds. ``config`` (a MythosConfig, a dict, or a config.json path)
    overrides the checkpoint's own. Raises CheckpointError / ConfigError.

    ``lazy``: safetensors tensors come back as ``mythos_rt.slices.LazyTensor``s, read only
    when (and in the slices) materialized; their values are not checked for NaN/Inf.
    """
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise CheckpointError("no checkpoint path given")
    for p in paths:
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or directory")

    if len(paths) == 1 and paths[0].is_dir():
        found, sd, where = _read_directory(paths[0], lazy)
    elif any(p.suffix == ".safetensors" or p.name == SAFETENSORS_INDEX for p in paths):
        found, sd, where = _read_safetensors_files(paths, lazy)
    elif len(paths) == 1:
        found, sd, where = _read_torch_file(paths[0])
    else:
        raise CheckpointError(f"cannot combine these files into one checkpoint: "
                              f"{listed(paths)}")

    cfg, cfg_where = _resolve_config(config, found, where)
    sd = _canonicalize(sd)
    lazy_values = any(not isinstance(v, torch.Tensor) for v in sd.values())
    _check_against_config(sd, cfg, where, cfg_where, check_finite, lazy_values)
    return cfg, sd


def save_checkpoint(directory: PathLike, config: MythosConfig,
                    state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (tied head and RoPE tables omitted)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.validate()
    sd = _canonicalize(dict(state_dict))
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()
               if k not in DERIVED_BUFFERS and k != "head.weight"}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(config.to_json() + "\n")
    return directory


# ---- readers -------------------------------------------------------------------------

def _read_torch_file(path: Path):
    """A torch.save file: a bare state_dict or an OpenMythos training checkpoint."""
    if path.suffix in (".json",):
        raise CheckpointError(f"{path}: a config file alone is not a checkpoint; pass the "
                              "directory holding it and the weights")
    if not zipfile.is_zipfile(path) and not _looks_like_legacy_pickle(path):
        if _magic(path) == b"PK\x03\x04":
            raise CheckpointError(f"{path}: truncated or corrupted torch.save archive "
                                  "(the zip directory at its end is missing)")
        raise CheckpointError(f"{path}: not a checkpoint (neither a torch.save archive, "
                              "a safetensors file nor a checkpoint directory)")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file references objects outside the "
            f"allow-list (tensors, containers, open_mythos.main.MythosConfig), so loading "
            f"it could run code. Detail: {_first_line(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint: "
                              f"{_first_line(exc)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict or a training checkpoint "
                              f"dict, found {type(obj).__name__}")
    if "model" in obj and isinstance(obj["model"], dict):  # training checkpoint
        found_cfg = obj.get("cfg")
        if isinstance(found_cfg, _UpstreamConfig):
            found_cfg = dict(found_cfg.__dict__)
        sd = obj["model"]
        # Optimizer state stays an mmapped, never-touched mapping; drop it right away.
        obj.pop("optimizer", None)
    else:
        found_cfg, sd = None, obj
    _require_tensors(sd, path)
    return (None if found_cfg is None else (found_cfg, f"{path} (its cfg)")), sd, str(path)


def _read_directory(directory: Path, lazy: bool = False):
    if is_artifact(directory):
        raise CheckpointError(f"{directory}: this is a mythos-rt artifact (a compiled runtime), "
                              "not a checkpoint; use mythos_rt.load or pass it to generate")
    cfg_path = directory / "config.json"
    index = directory / SAFETENSORS_INDEX
    single = directory / "model.safetensors"
    if index.exists():
        files = [index]
    elif single.exists():
        files = [single]
    else:
        candidates = sorted(directory.glob("*.safetensors")) or sorted(
            p for p in directory.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
        if len(candidates) != 1:
            raise CheckpointError(
                f"{directory}: expected model.safetensors, {SAFETENSORS_INDEX} or exactly one "
                f".safetensors/.pt file, found {listed(p.name for p in candidates) or 'none'}")
        files = candidates
    if files[0].suffix == ".safetensors" or files[0].name == SAFETENSORS_INDEX:
        found, sd, where = _read_safetensors_files(files, lazy)
    else:
        found, sd, where = _read_torch_file(files[0])
    if cfg_path.exists():
        found = (read_json_object(cfg_path, ConfigError), str(cfg_path))
    return found, sd, where


def _read_safetensors_files(paths: list[Path], lazy: bool = False):
    found = None
    shards: dict[Path, Optional[list[str]]] = {}  # file -> the tensors to read (None: all)
    for p in paths:
        if p.name == SAFETENSORS_INDEX:
            shards.update(_shards_from_index(p))
        elif p.name == "config.json":
            found = (read_json_object(p, ConfigError), str(p))
        else:
            shards[p] = None
    if found is None:
        sibling = next(iter(shards)).parent / "config.json"
        if sibling.exists():
            found = (read_json_object(sibling, ConfigError), str(sibling))
    sd: dict[str, torch.Tensor] = {}
    for shard, names in shards.items():
        part = _read_shard(shard, names, lazy)
        dup = sorted(set(part) & set(sd))
        if dup:
            raise CheckpointError(f"{shard}: tensor(s) also present in another shard: "
                                  f"{listed(dup)}")
        sd.update(part)
    return found, sd, listed(shards, limit=4, width=200)


def _read_shard(shard: Path, names: Optional[list[str]],
                lazy: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; exactly ``names`` when an index lists them
    (``lazy``: as ``LazyTensor``s, nothing read)."""
    from safetensors import SafetensorError, safe_open

    if not shard.is_file():
        raise CheckpointError(f"{shard}: shard listed in the index is missing")
    try:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            present = set(f.keys())
            if names is not None:
                unlisted = sorted(present - set(names))
                if unlisted:
                    raise CheckpointError(
                        f"{shard}: holds tensor(s) the index does not list: {listed(unlisted)}")
                absent = sorted(set(names) - present)
                if absent:
                    raise CheckpointError(f"{shard}: tensor(s) the index places here are "
                                          f"missing: {listed(absent)}")
            if lazy:
                from .slices import read_lazy_shard
                return read_lazy_shard(f, shard, sorted(present))
            return {name: f.get_tensor(name) for name in sorted(present)}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{shard}: unreadable or truncated safetensors file: "
                              f"{_first_line(exc)}") from None


def _shards_from_index(index: Path) -> dict[Path, list[str]]:
    """Shard file -> the tensor names the index places in it. Every file must lie inside
    the index's directory (no absolute paths, no "..", no symlink leading out)."""
    weight_map = read_json_object(index, CheckpointError).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a valid safetensors index: \"weight_map\" must be "
                              "a non-empty mapping of tensor name to shard file, got "
                              f"{clip(repr(weight_map))}")
    root = index.parent.resolve()
    shards: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{index}: tensor {clip(name)} maps to {clip(repr(file))}, "
                                  "not a file name")
        target = index.parent / file
        if Path(file).is_absolute() or ".." in Path(file).parts or not _inside(target, root):
            raise CheckpointError(f"{index}: shard {clip(file)!r} of tensor {clip(name)} lies "
                                  f"outside the checkpoint directory {index.parent}")
        shards.setdefault(target, []).append(name)
    return shards


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):  # elsewhere, unresolvable, a symlink loop
        return False


# ---- checks and normalization ----------------------------------------------------------

def _resolve_config(override: ConfigLike, found: Optional[tuple[Any, str]],
                    where: str) -> tuple[MythosConfig, str]:
    """The config to use and where it came from (a file, or the config= argument): config
    errors name that, never the weights file."""
    if override is None and found is None:
        raise CheckpointError(f"{where}: the checkpoint carries no config; pass config= "
                              "(a MythosConfig, a dict or a config.json path)")
    if override is None:
        chosen, source = found
    elif isinstance(override, (str, os.PathLike)):
        chosen, source = read_json_object(Path(override), ConfigError), str(override)
    else:
        chosen, source = override, "config="
    try:
        if isinstance(chosen, MythosConfig):
            cfg = chosen
        else:
            cfg = MythosConfig.from_dict(chosen if isinstance(chosen, dict) else dict(chosen))
        return cfg.validate(), source
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:  # dict() of something that is not a mapping
        raise ConfigError(f"{source}: not a config mapping: {_first_line(exc)}") from None


def _canonicalize(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/FSDP/torch.compile wrapper components from every key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = [p for p in key.split(".") if p not in WRAPPER_PREFIXES]
        out[".".join(parts)] = value
    return out


def expected_shapes(cfg: MythosConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor in the reference model's state_dict.

    Written out from the config (a test checks it against ``OpenMythos(cfg).state_dict()``)
    because building even a meta-device model costs seconds of imports.
    """
    D, H, f32 = cfg.dim, cfg.n_heads, torch.float32
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, D)}

    def attention(p: str) -> None:
        if cfg.attn_type == "mla":
            qk = cfg.qk_nope_head_dim + cfg.v_head_dim
            shapes.update({
                p + "q_down.weight": (cfg.q_lora_rank, D), p + "q_norm.weight": (cfg.q_lora_rank,),
                p + "q_up_nope.weight": (H * cfg.qk_nope_head_dim, cfg.q_lora_rank),
                p + "q_up_rope.weight": (H * cfg.qk_rope_head_dim, cfg.q_lora_rank),
                p + "kv_down.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D),
                p + "kv_norm.weight": (cfg.kv_lora_rank,),
                p + "kv_up.weight": (H * qk, cfg.kv_lora_rank),
                p + "wo.weight": (D, H * cfg.v_head_dim)})
        else:
            kv = cfg.n_kv_heads * cfg.head_dim
            shapes.update({p + "wq.weight": (H * cfg.head_dim, D), p + "wk.weight": (kv, D),
                           p + "wv.weight": (kv, D), p + "wo.weight": (D, H * cfg.head_dim)})

    def expert(p: str, hidden: int) -> None:
        shapes.update({p + "gate.weight": (hidden, D), p + "up.weight": (hidden, D),
                       p + "down.weight": (D, hidden)})

    def block(p: str, moe: bool) -> None:
        shapes.update({p + "attn_norm.weight": (D,), p + "ffn_norm.weight": (D,)})
        attention(p + "attn.")
        if not moe:
            expert(p + "ffn.", cfg.dense_hidden)
            return
        shapes.update({p + "ffn.router.weight": (cfg.n_experts, D),
                       p + "ffn.router_bias": (cfg.n_experts,)})
        for i in range(cfg.n_experts):
            expert(f"{p}ffn.routed_experts.{i}.", cfg.expert_dim)
        for j in range(cfg.n_shared_experts):
            expert(f"{p}ffn.shared_experts.{j}.", cfg.shared_expert_dim)

    for i in range(cfg.prelude_layers):
        block(f"prelude.{i}.", moe=False)
    block("recurrent.block.", moe=True)
    shapes.update({
        "recurrent.injection.log_A": (D,), "recurrent.injection.log_dt": (1,),
        "recurrent.injection.B": (D,), "recurrent.act.halt.weight": (1, D),
        "recurrent.act.halt.bias": (1,), "recurrent.lora.down.weight": (cfg.lora_rank, D),
        "recurrent.lora.B": (cfg.lora_rank, D),
        "recurrent.lora.scale.weight": (cfg.max_loop_iters, cfg.lora_rank),
        "recurrent.norm.weight": (D,)})
    for i in range(cfg.coda_layers):
        block(f"coda.{i}.", moe=False)
    shapes.update({"norm.weight": (D,), "head.weight": (cfg.vocab_size, D)})
    out = {k: (v, f32) for k, v in shapes.items()}
    out["freqs_cis"] = ((cfg.max_seq_len, cfg.head_dim // 2), torch.complex64)
    out["freqs_cis_mla"] = ((cfg.max_seq_len, cfg.qk_rope_head_dim // 2), torch.complex64)
    return out


def _check_against_config(sd: dict[str, torch.Tensor], cfg: MythosConfig, where: str,
                          cfg_where: str, check_finite: bool, lazy: bool) -> None:
    """``lazy``: the weights are not read here (a tensor-parallel rank reads its share
    later, checked then), so only what loading allocates must fit."""
    try:  # before the config becomes tensors (RoPE tables) or a list of names
        check_fits(cfg, "cpu", "loading this checkpoint", dtype_bytes=MIN_WEIGHT_BYTES,
                   weights=not lazy)
    except ConfigError as exc:
        raise type(exc)(f"{cfg_where}: {exc}") from None
    if "head.weight" not in sd and "embed.weight" in sd:
        sd["head.weight"] = sd["embed.weight"]  # tied weights are often saved once
    held, described = sum(k not in DERIVED_BUFFERS for k in sd), parameter_count(cfg)[1]
    if abs(described - held) > MAX_LISTED_MISMATCH:
        raise CheckpointError(
            f"{where}: checkpoint does not match the config {cfg_where}: the config describes "
            f"{described} tensors (prelude_layers={cfg.prelude_layers}, coda_layers="
            f"{cfg.coda_layers}, n_experts={cfg.n_experts}, n_shared_experts="
            f"{cfg.n_shared_experts}), the checkpoint holds {held}")
    expected = expected_shapes(cfg)
    for name in DERIVED_BUFFERS:
        dim = cfg.head_dim if name == "freqs_cis" else cfg.qk_rope_head_dim
        sd[name] = precompute_rope_freqs(dim, cfg.max_seq_len, cfg.rope_theta)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {expected[k][0]}"
             for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != expected[k][0]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {listed(wrong, width=120)}")
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the config "
                              f"({cfg.attn_type}, dim={cfg.dim}): " + " | ".join(problems))
    for k, v in sd.items():
        if not (v.is_floating_point() or v.is_complex()):
            raise CheckpointError(f"{where}: tensor {k} has non-float dtype {v.dtype}")
        if (check_finite and not lazy and k not in DERIVED_BUFFERS
                and not bool(torch.isfinite(v).all())):
            n_bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"{where}: tensor {k} {tuple(v.shape)} contains {n_bad} "
                                  "NaN/Inf value(s)")


def _require_tensors(sd: Any, path: Path) -> None:
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: no tensors found")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:5]))}")


def _magic(path: Path, n: int = 4) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _looks_like_legacy_pickle(path: Path) -> bool:
    head = _magic(path, 2)
    return len(head) == 2 and head[0] == 0x80 and head[1] <= 5  # pickle PROTO opcode


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
