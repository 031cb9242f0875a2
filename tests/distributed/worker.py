"""One rank of a tensor-parallel test run (started by tests/distributed/launch.py).

argv: a job file (torch.save'd dict) and an output directory. The job lists cases; this
rank runs each (compile a checkpoint with tensor_parallel=world, or load an artifact;
forward, generate, a ragged generate; optionally save and reload) and saves what it
computed as ``rank{r}.pt``; a case that raised holds its message under "error".
"""

import os
import sys

import torch


def run(case: dict, rank: int) -> dict:
    import mythos_rt

    if "load" in case:
        if case.get("break_rank") == rank:  # this rank's share of the artifact is damaged
            with open(os.path.join(case["load"], f"rank{rank}of{os.environ['WORLD_SIZE']}",
                                   "config.json"), "a") as f:
                f.write(" ")
        rt = mythos_rt.load(case["load"], device="cpu")
    else:
        rt = mythos_rt.compile(case["path"], backend=case["backend"],
                               tensor_parallel=case.get("tensor_parallel",
                                                        int(os.environ["WORLD_SIZE"])),
                               max_batch_size=4, chunk=4, max_loops=case["n_loops"],
                               device="cpu", act_mode=case.get("act_mode", "eager"),
                               overrides=case.get("overrides"))
    if case.get("die") == rank:  # a rank lost after compiling
        os._exit(3)
    n = case["n_loops"]
    res = {"forward": rt.forward(case["ids"], n_loops=n),
           "generate": rt.generate(case["ids"], case["new"], n_loops=n, return_logits=True),
           "ragged": rt.generate(case["ragged"], case["new"], n_loops=n)}
    if "save" in case:
        rt.save(case["save"], overwrite=case.get("overwrite", False))
        res["reloaded"] = mythos_rt.load(case["save"], device="cpu").generate(
            case["ids"], case["new"], n_loops=n)
    return res


def main(job_path: str, out_dir: str) -> None:
    job = torch.load(job_path, weights_only=False)
    rank = int(os.environ["RANK"])
    results = {}
    for name, case in job["cases"].items():
        try:
            results[name] = run(case, rank)
        except Exception as exc:  # noqa: BLE001 - the parent test checks the message
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
