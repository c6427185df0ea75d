"""Placements already decided on one mesh axis, which a plan on a larger mesh keeps.

The step search (solver/step_search.py) prices every configuration from replica plans solved on the
tp axis alone. The winner's operator plan is then solved on dp x tp, where each node has the product
of its options on each axis (a 2 x 8 mesh: ~5x the options, ~25x the edge prices and ILP pairs). Keeping
each node's tp placements as its replica plan chose them leaves the ILP the dp axis only, and makes the
final plan the one the search priced, not a different tp split found on the larger problem.

A node is matched by name (recapturing at another batch size keeps the graph's names); a node the
replica plan does not have, or none of whose options has its placements, keeps all its options.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autoshard.ir.plan import Plan
from autoshard.strategies import MeshSpec, ShardingOption, Spec, spec_str

__all__ = ["AxisChoices"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AxisChoices:
    """Each node's output and input placements on `axis` (spec strings of one entry, None: no tensor
    or any placement), from a plan on that axis alone."""

    axis: str
    nodes: Mapping[str, tuple[tuple[str | None, ...], tuple[str | None, ...]]]

    @classmethod
    def of(cls, plan: Plan, axis: str) -> AxisChoices:
        if tuple(plan.operator_mesh) != (axis,):
            raise ValueError(f"expected a plan on the single axis {axis!r}, found mesh {dict(plan.mesh)}")
        return cls(axis, {d.node: (tuple(d.output), tuple(d.inputs)) for d in plan.nodes})

    def narrow(self, node: str, options: Sequence[ShardingOption], mesh: MeshSpec) -> tuple[ShardingOption, ...]:
        """The options of `node` whose placements on the axis are the decided ones, else all."""
        wanted = self.nodes.get(node)
        if wanted is None or self.axis not in mesh.names:
            return tuple(options)
        i = mesh.names.index(self.axis)
        kept = tuple(o for o in options if _matches(o, wanted, i))
        if not kept:
            log.info("node %s: no option on %s keeps its %s placements %s; all kept", node, mesh, self.axis, wanted)
        return kept or tuple(options)


def _on_axis(spec: Spec | None, i: int) -> str | None:
    return None if spec is None else spec_str((spec[i],))


def _matches(option: ShardingOption, wanted: tuple[tuple[str | None, ...], tuple[str | None, ...]], i: int) -> bool:
    outputs, inputs = wanted
    if tuple(_on_axis(s, i) for s in option.output) != tuple(outputs):
        return False
    if len(option.inputs) != len(inputs):
        return False
    return all(w is None or s is None or _on_axis(s, i) == w for s, w in zip(option.inputs, inputs))
