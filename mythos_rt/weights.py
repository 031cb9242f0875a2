"""Compile-time weight transforms: materialize a graph's weights from a state_dict.

This is the one place where weight layouts change. Each derived weight in the IR names
a recipe below and its source tensors; the recipes call the op families' own layout
helpers (MLA absorption, expert splitting, the LTI decay), so a layout is defined once.
A recipe may read slices of its sources (``derive["slices"]``, one ``[dim, start,
stop]`` or None per source: a tensor-parallel rank's share, ``mythos_rt.parallel``);
only those slices are read, from any state_dict whose values can be sliced lazily
(``mythos_rt.slices``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch

from .ir import Graph, WeightSpec
from .ops.attention import absorb_mla_weights
from .ops.moe import split_w13, split_w2
from .ops.recurrent import lti_decay
from .progress import bar


RECIPES: dict[str, Callable[[list[torch.Tensor], dict], torch.Tensor]] = {
    "mla_absorb_uk": lambda srcs, d: absorb_mla_weights(srcs[0], d["n_heads"], d["nope"], d["v_dim"])[0],
    "mla_absorb_uv": lambda srcs, d: absorb_mla_weights(srcs[0], d["n_heads"], d["nope"], d["v_dim"])[1],
    # sources: [gate0, up0, gate1, up1, ...] and [down0, down1, ...]
    "moe_pack_w13": lambda srcs, d: torch.stack([blk for gate, up in zip(srcs[0::2], srcs[1::2])
                                                 for blk in split_w13(gate, up, d["expert_dim"])]),
    "moe_pack_w2": lambda srcs, d: torch.stack([blk for down in srcs
                                                for blk in split_w2(down, d["expert_dim"])]),
    "concat_rows": lambda srcs, d: torch.cat(srcs, dim=0),
    "lti_decay": lambda srcs, d: lti_decay(*srcs),
    # a copy: a slice of an in-memory tensor must not keep the whole one alive
    "take": lambda srcs, d: srcs[0].clone(memory_format=torch.contiguous_format),
    # a vocabulary shard: its rows, then zero rows up to d["rows"]
    "pad_rows": lambda srcs, d: torch.cat([srcs[0], srcs[0].new_zeros(
        d["rows"] - srcs[0].shape[0], *srcs[0].shape[1:])]),
}


def materialize(g: Graph, state_dict: Mapping[str, torch.Tensor], device: torch.device,
                progress: bool = False,
                names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Return name → tensor for every weight the graph's ops read (or only ``names``), in
    the IR's dtypes.

    Derived weights are computed from their sources in float32 and then cast; source-only
    checkpoint weights are not kept, so packed experts are not stored twice.
    """
    wanted = g.weight_names_used() if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    tied: dict[tuple, torch.Tensor] = {}  # checkpoint tensors sharing storage stay shared
    for name in bar([n for n in g.weights if n in wanted], desc="packing weights",
                    enabled=progress):
        spec = g.weights[name]
        src = _make(name, spec, state_dict)
        if spec.derive is not None:
            out[name] = src.to(device=device, dtype=_dtype(spec))
            continue
        key = (src.data_ptr(), tuple(src.shape), src.stride(), spec.dtype)
        if key not in tied:
            tied[key] = src.detach().to(device=device, dtype=_dtype(spec))
        out[name] = tied[key]
    return out


def sources(g: Graph, names: Iterable[str]) -> set[str]:
    """The checkpoint weights that materializing ``names`` reads."""
    return {s for n in names
            for s in (g.weights[n].derive["from"] if g.weights[n].derive else [n])}


def _make(name: str, spec: WeightSpec, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if spec.derive is None:
        t = _read(sd, name, None)
    else:
        recipe = RECIPES.get(spec.derive["fn"])
        if recipe is None:
            raise KeyError(f"weight {name!r}: unknown derivation {spec.derive['fn']!r}")
        slices = spec.derive.get("slices") or [None] * len(spec.derive["from"])
        t = recipe([_read(sd, s, sl).float() for s, sl in zip(spec.derive["from"], slices)],
                   spec.derive)
    if tuple(t.shape) != tuple(spec.shape):
        raise ValueError(f"weight {name!r}: made shape {tuple(t.shape)}, IR says {spec.shape}")
    return t


def _read(sd: Mapping[str, torch.Tensor], name: str, sl: Optional[list]) -> torch.Tensor:
    """``sd[name]``, or its slice ``[dim, start, stop]``: a lazy checkpoint tensor
    (``slices.LazyTensor``) reads only that, a tensor gives a view."""
    if name not in sd:
        raise KeyError(f"weight {name!r} is not in the state_dict")
    src = sd[name]
    if sl is None:
        return src if isinstance(src, torch.Tensor) else src.read()
    dim, start, stop = sl
    if not isinstance(src, torch.Tensor):
        return src.read_slice(dim, start, stop)
    return src.narrow(dim, start, stop - start)


def _dtype(spec: WeightSpec) -> torch.dtype:
    return getattr(torch, spec.dtype)
