"""Graph IR: frozen dataclasses over the exported graph that the planner reads."""

from autoshard.ir.graph import GraphIR, NodeInfo, NodeKind, ParamInfo, TensorMeta

__all__ = ["GraphIR", "NodeInfo", "NodeKind", "ParamInfo", "TensorMeta"]
