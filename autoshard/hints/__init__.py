"""Sharding hints: user constraints on how tensors and module boundaries are sharded.

Hints follow MindSpore: ``shard(tensor, (4, 1))`` splits dim 0 of a tensor 4 ways and leaves the mesh axes
to the solver; ``shard(tensor, ("dp", None, "tp"))`` names the axes; ``shard(module, in_strategy=...,
out_strategy=...)`` hints a module's inputs and outputs like ``Cell.shard``; ``@shardable`` gives every
submodule a ``.shard(...)`` method. Every hint becomes an ``autoshard::shard`` node in the captured graph
(``hints_in_graph`` reads them back), so the solver treats hints as constraints on one code path.
"""

from autoshard.hints.modules import (
    ModuleHints,
    checking_module_hints,
    clear_hints,
    module_hints,
    record_module_names,
    shard,
    shard_module,
    shardable,
)
from autoshard.hints.ops import SHARD_OP, hints_in_graph, is_shard_node, shard_tensor
from autoshard.hints.step import block_hints, pipeline_stage, recompute, step_hints
from autoshard.hints.spec import MESH_AXES, DimSpec, TensorHint, mesh_sizes, parse_spec

__all__ = [
    "MESH_AXES",
    "SHARD_OP",
    "DimSpec",
    "ModuleHints",
    "checking_module_hints",
    "TensorHint",
    "clear_hints",
    "hints_in_graph",
    "is_shard_node",
    "mesh_sizes",
    "block_hints",
    "module_hints",
    "pipeline_stage",
    "recompute",
    "step_hints",
    "parse_spec",
    "record_module_names",
    "shard",
    "shard_module",
    "shard_tensor",
    "shardable",
]
