"""CPU benchmark: compiled runtime (cpu backend) vs the eager reference(s), small config.

Decode ms per step (one new token for each of the batch's rows at a given cached
context; median over steps, the models interleaved step by step) and prefill tokens/s
for mythos-rt's compiled Runtime (``backend="auto"``: the cpu backend, with its
compiled row kernels where a C++ compiler exists; the JSON records which) against
``mythos_rt.reference`` (our eager oracle) and, when installed, upstream open-mythos
0.5.0 — same weights, same prompts, greedy. Prints a table and writes JSON with --out.
Not a test: timings depend on the machine; the ratio is the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mythos_rt  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.reference import OpenMythos  # noqa: E402

# mythos_1b's structure (MLA, 64 experts top-4, 2 shared, 16 loops) at a CPU-friendly width.
BENCH_CONFIG = dataclasses.replace(
    MythosConfig.from_preset("mythos_1b"), vocab_size=4096, dim=256, n_heads=4,
    kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    expert_dim=64, lora_rank=8, max_seq_len=1536, max_output_tokens=1536)
# (batch rows, cached tokens per row) at decode: the eager models re-read/re-expand all of
# them; batches 4 and 16 are small serving batches.
CASES = ((1, 128), (1, 1024), (4, 128), (16, 128))
QUICK_CASES = ((1, 32), (2, 16))


def _upstream(cfg):
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.upstream import upstream_main
        up = upstream_main()
    except Exception:  # noqa: BLE001 - optional comparison
        return None
    return up.OpenMythos(up.MythosConfig(**cfg.to_dict())).eval()


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_config(attn: str = "mla") -> MythosConfig:
    """BENCH_CONFIG, or the same model with GQA attention (4 query heads over 2 KV heads)."""
    if attn == "mla":
        return BENCH_CONFIG
    return dataclasses.replace(BENCH_CONFIG, attn_type="gqa", n_kv_heads=2)


def run(quick: bool = False, backend: str = "auto", attn: str = "mla") -> list[dict]:
    cfg = bench_config(attn)
    torch.manual_seed(0)
    ref = OpenMythos(cfg).eval()
    n_loops, steps = cfg.max_loop_iters, (3 if quick else 24)
    rt = mythos_rt.compile(ref, backend=backend, max_batch_size=max(b for b, _ in CASES))
    models = {f"mythos-rt ({rt.backends[f'{attn}_attention']} backend)": rt,
              "eager reference": ref}
    up = _upstream(cfg)
    if up is not None:
        up.load_state_dict(ref.state_dict())
        models["open-mythos 0.5.0"] = up
    rows = []
    for batch, context in (QUICK_CASES if quick else CASES):
        ids = torch.randint(0, cfg.vocab_size, (batch, context))
        prefill, decode = _prefill_and_decode(models, ids, n_loops, steps)
        base = next(iter(models))
        for name in models:
            step = statistics.median(decode[name])
            r = {"name": name, "batch": batch, "context": context,
                 "prefill_tok_s": round(batch * context / prefill[name], 1),
                 "decode_ms_per_step": round(step * 1e3, 2),
                 "decode_tok_s": round(batch / step, 1)}
            if name != base:  # median over steps of the per-step ratio (steps interleaved)
                r["rt_decode_speedup"] = round(statistics.median(
                    o / b for o, b in zip(decode[name], decode[base])), 2)
                r["rt_prefill_speedup"] = round(prefill[name] / prefill[base], 2)
            rows.append(r)
    return rows


def _prefill_and_decode(models: dict, ids, n_loops: int, steps: int):
    """Prefill every model (KV cache, greedy), then decode ``steps`` tokens with the models
    interleaved step by step, so machine noise hits them alike. Returns (prefill seconds
    per model, per-step decode seconds per model)."""
    prefill, decode, caches = {}, {name: [] for name in models}, {}
    tok = ids[:, -1:]
    with torch.no_grad():
        for name, model in models.items():
            if isinstance(model, mythos_rt.Runtime):
                prefill[name] = _time(lambda: model._prefill(list(ids), n_loops, want_all=False))
            else:
                caches[name] = {}
                prefill[name] = _time(lambda: model(ids, n_loops=n_loops, kv_cache=caches[name]))
        for i in range(steps):
            for name, model in models.items():
                if isinstance(model, mythos_rt.Runtime):
                    decode[name].append(_time(lambda: model._run_chunk(tok, n_loops)))
                else:
                    decode[name].append(_time(lambda: model(
                        tok, n_loops=n_loops, kv_cache=caches[name], start_pos=ids.shape[1] + i)))
    return prefill, decode


def _row_kernels(backend: str) -> str:
    """Whether decode ran the compiled row kernels, built by what, on how many threads."""
    from mythos_rt.cpu import native
    if backend == "torch":
        return "not used: torch backend"
    lib = native.library()
    if lib is None:
        return native.describe()
    version = subprocess.run([native.compiler(), "--version"], capture_output=True,
                             text=True).stdout.splitlines()
    flags = " ".join(native.FLAGS + ((native.OPENMP,) if lib.has_openmp() else ()))
    return (f"{native.describe()} ({flags}, by "
            f"{version[0] if version else native.compiler()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch"],
                   help="the runtime's backend (auto: cpu on a CPU)")
    p.add_argument("--unabsorbed", action="store_true",
                   help="keep the cpu backend's MLA projections unabsorbed (FOLD_LIMIT=0), "
                        "as mythos_1b-sized checkpoints get them")
    p.add_argument("--attn", default="mla", choices=["mla", "gqa"],
                   help="the model's attention (gqa: 4 query heads over 2 KV heads)")
    args = p.parse_args()
    if args.unabsorbed and args.attn != "mla":
        p.error("--unabsorbed applies to MLA only")
    torch.set_num_threads(2)
    if args.unabsorbed:
        from mythos_rt.cpu import attention
        attention.FOLD_LIMIT = 0.0
    rows = run(args.quick, args.backend, args.attn)
    for r in rows:
        extra = (f"  rt is {r['rt_decode_speedup']}x at decode, {r['rt_prefill_speedup']}x "
                 f"at prefill" if "rt_decode_speedup" in r else "")
        print(f"batch {r['batch']} context {r['context']:5d}  {r['name']:<26} decode "
              f"{r['decode_ms_per_step']:7.2f} ms/step  prefill {r['prefill_tok_s']:8.1f} "
              f"tok/s{extra}")
    if args.out:
        from bench.harness import provenance
        meta = dict(provenance(), device="cpu", config=bench_config(args.attn).to_dict(),
                    quick=args.quick,
                    backend=args.backend, mla_unabsorbed=args.unabsorbed,
                    cpu_row_kernels=_row_kernels(args.backend),
                    method="decode: median over interleaved steps (models alternate step by "
                           "step); speedup: median of per-step time ratios; prefill: one run")
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
