"""Runtime: a Plan executed as DTensor training on torch.distributed. `compile` returns a
ShardedModule (module.py): CompiledModel (compiled.py), or PipelinedModel (pipeline.py) for plans with
pipeline stages; checkpoint.py saves and loads its state (DCP)."""

from autoshard.runtime.checkpoint import (
    checkpoint_state_dict,
    export_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from autoshard.runtime.compiled import CompiledModel, compile
from autoshard.runtime.module import ShardedModule
from autoshard.runtime.pipeline import PipelinedModel

__all__ = [
    "CompiledModel",
    "PipelinedModel",
    "ShardedModule",
    "checkpoint_state_dict",
    "compile",
    "export_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
