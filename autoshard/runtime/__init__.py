"""Runtime: a Plan executed as DTensor training on torch.distributed. `compile` returns a
ShardedModule (module.py): CompiledModel (compiled.py), or PipelinedModel (pipeline.py) for plans with
pipeline stages."""

from autoshard.runtime.compiled import CompiledModel, compile
from autoshard.runtime.module import ShardedModule
from autoshard.runtime.pipeline import PipelinedModel

__all__ = ["CompiledModel", "PipelinedModel", "ShardedModule", "compile"]
