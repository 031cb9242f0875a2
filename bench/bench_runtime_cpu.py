"""CPU benchmark: compiled runtime (cpu backend) vs the eager reference(s).

Two modes. ``--preset NAME`` (e.g. ``mythos_1b``): the real preset with random weights
at batch 1 — one prompt (``--prompt`` tokens) prefilled by each model, then a few decode
tokens with the runtime, the eager reference and a read-bandwidth probe interleaved
step by step, at each of ``--threads``; decode seconds per token against the read floor
(the weight bytes a token reads / the bandwidth measured in the same run), prefill
tokens/s. Without ``--preset``: the small configuration below, whose numbers are about
per-call overhead, not the kernels (labelled so in its results).

Small configuration: decode ms per step (one new token for each of the batch's rows at a given cached
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
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mythos_rt  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.cpu import native  # noqa: E402
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


def _prefill_and_decode(models: dict, ids, n_loops: int, steps: int, probes: dict = None):
    """Prefill every model (KV cache, greedy), then decode ``steps`` tokens with the models
    (and ``probes``: name -> callable, timed alike) interleaved step by step, so machine
    noise hits them alike. Returns (prefill seconds per model, per-step decode seconds per
    model and probe)."""
    probes = probes or {}
    prefill, caches = {}, {}
    decode = {name: [] for name in [*models, *probes]}
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
            for name, probe in probes.items():
                decode[name].append(_time(probe))
    return prefill, decode


def _random_reference(cfg: MythosConfig, dtype: torch.dtype) -> OpenMythos:
    """The reference at ``cfg`` with random weights (scaled by fan-in, never zero)."""
    torch.manual_seed(0)
    ref = OpenMythos(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return ref.to(dtype)


def decode_bytes_per_token(ref: OpenMythos, cfg: MythosConfig, n_loops: int) -> int:
    """Weight bytes one decode token reads at batch 1: Prelude, Coda and the head once,
    the loop block ``n_loops`` times, of its routed experts only the ``top_k`` chosen (the
    tied embedding counts once, as the head's matrix)."""
    rest = loop = routed = 0
    for name, p in ref.named_parameters():
        size = p.numel() * p.element_size()
        if ".routed_experts." in name:
            routed += size
        elif name.startswith("recurrent."):
            loop += size
        else:
            rest += size
    return rest + n_loops * (loop + routed * cfg.n_experts_per_tok // cfg.n_experts)


def run_preset(preset: str, dtype: str = "float32", threads=(2, 1), prompt: int = 64,
               steps: int = 3, probe_mib: int = 512) -> tuple[list[dict], dict]:
    """Real-size runs (see the module docstring); returns (rows, facts about the model and
    the probe for the results file)."""
    cfg = dataclasses.replace(MythosConfig.from_preset(preset),
                              max_seq_len=prompt + steps + 8)
    n_loops = cfg.max_loop_iters
    pair = dtype == "both"  # the runtime in float32 and in bfloat16 (same weights), no eager
    refs = {d: _random_reference(cfg, getattr(torch, d))
            for d in (("float32", "bfloat16") if pair else (dtype,))}
    rts = {d: mythos_rt.compile(r, dtype=getattr(torch, d), max_batch_size=1,
                                max_seq_len=cfg.max_seq_len) for d, r in refs.items()}
    rt = next(iter(rts.values()))
    if pair:
        models = {f"mythos-rt {d}": r for d, r in rts.items()}
        weights_of = {f"mythos-rt {d}": r for d, r in refs.items()}
    else:
        models = {f"mythos-rt ({rt.backends['moe_ffn']} backend)": rt,
                  "eager reference": refs[dtype]}
        weights_of = dict.fromkeys(models, refs[dtype])
    model_bytes = {name: decode_bytes_per_token(r, cfg, n_loops) for name, r in weights_of.items()}
    bytes_per_token = next(iter(model_bytes.values()))
    probe = native.ReadProbe(probe_mib * 2**20)
    rt_name = next(iter(models))
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    rows, runs = [], {}
    for t in threads:
        torch.set_num_threads(t)
        runs[t] = _prefill_and_decode(models, ids, n_loops, steps, {"read probe": probe})
    # The floor: the weight bytes over the best bandwidth the probe saw in this run (the
    # machine's capability; a busy machine only slows a pass down).
    best_gbps = max(probe.gbps(p) for _, decode in runs.values() for p in decode["read probe"])
    floor_s = bytes_per_token / (best_gbps * 1e9)
    for t, (prefill, decode) in runs.items():
        for name in models:
            times = decode[name]
            floor = model_bytes[name] / (best_gbps * 1e9)
            r = {"name": name, "threads": t, "prompt": prompt,
                 "decode_s_per_token": round(statistics.median(times), 5),
                 "decode_s_range": [round(min(times), 5), round(max(times), 5)],
                 "pct_of_read_floor": round(100 * floor / statistics.median(times), 1),
                 "pct_of_read_floor_best_token": round(100 * floor / min(times), 1),
                 "prefill_s": round(prefill[name], 4),
                 "prefill_tok_s": round(prompt / prefill[name], 2)}
            if name != rt_name and pair:  # how much faster than the float32 runtime
                r["decode_speedup_vs_float32"] = round(statistics.median(
                    f / b for f, b in zip(decode[rt_name], times)), 2)
                r["prefill_speedup_vs_float32"] = round(prefill[rt_name] / prefill[name], 2)
            elif name != rt_name:
                r["rt_decode_speedup"] = round(statistics.median(
                    o / b for o, b in zip(times, decode[rt_name])), 2)
                r["rt_prefill_speedup"] = round(prefill[name] / prefill[rt_name], 2)
            rows.append(r)
        bw = [probe.gbps(p) for p in decode["read probe"]]
        rows.append({"name": "read probe", "threads": t,
                     "read_gbps_median": round(statistics.median(bw), 1),
                     "read_gbps_range": [round(min(bw), 1), round(max(bw), 1)]})
    facts = {"preset": preset, "dtype": dtype, "config": cfg.to_dict(), "n_loops": n_loops,
             "decode_bytes_per_token": bytes_per_token,
             "decode_bytes_per_token_by_model": model_bytes, "backends": rt.backends,
             "read_probe": f"{probe_mib} MiB of random float32, {probe.how}",
             "read_gbps_best": round(best_gbps, 1), "floor_s_per_token": round(floor_s, 6),
             "decode_tokens_per_thread_count": steps}
    return rows, facts


def _cpu_flags() -> str:
    """The CPU's vector-relevant feature flags (from /proc/cpuinfo)."""
    return native.cpu_facts()["cpu_flags"]


def _row_kernels(backend: str) -> str:
    """Whether decode ran the compiled row kernels, built by what, on how many threads."""
    if backend == "torch":
        return "not used: torch backend"
    lib = native.library()
    if lib is None:
        return native.describe()
    version = subprocess.run([native.compiler(), "--version"], capture_output=True,
                             text=True).stdout.splitlines()
    flags = " ".join(native.flags(bool(lib.has_openmp())))
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
    p.add_argument("--preset", help="a real preset (e.g. mythos_1b) instead of the small "
                                     "configuration: batch 1, random weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "both"],
                   help="storage dtype of both models (with --preset); both: the runtime in "
                        "float32 against itself in bfloat16, interleaved, no eager reference")
    p.add_argument("--threads", default="2,1",
                   help="torch thread counts to run, comma-separated (with --preset)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (with --preset)")
    p.add_argument("--steps", type=int, default=3,
                   help="decode tokens per thread count (with --preset)")
    p.add_argument("--note", default="", help="free text recorded in the results file "
                                              "(e.g. the machine's other load)")
    args = p.parse_args()
    if args.unabsorbed and args.attn != "mla":
        p.error("--unabsorbed applies to MLA only")
    if args.preset:
        _main_preset(args)
        return
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
                    model="small configuration (mythos_1b's structure at dim 256): "
                          "per-call overhead dominates, not the kernels",
                    quick=args.quick,
                    backend=args.backend, mla_unabsorbed=args.unabsorbed,
                    cpu_flags=_cpu_flags(), cpu_row_kernels=_row_kernels(args.backend),
                    method="decode: median over interleaved steps (models alternate step by "
                           "step); speedup: median of per-step time ratios; prefill: one run")
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def _main_preset(args) -> None:
    threads = tuple(int(t) for t in args.threads.split(","))
    rows, facts = run_preset(args.preset, args.dtype, threads, args.prompt, args.steps)
    for r in rows:
        if r["name"] == "read probe":
            print(f"threads {r['threads']}  read probe {r['read_gbps_median']} GB/s "
                  f"{r['read_gbps_range']}")
            continue
        extra = (f"  rt is {r['rt_decode_speedup']}x at decode, {r['rt_prefill_speedup']}x "
                 f"at prefill" if "rt_decode_speedup" in r else "")
        if "decode_speedup_vs_float32" in r:
            extra = (f"  {r['decode_speedup_vs_float32']}x the float32 runtime at decode, "
                     f"{r['prefill_speedup_vs_float32']}x at prefill")
        print(f"threads {r['threads']}  {r['name']:<28} decode {r['decode_s_per_token']} s/token "
              f"{r['decode_s_range']} ({r['pct_of_read_floor']}% of floor, best token "
              f"{r['pct_of_read_floor_best_token']}%)  prefill {r['prefill_tok_s']} tok/s{extra}")
    print(f"read floor {facts['floor_s_per_token']} s/token: "
          f"{facts['decode_bytes_per_token'] / 1e9:.2f} GB at {facts['read_gbps_best']} GB/s "
          f"(the best probe)")
    if args.out:
        from bench.harness import provenance
        meta = dict(provenance(), **facts, cpu_flags=_cpu_flags(),
                    cpu_row_kernels=_row_kernels(args.backend),
                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset (libgomp: spin)"),
                    note=args.note,
                    method="one prefill per model and thread count; decode: runtime, eager "
                           "and read probe interleaved token by token, medians and ranges; "
                           "speedup: median of per-token ratios; read floor: bytes per token "
                           "/ the best probe bandwidth of the run; % of floor: floor / median "
                           "(and / best) token time; --dtype both: the float32 and bfloat16 "
                           "runtimes in place of runtime and eager")
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
