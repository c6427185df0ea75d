"""Build a GraphIR from an ExportedProgram and the module it was exported from."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from autoshard.capture.costs import NodeCosts, node_costs
from autoshard.ir.graph import GraphIR, NodeInfo, NodeKind, ParamInfo, TensorMeta

__all__ = ["build_graph_ir"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def build_graph_ir(model: nn.Module, exported: ExportedProgram) -> GraphIR:
    """Walk the exported graph once, recording shapes, module paths, costs and parameter identities."""
    kinds = _placeholder_kinds(exported)
    params = _param_infos(model, exported)
    trainable = {n for p in params for n in p.nodes if _is_trainable(model, exported, n)}
    grads: dict[str, bool] = {}
    nodes: list[NodeInfo] = []
    with NodeCosts() as counter:
        for node in exported.graph.nodes:
            grads[node.name] = node.name in trainable or (
                node.op == "call_function"
                and _is_floating(node.meta.get("val"))
                and any(grads.get(i.name, False) for i in node.all_input_nodes)
            )
            nodes.append(_node_info(node, kinds, counter, requires_grad=grads[node.name]))
    return GraphIR(nodes=tuple(nodes), params=params, model_type=type(model).__name__, exported=exported)


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


def _is_trainable(model: nn.Module, exported: ExportedProgram, node_name: str) -> bool:
    target = exported.graph_signature.inputs_to_parameters.get(node_name)
    return target is not None and model.get_parameter(target).requires_grad


def _is_floating(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype.is_floating_point
    if isinstance(value, (list, tuple)):
        return any(_is_floating(v) for v in value)
    return False


def _node_info(
    node: Node, kinds: dict[str, NodeKind], counter: NodeCosts, *, requires_grad: bool
) -> NodeInfo:
    inputs = tuple(node.all_input_nodes)
    outputs = _metas(node.meta.get("val")) if node.op != "output" else ()
    module, module_type = _innermost_module(node)
    if node.op == "placeholder":
        kind, op, flops, moved, view = kinds.get(node.name, NodeKind.INPUT), "", 0, 0, False
    elif node.op == "output":
        kind, op, flops, moved, view = NodeKind.OUTPUT, "", 0, 0, False
    else:
        kind, op = NodeKind.CALL, _op_name(node.target)
        flops, moved, view = node_costs(node, counter)
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
    )


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
