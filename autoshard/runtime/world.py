"""The process group `autoshard.compile` runs on: the user's, or one it starts and says so.

Under torchrun (its RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment) with no process
group yet, `compile` initialises the default one: NCCL where CUDA is available, gloo otherwise, with a
collective timeout (`timeout_s`, default 10 minutes, as NCCL's), so a rank that died or skipped a step
fails its peers in bounded time instead of hanging them. A plain `python train.py` with neither gets
a one-process gloo group, so the same script runs on one process (a checkpoint loads there too).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from autoshard.errors import InputError

__all__ = ["DEFAULT_TIMEOUT_S", "TORCHRUN_VARIABLES", "ensure_process_group"]

DEFAULT_TIMEOUT_S = 600.0
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def ensure_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise the default process group if none exists (see the module docstring)."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    present = [k for k in TORCHRUN_VARIABLES if k in os.environ]
    if len(present) == len(TORCHRUN_VARIABLES):
        dist.init_process_group(backend, timeout=timeout)
        how = "from torchrun's environment"
    elif present:
        missing = [k for k in TORCHRUN_VARIABLES if k not in os.environ]
        raise InputError(
            f"expected torchrun's environment ({', '.join(TORCHRUN_VARIABLES)}) or none of it, found "
            f"{', '.join(present)} without {', '.join(missing)}; launch with torchrun, or initialise the "
            "process group yourself (torch.distributed.init_process_group) before autoshard.compile"
        )
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        backend, how = "gloo", "for this one process (no torchrun environment)"
    if dist.get_rank() == 0:
        print(
            f"autoshard: initialised the default process group ({backend}, {dist.get_world_size()} ranks, "
            f"collective timeout {timeout_s:g} s) {how}",
            file=sys.stderr,
        )
