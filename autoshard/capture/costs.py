"""Forward FLOPs and bytes moved per graph node, computed on meta tensors.

FLOPs come from torch.utils.flop_counter, so they follow PyTorch's own formulas: matmuls (2*m*n*k),
convolutions and attention (both score and value products, full T x T even when causal); elementwise
ops count zero FLOPs there and are priced by the bytes they move instead (they are bandwidth bound).
Composite ops such as aten.linear are run on meta tensors so they decompose into the counted kernels.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from autoshard.ir.signature import arg_signature

__all__ = ["NodeCosts", "Saved", "is_view_op", "node_costs"]

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


@dataclass(frozen=True, slots=True)
class Saved:
    """What autograd keeps for an op's backward: which inputs (positions in the node's input nodes),
    whether its own output, and the bytes of internal tensors it keeps besides (normalisation
    statistics, cross-entropy's log-probabilities)."""

    inputs: frozenset[int] = frozenset()
    output: bool = False
    internal_bytes: int = 0


# Ops whose meta run decomposes into something other than what runs on devices: what their fused
# kernels keep is stated here. Scaled-dot-product attention (flash / memory-efficient kernels) keeps
# q, k, v and its output (plus a B x heads x T logsumexp, ignored); its math fallback, which meta runs,
# would keep the T x T scores no fused kernel materialises.
_FUSED_SAVES = {"aten::scaled_dot_product_attention": Saved(inputs=frozenset({0, 1, 2}), output=True)}


class NodeCosts:
    """Runs each op once on meta tensors: FLOPs (inside one FlopCounterMode: entering it per node is
    slow) and, with inputs that require grad as in the model, the tensors autograd saves for backward."""

    def __init__(self) -> None:
        self._mode = FlopCounterMode(display=False)
        self._total = 0
        self._known: dict[tuple[object, ...], tuple[int, Saved | None]] = {}

    def __enter__(self) -> NodeCosts:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    def flops(self, node: Node) -> int:
        """Forward FLOPs of one call_function node, 0 for ops without a FLOP formula."""
        return self.run(node, frozenset())[0]

    def run(self, node: Node, grad_inputs: frozenset[str]) -> tuple[int, Saved | None]:
        """(forward FLOPs, what autograd saves) of one call_function node whose inputs named in
        `grad_inputs` require grad; what is saved is None where the op cannot run on meta."""
        if not isinstance(node.target, torch._ops.OpOverload) or is_view_op(node.target):
            return 0, Saved()
        inputs = list(dict.fromkeys(node.all_input_nodes))
        position = {n: i for i, n in enumerate(inputs)}
        made: dict[int, int] = {}  # id of a meta argument -> its input position

        def arg(a: Any) -> Any:
            if not isinstance(a, Node):
                return a
            t = _meta_like(a.meta["val"])
            if isinstance(t, torch.Tensor):
                if a.name in grad_inputs and t.dtype.is_floating_point:
                    t.requires_grad_(True)
                made[id(t)] = position[a]
            return t

        pattern = tuple(n.name in grad_inputs for n in inputs)
        key = (node.target, arg_signature(node.args), arg_signature(node.kwargs), pattern)
        if key in self._known:  # repeated layers run the same ops on the same shapes
            return self._known[key]
        args = tree_map(arg, node.args)
        kwargs = tree_map(arg, node.kwargs)
        kept: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept.append(t)
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = node.target(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - an op meta cannot run is priced by bytes alone
            log.warning("could not run node %s (%s) on meta: %s", node.name, node.target, exc)
            return 0, None
        total = self._mode.get_total_flops()
        flops, self._total = total - self._total, total
        fused = _FUSED_SAVES.get(node.target._schema.name)
        if fused is not None:
            saved = fused if any(pattern) else Saved()
        else:
            saved = _classify(kept, made, out)
        self._known[key] = (flops, saved)
        return flops, saved


def _classify(kept: list[torch.Tensor], made: dict[int, int], out: Any) -> Saved:
    outputs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
    inputs: set[int] = set()
    output = False
    internal = 0
    for t in kept:
        base = t._base if t._base is not None else t
        if id(t) in made or id(base) in made:
            inputs.add(made.get(id(t), made.get(id(base), -1)))
        elif any(t is o or base is o or o._base is base for o in outputs):
            output = True
        else:
            internal += t.numel() * t.element_size()
    return Saved(inputs=frozenset(inputs), output=output, internal_bytes=internal)


def node_costs(
    node: Node, counter: NodeCosts, grad_inputs: frozenset[str] = frozenset()
) -> tuple[int, int, bool, Saved | None]:
    """(flops, bytes_moved, is_view, saved for backward) of one call_function node."""
    view = is_view_op(node.target)
    if view:
        return 0, 0, True, Saved()
    read = sum(
        _nbytes(inp.meta.get("val")) for inp in dict.fromkeys(node.all_input_nodes)
    )
    written = _nbytes(node.meta.get("val"))
    flops, saved = counter.run(node, grad_inputs)
    return flops, read + written, False, saved


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
