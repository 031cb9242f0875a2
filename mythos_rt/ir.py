"""The mythos-rt IR: a small typed graph in the model's own vocabulary.

A ``Graph`` is a list of ``Op``s over named values. Each op names its inputs/outputs,
the weights it reads (role → weight name) and JSON-able attributes. The recurrent
loop is one ``loop`` op whose ``body`` is a Graph captured once; the loop index is the
body's input ``t`` (never unrolled). Weights are ``WeightSpec``s: either read from the
checkpoint by name or *derived* at compile time by a recipe that passes attach (MLA
absorption, expert packing, LTI decay) — passes stay pure IR → IR functions, and all
weight transforms run in one place (``lower.materialize_weights``).

Shapes use symbols for runtime sizes: ``N`` = batch × new tokens.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Optional

IR_VERSION = 1

OP_KINDS = {
    # kind: (description)
    "embed": "token ids -> embeddings",
    "rmsnorm": "x * rsqrt(mean(x^2)+eps) * w",
    "add_rmsnorm": "s = a + b; (rmsnorm(s), s)",
    "add": "a + b",
    "mla_attention": "multi-latent attention sublayer with its KV cache",
    "gqa_attention": "grouped-query attention sublayer with its KV cache",
    "dense_ffn": "SwiGLU FFN",
    "moe": "routed + shared SwiGLU experts",
    "loop": "recurrent region: body run n_loops times with loop index t",
    "loop_embed": "h + sinusoidal loop-index embedding on the first dim//8 channels",
    "lora": "depth-wise LoRA delta (down(x) * scale[min(t, max-1)]) @ B",
    "lti_inject": "A*h + B*e + out",
    "act_update": "ACT halting: accumulate weighted h into h_out, update cum_p/halted",
    "loop_prologue": "fused: rmsnorm(h + loop_embed(t) + e)",
    "loop_epilogue": "fused: LoRA + LTI injection + ACT update (+ next prologue)",
    "head": "logits = x @ W^T",
    "all_reduce": "sum x over the tensor-parallel ranks (in place)",
    "all_gather": "concatenate the ranks' vocabulary shards of the logits",
}


class IRError(ValueError):
    """Malformed IR (unknown op, dangling value, bad JSON)."""


@dataclass
class TensorSpec:
    shape: tuple  # ints and symbol strings
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(s) for s in self.shape)}]"


@dataclass
class WeightSpec:
    shape: tuple
    dtype: str
    derive: Optional[dict] = None  # {"fn": recipe name, "from": [weight names], **params}

    def __str__(self) -> str:
        src = "" if self.derive is None else f" = {self.derive['fn']}({', '.join(self.derive['from'])})"
        return f"{self.dtype}[{', '.join(str(s) for s in self.shape)}]{src}"


@dataclass
class Op:
    kind: str
    name: str
    inputs: list[str]
    outputs: list[str]
    weights: dict[str, str] = field(default_factory=dict)  # role -> weight name
    attrs: dict[str, Any] = field(default_factory=dict)
    body: Optional["Graph"] = None  # loop region only

    def __post_init__(self):
        if self.kind not in OP_KINDS:
            raise IRError(f"unknown op kind {self.kind!r} (op {self.name!r})")


@dataclass
class Graph:
    name: str
    inputs: list[str]
    outputs: list[str]
    values: dict[str, TensorSpec] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    weights: dict[str, WeightSpec] = field(default_factory=dict)  # top-level graph only
    attrs: dict[str, Any] = field(default_factory=dict)

    # ---- traversal --------------------------------------------------------------------
    def walk(self):
        """Yield every op, descending into loop bodies (body ops after their loop)."""
        for op in self.ops:
            yield op
            if op.body is not None:
                yield from op.body.walk()

    def find(self, kind: str) -> list[Op]:
        return [op for op in self.walk() if op.kind == kind]

    def weight_names_used(self) -> set[str]:
        return {w for op in self.walk() for w in op.weights.values()}

    def clone(self) -> "Graph":
        return copy.deepcopy(self)

    # ---- checks -----------------------------------------------------------------------
    def verify(self) -> "Graph":
        """Every input is defined before use; every weight exists. Raise IRError if not."""
        self._verify_scope(set(self.inputs), self.weights)
        return self

    def _verify_scope(self, defined: set[str], weights: dict) -> None:
        for op in self.ops:
            for v in op.inputs:
                if v not in defined:
                    raise IRError(f"op {op.name!r} reads undefined value %{v}")
            for role, w in op.weights.items():
                if w not in weights:
                    raise IRError(f"op {op.name!r} reads unknown weight {w!r} ({role})")
            if op.body is not None:
                op.body._verify_scope(set(op.body.inputs), weights)
            defined.update(op.outputs)
        for v in self.outputs:
            if v not in defined:
                raise IRError(f"graph {self.name!r} output %{v} is never defined")

    # ---- text form --------------------------------------------------------------------
    def to_text(self) -> str:
        lines = [f"graph {self.name}({', '.join('%' + i for i in self.inputs)}) "
                 f"-> ({', '.join('%' + o for o in self.outputs)})"]
        if self.attrs:
            lines.append("  attrs " + _fmt_attrs(self.attrs))
        if self.weights:
            lines.append(f"  weights ({len(self.weights)}):")
            for name in sorted(self.weights):
                lines.append(f"    {name}: {self.weights[name]}")
        lines += self._ops_text(indent=2)
        return "\n".join(lines) + "\n"

    def _ops_text(self, indent: int) -> list[str]:
        pad = " " * indent
        out = []
        for op in self.ops:
            outs = ", ".join(f"%{o}: {self.values[o]}" if o in self.values else f"%{o}"
                             for o in op.outputs)
            args = ", ".join("%" + i for i in op.inputs)
            extra = []
            if op.attrs:
                extra.append(_fmt_attrs(op.attrs))
            if op.weights:
                extra.append("weights{" + ", ".join(f"{r}={w}" for r, w in op.weights.items()) + "}")
            out.append(f"{pad}{outs} = {op.kind}({args})  # {op.name} " + " ".join(extra))
            if op.body is not None:
                out.append(f"{pad}  body({', '.join('%' + i for i in op.body.inputs)}) -> "
                           f"({', '.join('%' + o for o in op.body.outputs)}):")
                out += op.body._ops_text(indent + 4)
        return out

    # ---- JSON form --------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"ir_version": IR_VERSION, "graph": _graph_to_obj(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Graph":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise IRError(f"IR is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("ir_version") != IR_VERSION:
            raise IRError(f"unsupported IR version {data.get('ir_version') if isinstance(data, dict) else None!r}"
                          f" (this mythos-rt reads version {IR_VERSION})")
        return _graph_from_obj(data["graph"]).verify()


def _fmt_attrs(attrs: dict) -> str:
    return "{" + ", ".join(f"{k}={v!r}" for k, v in attrs.items()) + "}"


def _graph_to_obj(g: Graph) -> dict:
    return {
        "name": g.name, "inputs": g.inputs, "outputs": g.outputs, "attrs": g.attrs,
        "values": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in g.values.items()},
        "weights": {k: {"shape": list(w.shape), "dtype": w.dtype, "derive": w.derive}
                    for k, w in g.weights.items()},
        "ops": [{"kind": op.kind, "name": op.name, "inputs": op.inputs, "outputs": op.outputs,
                 "weights": op.weights, "attrs": op.attrs,
                 "body": None if op.body is None else _graph_to_obj(op.body)} for op in g.ops],
    }


def _graph_from_obj(d: dict) -> Graph:
    try:
        return Graph(
            name=d["name"], inputs=list(d["inputs"]), outputs=list(d["outputs"]),
            attrs=dict(d["attrs"]),
            values={k: TensorSpec(tuple(v["shape"]), v["dtype"]) for k, v in d["values"].items()},
            weights={k: WeightSpec(tuple(w["shape"]), w["dtype"], w["derive"])
                     for k, w in d["weights"].items()},
            ops=[Op(kind=o["kind"], name=o["name"], inputs=list(o["inputs"]),
                    outputs=list(o["outputs"]), weights=dict(o["weights"]), attrs=dict(o["attrs"]),
                    body=None if o["body"] is None else _graph_from_obj(o["body"]))
                 for o in d["ops"]],
        )
    except (KeyError, TypeError) as exc:
        raise IRError(f"malformed IR JSON: missing or bad field {exc}") from None

