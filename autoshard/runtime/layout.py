"""Layout: the plan's placements as DTensor objects, parsed once where the runtime takes the plan.

A `Plan` writes placements as text (`"(S(0), R)"`): that is its JSON form, made to be read and diffed.
The runtime needs `Placement` objects, and reading the text again at every use spreads the format
through the code. `Layout.of(plan)` parses every placement the runtime uses once, on the operator mesh
(every axis but pp), and from then on the runtime only handles typed placements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch.distributed.tensor import Placement, Replicate

from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Plan
from autoshard.strategies.mesh import spec_from_str

__all__ = ["Layout", "Placements"]

Placements = tuple[Placement, ...]  # one per operator mesh axis


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Typed placements of one plan on its operator mesh: each node's output and each parameter's."""

    axes: tuple[str, ...]  # the operator mesh's axes, in order
    outputs: Mapping[str, Placements]  # node -> placement of its (first) output, where the plan says
    params: Mapping[str, Placements]  # canonical parameter name -> its placement, for every parameter

    @classmethod
    def of(cls, plan: Plan, ir: GraphIR, *, replicated_params: frozenset[str] = frozenset()) -> Layout:
        """Parse `plan` for graph `ir`. A parameter takes the plan's placement for it, else the placement of
        the node that reads it (a plan made before parameters were listed), else Replicate; those in
        `replicated_params` (parameters no node reads) are replicated. A Partial parameter is refused."""
        axes = tuple(plan.operator_mesh)
        outputs = {
            d.node: spec_from_str(d.output[0]) for d in plan.nodes if d.output and d.output[0] is not None
        }
        replicated = (Replicate(),) * len(axes)
        params: dict[str, Placements] = {}
        for info in ir.params:
            if info.name in replicated_params:
                params[info.name] = replicated
                continue
            text = plan.params.get(info.name)
            spec = spec_from_str(text) if text else outputs.get(info.nodes[0] if info.nodes else "", replicated)
            if any(p.is_partial() for p in spec):
                raise InputError(
                    f"expected parameter {info.name} to be replicated or sharded, found the plan's placement "
                    f"{text}; a parameter cannot be partial: plan again"
                )
            params[info.name] = spec
        return cls(axes=axes, outputs=outputs, params=params)

    @property
    def replicated(self) -> Placements:
        return (Replicate(),) * len(self.axes)

    def of_node(self, node: str) -> Placements:
        """The placement the plan gives `node`'s output (Replicate where it says nothing)."""
        return self.outputs.get(node, self.replicated)
