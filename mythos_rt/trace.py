"""Tracer: an OpenMythos-structured module (ours or upstream's) or a checkpoint → IR.

The tracer recognizes modules structurally (class name + expected children), so both
``mythos_rt.reference.OpenMythos`` and ``open_mythos.main.OpenMythos`` trace to the same
graph. Any module it does not recognize is an error naming its path and type: we never
silently drop computation. Weights are referenced by their state_dict names.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Union

import torch
import torch.nn as nn

from .checkpoint import expected_shapes, load_checkpoint
from .config import MythosConfig
from .ir import Graph, Op, TensorSpec, WeightSpec


class TraceError(ValueError):
    """The module is not an OpenMythos-structured model we can compile."""


# class name -> the children it must have (Dropout children are allowed and ignored:
# this is an inference compiler, dropout is the identity).
_STRUCTURE = {
    "OpenMythos": {"embed", "prelude", "recurrent", "coda", "norm", "head"},
    "TransformerBlock": {"attn_norm", "ffn_norm", "attn", "ffn"},
    "MLAttention": {"q_down", "q_norm", "q_up_nope", "q_up_rope", "kv_down", "kv_norm",
                    "kv_up", "wo"},
    "GQAttention": {"wq", "wk", "wv", "wo"},
    "MoEFFN": {"router", "routed_experts", "shared_experts"},
    "Expert": {"gate", "up", "down"},
    "RecurrentBlock": {"block", "injection", "act", "lora", "norm"},
    "LTIInjection": set(),
    "ACTHalting": {"halt"},
    "LoRAAdapter": {"down", "scale"},
    "RMSNorm": set(),
    "ModuleList": None,  # checked by the parent
    "Linear": set(),
    "Embedding": set(),
}


def _check(module: nn.Module, path: str, expect: str | tuple[str, ...]) -> None:
    name = type(module).__name__
    allowed = (expect,) if isinstance(expect, str) else expect
    if name not in allowed:
        raise TraceError(f"cannot trace {path or '<root>'}: unrecognized module type "
                         f"{type(module).__module__}.{name} (expected {' or '.join(allowed)})")
    want = _STRUCTURE[name]
    if want is None:
        return
    children = {n for n, m in module.named_children() if type(m).__name__ != "Dropout"}
    missing, extra = want - children, children - want
    if missing or extra:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(sorted(missing))}" if missing else "",
            f"unrecognized {', '.join(f'{path}.{c} ({type(getattr(module, c)).__name__})' for c in sorted(extra))}" if extra else ""]))
        raise TraceError(f"cannot trace {path or '<root>'} ({name}): {detail}")


def _config_of(model: nn.Module) -> MythosConfig:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TraceError("cannot trace <root>: the model has no .cfg (an OpenMythos model "
                         "carries its MythosConfig as model.cfg)")
    data = cfg.to_dict() if isinstance(cfg, MythosConfig) else (
        dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg)))
    return MythosConfig.from_dict(data).validate()


def check_structure(model: nn.Module) -> MythosConfig:
    """Verify the whole module tree is one we can compile; return its config."""
    _check(model, "", "OpenMythos")
    cfg = _config_of(model)
    _check(model.embed, "embed", "Embedding")
    _check(model.norm, "norm", "RMSNorm")
    _check(model.head, "head", "Linear")
    attn_cls = "MLAttention" if cfg.attn_type == "mla" else "GQAttention"
    for stack in ("prelude", "coda"):
        _check(getattr(model, stack), stack, "ModuleList")
        for i, block in enumerate(getattr(model, stack)):
            _check_block(block, f"{stack}.{i}", attn_cls, moe=False)
    rec = model.recurrent
    _check(rec, "recurrent", "RecurrentBlock")
    _check_block(rec.block, "recurrent.block", attn_cls, moe=True)
    _check(rec.injection, "recurrent.injection", "LTIInjection")
    _check(rec.act, "recurrent.act", "ACTHalting")
    _check(rec.act.halt, "recurrent.act.halt", "Linear")
    _check(rec.lora, "recurrent.lora", "LoRAAdapter")
    _check(rec.norm, "recurrent.norm", "RMSNorm")
    return cfg


def _check_block(block: nn.Module, path: str, attn_cls: str, moe: bool) -> None:
    _check(block, path, "TransformerBlock")
    _check(block.attn_norm, f"{path}.attn_norm", "RMSNorm")
    _check(block.ffn_norm, f"{path}.ffn_norm", "RMSNorm")
    _check(block.attn, f"{path}.attn", attn_cls)
    for child, m in block.attn.named_children():
        if type(m).__name__ != "Dropout":
            _check(m, f"{path}.attn.{child}", ("RMSNorm",) if child.endswith("norm") else ("Linear",))
    if moe:
        _check(block.ffn, f"{path}.ffn", "MoEFFN")
        for group in ("routed_experts", "shared_experts"):
            for j, expert in enumerate(getattr(block.ffn, group)):
                _check(expert, f"{path}.ffn.{group}.{j}", "Expert")
    else:
        _check(block.ffn, f"{path}.ffn", "Expert")


# ---- graph construction ------------------------------------------------------------------

class _Builder:
    """Appends ops to a graph, naming values uniquely."""

    def __init__(self, graph: Graph, dtype: str):
        self.g, self.dtype = graph, dtype

    def op(self, kind, name, inputs, n_out=1, weights=None, attrs=None, shape=("N", "D"),
           body=None) -> list[str]:
        outs = [f"{name}" if n_out == 1 else f"{name}.{i}" for i in range(n_out)]
        for o in outs:
            self.g.values[o] = TensorSpec(tuple(shape), self.dtype)
        self.g.ops.append(Op(kind, name, list(inputs), outs, dict(weights or {}),
                             dict(attrs or {}), body))
        return outs


def _block_ops(b: _Builder, x: str, prefix: str, cfg: MythosConfig, moe: bool,
               cache: str | dict) -> str:
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(.))."""
    p = prefix
    (n1,) = b.op("rmsnorm", f"{p}attn_norm", [x], weights={"w": f"{p}attn_norm.weight"})
    if cfg.attn_type == "mla":
        names = ["q_down", "q_up_nope", "q_up_rope", "kv_down", "kv_up", "wo"]
        w = {n: f"{p}attn.{n}.weight" for n in names}
        w |= {"q_norm": f"{p}attn.q_norm.weight", "kv_norm": f"{p}attn.kv_norm.weight"}
        (a,) = b.op("mla_attention", f"{p}attn", [n1], weights=w, attrs={"cache": cache})
    else:
        w = {n: f"{p}attn.{n}.weight" for n in ("wq", "wk", "wv", "wo")}
        (a,) = b.op("gqa_attention", f"{p}attn", [n1], weights=w, attrs={"cache": cache})
    (r,) = b.op("add", f"{p}attn_residual", [x, a])
    (n2,) = b.op("rmsnorm", f"{p}ffn_norm", [r], weights={"w": f"{p}ffn_norm.weight"})
    if moe:
        w = {"router": f"{p}ffn.router.weight", "router_bias": f"{p}ffn.router_bias"}
        for i in range(cfg.n_experts):
            for m in ("gate", "up", "down"):
                w[f"routed.{i}.{m}"] = f"{p}ffn.routed_experts.{i}.{m}.weight"
        for j in range(cfg.n_shared_experts):
            for m in ("gate", "up", "down"):
                w[f"shared.{j}.{m}"] = f"{p}ffn.shared_experts.{j}.{m}.weight"
        (f,) = b.op("moe", f"{p}ffn", [n2], weights=w,
                    attrs={"top_k": cfg.n_experts_per_tok, "n_experts": cfg.n_experts,
                           "n_shared": cfg.n_shared_experts, "expert_dim": cfg.expert_dim})
    else:
        w = {m: f"{p}ffn.{m}.weight" for m in ("gate", "up", "down")}
        (f,) = b.op("dense_ffn", f"{p}ffn", [n2], weights=w)
    (out,) = b.op("add", f"{p}ffn_residual", [r, f])
    return out


def build_graph(cfg: MythosConfig, dtype: torch.dtype = torch.float32) -> Graph:
    """The Prelude–Loop–Coda graph of an OpenMythos model with config ``cfg``."""
    dt = str(dtype).replace("torch.", "")
    g = Graph("openmythos", inputs=["input_ids"], outputs=["logits"],
              attrs={"config": cfg.to_dict()})
    g.values["input_ids"] = TensorSpec(("N",), "int64")
    g.weights = {k: WeightSpec(shape, dt if v.is_floating_point else str(v).replace("torch.", ""))
                 for k, (shape, v) in expected_shapes(cfg).items()
                 if k not in ("freqs_cis", "freqs_cis_mla")}
    b = _Builder(g, dt)
    (x,) = b.op("embed", "embed", ["input_ids"], weights={"w": "embed.weight"})
    for i in range(cfg.prelude_layers):
        x = _block_ops(b, x, f"prelude.{i}.", cfg, moe=False, cache=f"prelude_{i}")

    # Loop body, captured once: inputs h (state), e (frozen prelude output), t (index).
    body = Graph("recurrent_step", inputs=["h", "e", "t"], outputs=["h_next"])
    body.values.update(h=TensorSpec(("N", "D"), dt), e=TensorSpec(("N", "D"), dt),
                       t=TensorSpec((), "int64"))
    bb = _Builder(body, dt)
    (le,) = bb.op("loop_embed", "loop_embed", ["h", "t"], attrs={"loop_dim": cfg.loop_dim})
    (s,) = bb.op("add", "inject_e", [le, "e"])
    (c,) = bb.op("rmsnorm", "recurrent.norm", [s], weights={"w": "recurrent.norm.weight"})
    out = _block_ops(bb, c, "recurrent.block.", cfg, moe=True,
                     cache={"per_loop": "recurrent_loop_{t}"})
    (d,) = bb.op("lora", "recurrent.lora", [out, "t"],
                 weights={"down": "recurrent.lora.down.weight", "B": "recurrent.lora.B",
                          "scale": "recurrent.lora.scale.weight"},
                 attrs={"max_loops": cfg.max_loop_iters})
    (o2,) = bb.op("add", "lora_residual", [out, d])
    (hn,) = bb.op("lti_inject", "recurrent.injection", ["h", "e", o2],
                  weights={"log_A": "recurrent.injection.log_A",
                           "log_dt": "recurrent.injection.log_dt",
                           "B": "recurrent.injection.B"})
    bb.op("act_update", "recurrent.act", [hn], n_out=0,
          weights={"w": "recurrent.act.halt.weight", "b": "recurrent.act.halt.bias"},
          attrs={"threshold": cfg.act_threshold})
    body.outputs = [hn]
    (x,) = b.op("loop", "recurrent", [x, x], body=body,
                attrs={"max_loop_iters": cfg.max_loop_iters, "threshold": cfg.act_threshold,
                       "result": "act_weighted_sum"})

    for i in range(cfg.coda_layers):
        x = _block_ops(b, x, f"coda.{i}.", cfg, moe=False, cache=f"coda_{i}")
    (n,) = b.op("rmsnorm", "norm", [x], weights={"w": "norm.weight"})
    b.op("head", "logits", [n], weights={"w": "head.weight"}, shape=("N", "vocab"))
    return g.verify()


def trace(model_or_path: Union[nn.Module, str, os.PathLike], config: Any = None,
          lazy: bool = False) -> tuple[Graph, MythosConfig, dict[str, torch.Tensor]]:
    """Capture (graph, config, state_dict) from a module or a checkpoint path (``lazy``:
    see ``load_checkpoint``)."""
    if isinstance(model_or_path, nn.Module):
        cfg = check_structure(model_or_path)
        sd = dict(model_or_path.state_dict())
        dtype = model_or_path.embed.weight.dtype
    elif isinstance(model_or_path, (str, os.PathLike)):
        cfg, sd = load_checkpoint(model_or_path, config, lazy=lazy)
        dtype = sd["embed.weight"].dtype
    else:
        raise TraceError(f"expected an OpenMythos nn.Module or a checkpoint path, got "
                         f"{type(model_or_path).__name__}")
    sd.pop("freqs_cis", None)
    sd.pop("freqs_cis_mla", None)
    return build_graph(cfg, dtype), cfg, sd
