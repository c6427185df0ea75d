"""Build a GraphIR from an ExportedProgram and the module it was exported from."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from autoshard.capture.costs import NodeCosts, Saved, node_costs
from autoshard.ir.graph import GraphIR, NodeInfo, NodeKind, ParamInfo, TensorMeta

__all__ = ["build_graph_ir"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def build_graph_ir(model: nn.Module, exported: ExportedProgram) -> GraphIR:
    """Walk the exported graph once, recording shapes, module paths, costs and parameter identities."""
    kinds = _placeholder_kinds(exported)
    params = _param_infos(model, exported)
    to_parameters = exported.graph_signature.inputs_to_parameters  # a fresh dict per access: read once
    trainable = {n for p in params for n in p.nodes if _is_trainable(model, to_parameters, n)}
    grads: dict[str, bool] = {}
    nodes: list[NodeInfo] = []
    saved: dict[str, Saved | None] = {}
    with NodeCosts() as counter:
        for node in exported.graph.nodes:
            grads[node.name] = node.name in trainable or (
                node.op == "call_function"
                and _is_floating(node.meta.get("val"))
                and any(grads.get(i.name, False) for i in node.all_input_nodes)
            )
            info, saved[node.name] = _node_info(node, kinds, counter, grads)
            nodes.append(info)
    nodes = _mark_kept(nodes, saved)
    return GraphIR(nodes=tuple(nodes), params=params, model_type=type(model).__name__, exported=exported)


def _mark_kept(nodes: list[NodeInfo], saved: dict[str, Saved | None]) -> list[NodeInfo]:
    """A node's output is kept for backward when its own backward keeps it, or a consumer's keeps the
    input it reads from it -- directly or through a view of it (a view shares its base's storage)."""
    consumers: dict[str, list[tuple[NodeInfo, int]]] = {}
    for n in nodes:
        for slot, src in enumerate(n.inputs):
            consumers.setdefault(src, []).append((n, slot))
    kept: dict[str, bool | None] = {}
    for n in reversed(nodes):  # consumers first
        own = saved.get(n.name)
        if n.kind is not NodeKind.CALL:
            continue
        if own is None or any(saved.get(c.name, Saved()) is None for c, _ in consumers.get(n.name, [])):
            kept[n.name] = None  # something could not be probed: the pricer's rule of thumb decides
            continue
        kept[n.name] = own.output or any(
            slot in saved[c.name].inputs or (c.is_view and kept.get(c.name, False))
            for c, slot in consumers.get(n.name, [])
            if c.kind is NodeKind.CALL
        )
    return [
        dataclasses.replace(n, output_kept=kept[n.name], internal_saved_bytes=saved[n.name].internal_bytes)
        if n.kind is NodeKind.CALL and saved.get(n.name) is not None else n
        for n in nodes
    ]


def _placeholder_kinds(exported: ExportedProgram) -> dict[str, NodeKind]:
    by_kind = {
        InputKind.PARAMETER: NodeKind.PARAMETER,
        InputKind.BUFFER: NodeKind.BUFFER,
    }
    return {
        spec.arg.name: by_kind.get(spec.kind, NodeKind.INPUT)
        for spec in exported.graph_signature.input_specs
        if hasattr(spec.arg, "name")
    }


def _param_infos(model: nn.Module, exported: ExportedProgram) -> tuple[ParamInfo, ...]:
    """One ParamInfo per distinct tensor: tied weights share a tensor and so share an entry."""
    names_by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    nodes_by_tensor: dict[int, list[str]] = {}
    for spec in exported.graph_signature.input_specs:
        if spec.kind is InputKind.PARAMETER:
            p = model.get_parameter(spec.target)
            nodes_by_tensor.setdefault(id(p), []).append(spec.arg.name)
    return tuple(
        ParamInfo(
            names=tuple(names),
            nodes=tuple(nodes_by_tensor.get(key, ())),
            meta=TensorMeta(shape=tuple(tensors[key].shape), dtype=tensors[key].dtype),
        )
        for key, names in names_by_tensor.items()
    )


def _is_trainable(model: nn.Module, to_parameters: Mapping[str, str], node_name: str) -> bool:
    target = to_parameters.get(node_name)
    return target is not None and model.get_parameter(target).requires_grad


def _is_floating(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype.is_floating_point
    if isinstance(value, (list, tuple)):
        return any(_is_floating(v) for v in value)
    return False


def _node_info(
    node: Node, kinds: dict[str, NodeKind], counter: NodeCosts, grads: dict[str, bool]
) -> tuple[NodeInfo, Saved | None]:
    requires_grad = grads[node.name]
    saved: Saved | None = None
    inputs = tuple(node.all_input_nodes)
    outputs = _metas(node.meta.get("val")) if node.op != "output" else ()
    module, module_type = _innermost_module(node)
    if node.op == "placeholder":
        kind, op, flops, moved, view = kinds.get(node.name, NodeKind.INPUT), "", 0, 0, False
    elif node.op == "output":
        kind, op, flops, moved, view = NodeKind.OUTPUT, "", 0, 0, False
    else:
        kind, op = NodeKind.CALL, _op_name(node.target)
        grad_inputs = frozenset(i.name for i in node.all_input_nodes if grads.get(i.name, False))
        flops, moved, view, saved = node_costs(node, counter, grad_inputs)
    return NodeInfo(
        name=node.name,
        kind=kind,
        op=op,
        inputs=tuple(i.name for i in inputs),
        input_metas=tuple(m for i in inputs for m in _metas(i.meta.get("val"))[:1]),
        outputs=outputs,
        module=module,
        module_type=module_type,
        flops=flops,
        bytes_moved=moved,
        is_view=view,
        requires_grad=requires_grad,
        source=_source(node),
    ), saved


def _metas(value: Any) -> tuple[TensorMeta, ...]:
    if isinstance(value, torch.Tensor):
        return (TensorMeta(shape=tuple(int(s) for s in value.shape), dtype=value.dtype),)
    if isinstance(value, (list, tuple)):
        return tuple(m for v in value for m in _metas(v))
    return ()


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _innermost_module(node: Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return path, cls_name


def _source(node: Node) -> str:
    """The deepest frame of the user's code (not torch's layers) that created the node."""
    trace = node.meta.get("stack_trace") or ""
    frames = [f for f in _FRAME.findall(trace) if not f[0].startswith(_TORCH_DIR)]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else ""
