"""Forward FLOPs and bytes moved per graph node, computed on meta tensors.

FLOPs come from torch.utils.flop_counter, so they follow PyTorch's own formulas: matmuls (2*m*n*k),
convolutions and attention (both score and value products, full T x T even when causal); elementwise
ops count zero FLOPs there and are priced by the bytes they move instead (they are bandwidth bound).
Composite ops such as aten.linear are run on meta tensors so they decompose into the counted kernels.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch.fx import Node
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from autoshard.ir.signature import arg_signature

__all__ = ["NodeCosts", "is_view_op", "node_costs"]

log = logging.getLogger(__name__)


# Identity ops that exist only to carry information to the planner (sharding hints): free, like views.
_ANNOTATIONS = frozenset({"autoshard::shard"})


def is_view_op(target: object) -> bool:
    """True when the op's output aliases its input without writing it (view, transpose, split, ...),
    or the op is an annotation that codegen removes."""
    if target is operator.getitem:
        return True
    if isinstance(target, torch._ops.OpOverload) and target._schema.name in _ANNOTATIONS:
        return True
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _meta_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


class NodeCosts:
    """Counts FLOPs node by node inside one FlopCounterMode (entering it per node is slow)."""

    def __init__(self) -> None:
        self._mode = FlopCounterMode(display=False)
        self._total = 0
        self._known: dict[tuple[object, ...], int] = {}

    def __enter__(self) -> NodeCosts:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    def flops(self, node: Node) -> int:
        """Forward FLOPs of one call_function node, 0 for ops without a FLOP formula."""
        if not isinstance(node.target, torch._ops.OpOverload) or is_view_op(node.target):
            return 0

        def arg(a: Any) -> Any:
            return _meta_like(a.meta["val"]) if isinstance(a, Node) else a

        key = (node.target, arg_signature(node.args), arg_signature(node.kwargs))
        if key in self._known:  # repeated layers run the same ops on the same shapes
            return self._known[key]
        args = tree_map(arg, node.args)
        kwargs = tree_map(arg, node.kwargs)
        try:
            node.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - an op meta cannot run is priced by bytes alone
            log.warning("could not count FLOPs of node %s (%s) on meta: %s", node.name, node.target, exc)
            return 0
        total = self._mode.get_total_flops()
        flops, self._total = total - self._total, total
        self._known[key] = flops
        return flops


def node_costs(node: Node, counter: NodeCosts) -> tuple[int, int, bool]:
    """(flops, bytes_moved, is_view) of one call_function node."""
    view = is_view_op(node.target)
    if view:
        return 0, 0, True
    read = sum(
        _nbytes(inp.meta.get("val")) for inp in dict.fromkeys(node.all_input_nodes)
    )
    written = _nbytes(node.meta.get("val"))
    return counter.flops(node), read + written, False


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
