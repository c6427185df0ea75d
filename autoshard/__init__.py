"""autoshard: an auto-parallelizing compiler for PyTorch.

A single-device nn.Module is captured as a shape-annotated graph (capture/), its sharding options are
priced by a hardware cost model (cost_model/, strategies/), an ILP picks a plan (solver/), and codegen
(passes/) with the runtime (runtime/) runs it as distributed PyTorch; report/ shows what was chosen.
"""

from autoshard.capture import capture
from autoshard.cost_model import Cluster
from autoshard.errors import AutoshardError, CaptureError, InputError
from autoshard.hints import TensorHint, pipeline_stage, recompute, shard, shardable
from autoshard.ir import GraphIR, NodeInfo, ParamInfo, TensorMeta
from autoshard.ir.plan import Plan
from autoshard.runtime import (
    CompiledModel,
    ShardedModule,
    checkpoint_state_dict,
    compile,
    export_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from autoshard.runtime.faults import CollectiveFailure
from autoshard.solver.problem import NoFeasiblePlan
from autoshard.solver.search import plan, plan_graph

__all__ = [
    "AutoshardError",
    "CaptureError",
    "CollectiveFailure",
    "Cluster",
    "CompiledModel",
    "ShardedModule",
    "GraphIR",
    "InputError",
    "NoFeasiblePlan",
    "NodeInfo",
    "ParamInfo",
    "Plan",
    "TensorHint",
    "TensorMeta",
    "capture",
    "checkpoint_state_dict",
    "compile",
    "export_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "plan",
    "pipeline_stage",
    "plan_graph",
    "recompute",
    "save_checkpoint",
    "shard",
    "shardable",
]
__version__ = "0.1.0"
