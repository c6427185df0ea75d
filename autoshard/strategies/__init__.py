"""Sharding options per graph node and the collectives between placements, read from DTensor.

`node_options(node, mesh)` lists the ways a node of the exported graph can run on a device mesh;
`transition(src, dst, ...)` lists the collectives that turn one placement into another and
`backward_transition(...)` those its gradient needs. The solver picks one option per node and pays
for the transitions on the edges between them.
"""

from autoshard.strategies.mesh import (
    MeshSpec,
    Partial,
    Placement,
    Replicate,
    Shard,
    Spec,
    all_specs,
    is_even,
    local_shape,
    spec_from_json,
    spec_str,
    spec_to_json,
)
from autoshard.strategies.transitions import (
    CommStep,
    backward_transition,
    gradient_is_partial,
    gradient_spec,
    transition,
)
from autoshard.strategies.options import ShardingOption, clear_option_cache, node_options, option_cache_info

__all__ = [
    "CommStep",
    "backward_transition",
    "gradient_is_partial",
    "gradient_spec",
    "transition",
    "MeshSpec",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "ShardingOption",
    "Spec",
    "all_specs",
    "clear_option_cache",
    "is_even",
    "local_shape",
    "node_options",
    "option_cache_info",
    "spec_from_json",
    "spec_str",
    "spec_to_json",
]
