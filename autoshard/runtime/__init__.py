"""Runtime: a Plan executed as DTensor training on torch.distributed (see compiled.py; pipeline.py for
plans with pipeline stages)."""

from autoshard.runtime.compiled import CompiledModel, compile
from autoshard.runtime.pipeline import PipelinedModel

__all__ = ["CompiledModel", "PipelinedModel", "compile"]
