"""Start ``world`` local gloo ranks of tests/distributed/worker.py, as torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR/PORT), with a hard deadline: stragglers are killed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("worker.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, cases: dict, directory: Path, deadline_s: float = 120.0,
              collective_timeout_s: float = 30.0) -> tuple[list[dict], list[int]]:
    """Run the ``cases`` (see worker.py) on ``world`` ranks; return each rank's results
    (``{}`` for a rank that saved none) and exit codes (None: killed at the deadline)."""
    job = directory / "job.pt"
    torch.save({"cases": cases}, job)
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   MYTHOS_RT_DIST_TIMEOUT=str(collective_timeout_s), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        with open(directory / f"rank{r}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(job),
                                           str(directory)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    end = time.monotonic() + deadline_s
    codes: list = []
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    results = []
    for r in range(world):
        f = directory / f"rank{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else {})
    return results, codes
