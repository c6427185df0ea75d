"""Run under torchrun (4 ranks): rank 2 skips one call of `model.step`; every rank must fail within the
collective timeout with an error naming the rank that is behind.

Usage: python -m torch.distributed.run --nproc-per-node 4 ... tests/dist/skip_a_step.py TIMEOUT_S

The script starts no process group: `autoshard.compile(..., timeout_s=TIMEOUT_S)` does, from
torchrun's environment. Each rank reports the error it ended with (or none) and how long after its
last successful step it came.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

import autoshard
from autoshard.models import build
from autoshard.runtime.launch import rank_session

SKIPPER, SKIPPED_STEP, STEPS = 2, 1, 3

if __name__ == "__main__":
    timeout_s = float(sys.argv[1])
    with rank_session(init=False) as session:
        torch.manual_seed(0)
        model = build("gpt-tiny", device="cpu", n_layer=1)
        x = torch.randint(0, model.config.vocab_size, (8, 16))
        compiled = autoshard.compile(model, (x, x), mesh={"dp": 4}, timeout_s=timeout_s)
        rank, last = dist.get_rank(), time.monotonic()
        try:
            for step in range(STEPS):
                if rank == SKIPPER and step == SKIPPED_STEP:
                    continue
                compiled.train_step(x, x)
                last = time.monotonic()
            error = None
        except Exception as e:  # noqa: BLE001 - reported to the test
            error = f"{type(e).__name__}: {e}"
        session.result = {"error": error, "waited_s": time.monotonic() - last}
        if error is not None:
            raise SystemExit(f"rank {rank}: {error}")
