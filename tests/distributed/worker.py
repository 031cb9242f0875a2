"""One rank of a tensor-parallel test run (started by tests/distributed/launch.py).

argv: a job file (torch.save'd dict) and an output directory. The job lists cases
(checkpoint path, backend, ...); this rank compiles each with tensor_parallel=world and
saves what it computed as ``rank{r}.pt``; an error is saved as its message instead.
"""

import os
import sys

import torch


def main(job_path: str, out_dir: str) -> None:
    import mythos_rt

    job = torch.load(job_path, weights_only=False)
    rank = int(os.environ["RANK"])
    results = {}
    try:
        for name, case in job["cases"].items():
            rt = mythos_rt.compile(case["path"], backend=case["backend"],
                                   tensor_parallel=case.get("tensor_parallel",
                                                            int(os.environ["WORLD_SIZE"])),
                                   max_batch_size=4, chunk=case.get("chunk", 4),
                                   max_loops=case["n_loops"], device="cpu")
            if case.get("die") == rank:  # a rank lost after compiling
                os._exit(3)
            res = {"forward": rt.forward(case["ids"], n_loops=case["n_loops"])}
            res["generate"] = rt.generate(case["ids"], case["new"], n_loops=case["n_loops"],
                                          return_logits=True)
            res["ragged"] = rt.generate(case["ragged"], case["new"], n_loops=case["n_loops"])
            results[name] = res
    except Exception as exc:  # noqa: BLE001 - the parent test checks the message
        results["error"] = f"{type(exc).__name__}: {exc}"
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
