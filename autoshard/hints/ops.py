"""The ``autoshard::shard`` custom op: a tensor hint recorded in the captured graph.

A hint has to reach the solver through ``torch.export``, which keeps only tensor computations. So a hint is
an op: ``torch.ops.autoshard.shard(x, spec)`` returns a copy of ``x`` and carries the serialised spec as a
string argument. Being a registered custom op (not a Python function) it is opaque to export, survives
``run_decompositions`` and shows up as one ``torch.ops.autoshard.shard.default`` node whose second argument
is the spec. It returns a clone because a custom op may not return an alias of its input; codegen drops the
node (it is the identity), so the copy exists only in eager runs.

It also gets a fake implementation (capture runs on meta/fake tensors), an autograd formula (the gradient
is passed through unchanged, as for the identity) and a DTensor sharding rule (the output keeps the input's
placement), so hinted models train eagerly and run on DTensors before and after planning alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Graph, GraphModule

from autoshard.errors import InputError
from autoshard.hints.spec import TensorHint, parse_spec

__all__ = ["SHARD_OP", "hints_in_graph", "is_shard_node", "shard_tensor"]


@torch.library.custom_op("autoshard::shard", mutates_args=())
def _shard_op(x: torch.Tensor, spec: str) -> torch.Tensor:
    """Identity carrying a sharding hint; a clone because custom ops may not return an input's alias."""
    TensorHint.deserialize(spec, where="torch.ops.autoshard.shard")
    return x.clone()


@_shard_op.register_fake
def _shard_fake(x: torch.Tensor, spec: str) -> torch.Tensor:
    TensorHint.deserialize(spec, where="torch.ops.autoshard.shard")
    return torch.empty_like(x)


def _shard_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
    # The op is the identity, so its gradient is too; the spec string has none.
    return grad, None


_shard_op.register_autograd(_shard_backward)

SHARD_OP = torch.ops.autoshard.shard.default


def _register_dtensor_rule() -> None:
    """Let a DTensor run through the op: its output takes the input's placement on every mesh dim.

    ``register_sharding`` rules describe one mesh dim and are expanded to the whole mesh by DTensor. Unlike
    single-dim strategies the all-Replicate rule is not implied, so it is listed. Every Partial flavour the
    input carries (sum, avg, ...) passes through too, since the identity commutes with any reduction.
    """
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    @register_sharding(SHARD_OP)
    def _shard_sharding(x: Any, spec: str) -> list[tuple[list[Any], list[Any]]]:
        rules: list[tuple[list[Any], list[Any]]] = [([Replicate()], [Replicate(), None])]
        rules += [([Shard(d)], [Shard(d), None]) for d in range(x.ndim)]
        partials = [Partial()] + [p for p in x.placements if p.is_partial() and p != Partial()]
        rules += [([p], [p, None]) for p in dict.fromkeys(partials)]
        return rules


_register_dtensor_rule()


def shard_tensor(x: torch.Tensor, spec: Any, *, where: str | None = None) -> torch.Tensor:
    """Hint that `x` should be sharded as `spec`; returns the hinted tensor to use in its place.

    The spec is checked against ``x``'s rank and shape at once (on meta or fake tensors during capture
    too), so a bad hint fails where it is written rather than inside the solver. Use the result: the hint
    is attached to it, not to `x`.
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"autoshard.shard expected a torch.Tensor to hint, found {type(x).__name__}; "
            "pass the tensor (or use in_strategy=/out_strategy= on an nn.Module)."
        )
    where = where or f"autoshard.shard on a tensor of shape {tuple(x.shape)}"
    hint = parse_spec(spec, x.ndim, where=where)
    hint.check_shape(tuple(x.shape), where)
    return SHARD_OP(x, hint.serialize())


def is_shard_node(node: torch.fx.Node) -> bool:
    """True for a graph node that applies a sharding hint."""
    return node.op == "call_function" and node.target is SHARD_OP


def hints_in_graph(graph: ExportedProgram | GraphModule | Graph) -> dict[str, TensorHint]:
    """{name of each ``autoshard.shard`` node: its hint}, in graph order.

    The node's output is the hinted tensor, so a planner constrains that node's placement (and, as the op
    is the identity, its input's) to the hint.
    """
    if isinstance(graph, ExportedProgram):
        graph = graph.graph
    elif isinstance(graph, GraphModule):
        graph = graph.graph
    if not isinstance(graph, Graph):
        raise InputError(
            f"hints_in_graph expected a torch.export ExportedProgram (or an fx GraphModule/Graph), found "
            f"{type(graph).__name__}; pass what torch.export.export returned."
        )
    out: dict[str, TensorHint] = {}
    for node in graph.nodes:
        if is_shard_node(node):
            spec = node.args[1] if len(node.args) > 1 else node.kwargs["spec"]
            out[node.name] = TensorHint.deserialize(spec, where=f"graph node {node.name}")
    return out
