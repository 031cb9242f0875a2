"""CPU benchmark: compiled runtime (torch backend) vs the eager reference(s), small config.

Decode tokens/s and prefill tokens/s for mythos-rt's compiled Runtime against
``mythos_rt.reference`` (our eager oracle) and, when installed, upstream open-mythos
0.5.0 — same weights, same prompt, greedy. Prints a table and writes JSON with --out.
Not a test: timings depend on the machine; the ratio is the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
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
    expert_dim=64, lora_rank=8, max_seq_len=512, max_output_tokens=512)


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


def run(quick: bool = False) -> list[dict]:
    cfg = BENCH_CONFIG
    torch.manual_seed(0)
    ref = OpenMythos(cfg).eval()
    prompt_len, new = (32, 4) if quick else (128, 16)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len))
    n_loops = cfg.max_loop_iters
    rt = mythos_rt.compile(ref, backend="torch", max_batch_size=1)
    models = {"mythos-rt (torch backend)": None, "eager reference": ref}
    up = _upstream(cfg)
    if up is not None:
        up.load_state_dict(ref.state_dict())
        models["open-mythos 0.5.0"] = up
    rows = []
    for name, model in models.items():
        if model is None:
            rt.generate(ids, 2, n_loops=n_loops)  # warm-up
            prefill = _time(lambda: rt.forward(ids, n_loops=n_loops))
            total = _time(lambda: rt.generate(ids, new, n_loops=n_loops))
        else:
            with torch.no_grad():
                prefill = _time(lambda: model(ids, n_loops=n_loops, kv_cache={}))
                total = _time(lambda: _generate(model, ids, new, n_loops))
        decode = max(total - prefill, 1e-9) / max(new - 1, 1)
        rows.append({"name": name, "prefill_tok_s": prompt_len / prefill,
                     "decode_ms_per_token": decode * 1e3, "decode_tok_s": 1 / decode})
    base = rows[0]
    for r in rows[1:]:
        r["rt_decode_speedup"] = round(r["decode_ms_per_token"] / base["decode_ms_per_token"], 2)
        r["rt_prefill_speedup"] = round(base["prefill_tok_s"] / r["prefill_tok_s"], 2)
    return rows


def _generate(model, ids, new, n_loops):
    """Greedy cached decode the way upstream's generate runs it (works for both models)."""
    cache: dict = {}
    with torch.no_grad():
        logits = model(ids, n_loops=n_loops, kv_cache=cache)
        for step in range(new - 1):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, n_loops=n_loops, kv_cache=cache, start_pos=ids.shape[1] + step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = run(args.quick)
    for r in rows:
        extra = (f"  rt is {r['rt_decode_speedup']}x at decode, {r['rt_prefill_speedup']}x "
                 f"at prefill" if "rt_decode_speedup" in r else "")
        print(f"{r['name']:<28} decode {r['decode_ms_per_token']:8.2f} ms/token  "
              f"prefill {r['prefill_tok_s']:8.1f} tok/s{extra}")
    if args.out:
        meta = {"device": "cpu", "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "config": BENCH_CONFIG.to_dict(), "quick": args.quick}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
