"""Run under torchrun: rank 1 raises after the group is up. The launcher must report it as a failure
(with the traceback), never as a success, whatever happens to the other ranks."""

from __future__ import annotations

import torch.distributed as dist

from autoshard.runtime.launch import rank_session

if __name__ == "__main__":
    with rank_session() as session:
        if dist.get_rank() == 1:
            raise ValueError("deliberate failure on rank 1")
        session.result = "done"
