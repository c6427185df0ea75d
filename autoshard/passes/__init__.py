"""Passes over the captured graph: codegen turns a Plan into a DTensor program (see codegen.py)."""

from autoshard.passes.codegen import EdgeRedistribution, as_dtensor, codegen, local_chunk, redistribute, use_mesh

__all__ = ["EdgeRedistribution", "as_dtensor", "codegen", "local_chunk", "redistribute", "use_mesh"]
