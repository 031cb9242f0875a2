"""Adaptive depth (act_mode lazy / reuse) against eager depth, on CPU.

Two workloads:

* ``synthetic``: mythos_1b's structure at the CPU-friendly width of
  ``bench_runtime_cpu.BENCH_CONFIG`` (random weights) with the halting head calibrated by
  ``mythos_rt.testing.spread_act_halting`` (``--bias`` sets how early positions halt);
  ``--preset mythos_1b`` runs it at the real preset instead (random weights scaled by
  fan-in; ``--batches 1`` and ``--skip-trained`` keep such a run to minutes);
* ``trained``: the shipped demo model (``mythos_rt/assets/docstrings_lm``) on held-out
  docstring text, at its trained depth (8) and beyond (16).

For each: decode tokens/s at batch 1 and 8 (a prompt prefilled, then greedy tokens; the
modes interleaved, median of ``--reps``) and the work counters of ``Runtime.last_stats``
(block evaluations run vs eager's, catch-up share, halting histogram). The trained model
also gets held-out bits/byte and next-byte accuracy per mode, computed token by token
(``chunk=1``, so every position is a decode step and "reuse" really reuses), and the
logit deviation of "lazy" and "reuse" from eager. Writes JSON + Markdown with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mythos_rt  # noqa: E402
from bench.bench_runtime_cpu import BENCH_CONFIG, _cpu_flags, _random_reference  # noqa: E402
from bench.harness import markdown_table, provenance  # noqa: E402
from mythos_rt.config import MythosConfig  # noqa: E402
from mythos_rt.reference import OpenMythos  # noqa: E402
from mythos_rt.testing import rel_err, spread_act_halting  # noqa: E402
from mythos_rt.tokenizer import ByteTokenizer  # noqa: E402

MODES = ("eager", "lazy", "reuse")
DEMO = ROOT / "mythos_rt" / "assets" / "docstrings_lm"


def _train_script():
    spec = importlib.util.spec_from_file_location("train_demo_model",
                                                  ROOT / "scripts" / "train_demo_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decode_rows(model, prompts: torch.Tensor, new: int, n_loops: int, reps: int,
                 **compile_kw) -> list[dict]:
    """Decode tokens/s and counters per mode, the modes interleaved rep by rep.

    A rep streams ``new`` tokens and times the steps after the first (the first includes
    the prefill), so no separately timed prefill is subtracted. The machine may be shared:
    each mode's time is its median rep, its speedup the median of its per-rep ratios to
    the eager rep next to it."""
    B = prompts.shape[0]
    rts = {m: mythos_rt.compile(model, max_batch_size=B, max_loops=n_loops, act_mode=m,
                                **compile_kw) for m in MODES}
    times = {m: [] for m in MODES}
    outs, stats = {}, {}
    for _ in range(reps + 1):  # the first round warms up
        for m, rt in rts.items():
            steps = rt.stream(prompts, new, n_loops=n_loops)
            ids = [torch.as_tensor(next(steps))]
            t0 = time.perf_counter()
            ids += [torch.as_tensor(step) for step in steps]
            times[m].append((time.perf_counter() - t0) / max(1, new - 1))
            outs[m] = torch.stack(ids, 1)
            stats[m] = rt.last_stats
    rows = []
    for m in MODES:
        s = stats[m]
        ms = statistics.median(times[m][1:]) * 1e3
        ratios = [e / t for e, t in zip(times["eager"][1:], times[m][1:])]
        rows.append({"mode": m, "batch": B, "n_loops": n_loops, "decode_ms_per_step": round(ms, 3),
                     "tokens_per_s": round(B / ms * 1e3, 2),
                     "decode_ms_per_rep": [round(t * 1e3, 3) for t in times[m][1:]],
                     "speedup_vs_eager": round(statistics.median(ratios), 3),
                     "block_evals": s["block_evals"], "eager_block_evals": s["eager_block_evals"],
                     "evals_saved_pct": round(100 * (1 - s["block_evals"] / s["eager_block_evals"]), 1),
                     "catchup_evals": s["catchup_evals"], "reused_entries": s["reused_entries"],
                     "passes": s["passes"], "eager_passes": s["eager_passes"],
                     "passes_vs_eager": round(s["passes"] / s["eager_passes"], 3),
                     "pass_rows": s["pass_rows"], "empty_passes": s["empty_passes"],
                     "padding_pct": round(100 * (1 - s["block_evals"] / s["pass_rows"]), 1),
                     "greedy_ids_equal_eager": bool(torch.equal(outs[m], outs["eager"])),
                     "halt_histogram": s["halt_histogram"]})
    return rows


def synthetic_config(args) -> MythosConfig:
    """mythos_1b shrunk to dim 256, or with ``--preset`` the real preset (its cache only
    as long as the run needs)."""
    if args.preset:
        return dataclasses.replace(MythosConfig.from_preset(args.preset), attn_type=args.attn,
                                   max_seq_len=args.prompt + args.new + 8)
    return dataclasses.replace(BENCH_CONFIG, attn_type=args.attn)


def synthetic(args) -> list[dict]:
    cfg = synthetic_config(args)
    if args.preset:  # random weights scaled by fan-in, as bench_runtime_cpu's real-size runs
        model = _random_reference(cfg, getattr(torch, args.dtype))
        what = f"synthetic: {args.preset} (real size, random weights, {args.dtype})"
    else:
        torch.manual_seed(0)
        model = OpenMythos(cfg).eval()
        what = f"synthetic: mythos_1b shrunk to dim {cfg.dim}"
    prompts = torch.randint(0, cfg.vocab_size, (8, args.prompt))
    spread_act_halting(model, prompts, bias=args.bias, spread=args.spread)
    rows = []
    for B in args.batches:
        for r in _decode_rows(model, prompts[:B], args.new, 16, args.reps):
            rows.append({"workload": f"{what} (bias {args.bias}, spread {args.spread})", **r})
    return rows


def trained(args) -> tuple[list[dict], list[dict]]:
    train = _train_script()
    _, held_out = train.docstring_corpus(Path(sysconfig.get_paths()["stdlib"]))
    stream = train.to_stream(held_out, ByteTokenizer())
    windows = train.eval_windows(stream, args.eval_len, args.eval_windows)
    decode, quality = [], []
    for n_loops in (8, 16):
        for B in (1, 8):
            for r in _decode_rows(DEMO, windows[:B, :args.prompt], args.new, n_loops, args.reps):
                decode.append({"workload": "trained docstrings_lm", **r})
        logits = {}
        for m in MODES:
            # one window at a time, one token per chunk: as decode sees it. (In a batch, a
            # row that halted keeps running in step while other rows run, which computes
            # its deeper entries exactly and would hide what "reuse" changes.)
            rt = mythos_rt.compile(DEMO, max_batch_size=1, max_loops=n_loops, chunk=1,
                                   act_mode=m)
            per_window, stats = [], {}
            for w in windows:
                per_window.append(rt.forward(w[None, :-1], n_loops=n_loops).float())
                for k, v in rt.last_stats.items():
                    if k in ("block_evals", "eager_block_evals", "reused_entries"):
                        stats[k] = stats.get(k, 0) + v
                    elif k == "halt_histogram" and v is not None:
                        old = stats.get(k) or [0] * len(v)
                        stats[k] = [a + c for a, c in zip(old, v)]
                stats.setdefault("halt_histogram", None)
            logits[m] = torch.cat(per_window)
            target = windows[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[m].flatten(0, 1), target.flatten())
            quality.append({"mode": m, "n_loops": n_loops, "bytes": target.numel(),
                            "bits_per_byte": round(nll.item() / math.log(2), 5),
                            "accuracy": round((logits[m].argmax(-1) == target).float().mean().item(), 5),
                            "logit_rel_err_vs_eager": (None if m == "eager" else
                                                       float(f"{rel_err(logits[m], logits['eager']):.3e}")),
                            "evals_saved_pct": round(100 * (1 - stats["block_evals"] / stats["eager_block_evals"]), 1),
                            "reused_entries": stats["reused_entries"],
                            "halt_histogram": stats["halt_histogram"]})
    return decode, quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=16, help="generated tokens per row")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--bias", type=float, default=-1.2, help="synthetic halting bias")
    ap.add_argument("--spread", type=float, default=0.9, help="synthetic halting spread")
    ap.add_argument("--attn", default="mla", choices=("mla", "gqa"))
    ap.add_argument("--eval-len", type=int, default=128, help="held-out bytes per window")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", help="the synthetic workload at this real preset (e.g. "
                    "mythos_1b, random weights) instead of mythos_1b shrunk to dim 256")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weights of a --preset run (three runtimes of mythos_1b in float32 "
                    "need about 24 GB; bfloat16 half)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                    help="decode batch sizes of the synthetic workload")
    ap.add_argument("--skip-trained", action="store_true",
                    help="only the synthetic workload (no demo-model rows)")
    ap.add_argument("--out", help="results stem (writes STEM.json and STEM.md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    syn = synthetic(args)
    dec, quality = ([], []) if args.skip_trained else trained(args)
    prov = provenance()
    prov["cpu_flags"] = _cpu_flags()
    prov["load_average_1_5_15min_at_end"] = os.getloadavg()  # the machine may be shared
    result = {"provenance": prov, "args": vars(args), "synthetic_config": synthetic_config(args).to_dict(),
              "synthetic": syn, "trained_decode": dec,
              "trained_quality": quality}
    cols = ["workload", "mode", "batch", "n_loops", "decode_ms_per_step", "tokens_per_s",
            "speedup_vs_eager", "evals_saved_pct", "catchup_evals", "passes_vs_eager",
            "padding_pct", "greedy_ids_equal_eager"]
    md = (markdown_table(syn + dec, cols) + "\n"
          + markdown_table(quality, ["mode", "n_loops", "bytes", "bits_per_byte", "accuracy",
                                     "logit_rel_err_vs_eager", "evals_saved_pct", "reused_entries"]))
    print(md)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        Path(args.out + ".md").write_text(md)


if __name__ == "__main__":
    main()
