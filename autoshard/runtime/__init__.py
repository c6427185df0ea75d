"""Runtime: a Plan executed as DTensor training on torch.distributed. `compile` (compiled.py) returns a
CompiledModel (model.py) for every plan: its stages (stage.py) under a schedule (schedule.py), gradient
accumulation for one stage, torch's pipelining for several; checkpoint.py saves and loads its state (DCP)."""

from autoshard.runtime.checkpoint import (
    checkpoint_state_dict,
    export_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from autoshard.runtime.compiled import compile
from autoshard.runtime.model import CompiledModel
from autoshard.runtime.module import ShardedModule

__all__ = [
    "CompiledModel",
    "ShardedModule",
    "checkpoint_state_dict",
    "compile",
    "export_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
