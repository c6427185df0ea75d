"""What the runtime can execute: the predicates the planner filters its options through and codegen obeys.

The planner reads options from DTensor's strategy registry, but a strategy existing is not the same as
DTensor's dispatch running it: some options DTensor's rules list are refused when the op runs, and some
ops have no rule at all. Both facts live here, once, so that what the planner offers and what the
generated program does cannot drift apart:

- `options.runs_locally_replicated(node)` (it lives beside the option enumeration whose fallback it
  names): DTensor has no sharding rule for the node's op (`aten.lift_fresh_copy`, custom ops such as
  transformers' `grouped_mm_fallback`). The planner offers it only fully replicated, and codegen runs it
  on the local replicated tensors (DTensor's dispatch would raise "no sharding strategy registered").
- `unexecutable_reason(op, inputs)`: why DTensor's dispatch refuses an option the registry lists, or None.
  The planner drops such options; codegen refuses a plan that holds one (a hand-edited or stale plan).
  Each known case is checked under LocalTensorMode in tests/test_executable.py: what is excluded fails
  through DTensor, what is kept runs and matches one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autoshard.strategies.mesh import Shard, Spec

__all__ = ["CONVOLUTIONS", "unexecutable_reason"]

aten = torch.ops.aten

CONVOLUTIONS = frozenset(
    {
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.conv1d.padding,
        aten.conv2d.padding,
        aten.conv3d.padding,
        aten.convolution.default,
        aten._convolution.default,
        aten.conv_transpose1d.default,
        aten.conv_transpose2d.input,
        aten.conv_transpose3d.input,
    }
)


def unexecutable_reason(op: object, inputs: Sequence[Spec | None]) -> str | None:
    """Why DTensor's dispatch cannot run `op` with its inputs in `inputs` (aligned with the node's input
    nodes), or None when it can."""
    if op in CONVOLUTIONS:
        # DTensor's convolution rule refuses an input dim sharded over two mesh axes ([S(0), S(0)]:
        # "Tensor dim 0 is already sharded on mesh dim 0 ... does not support hybrid sharding strategies"),
        # although its strategy for the batch dim lists it
        for i, spec in enumerate(inputs):
            dims = [p.dim for p in spec or () if type(p) is Shard]
            if len(dims) != len(set(dims)):
                return f"DTensor cannot run a convolution whose input {i} has a dim sharded on more than one mesh axis"
    return None
