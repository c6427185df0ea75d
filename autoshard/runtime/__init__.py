"""Runtime: a Plan executed as DTensor training on torch.distributed (see compiled.py)."""

from autoshard.runtime.compiled import CompiledModel, compile

__all__ = ["CompiledModel", "compile"]
