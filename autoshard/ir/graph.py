"""GraphIR: a frozen, shape-annotated view of a captured model.

The exported FX graph stays the source of truth for computation (codegen rewrites it); GraphIR is what the
planner reads: per node the op, the shapes and dtypes in and out, the module it came from, forward FLOPs and
bytes moved; per parameter every name it is known by (tied weights are one parameter) and its size.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch

from autoshard.report.table import format_count, format_table

if TYPE_CHECKING:
    from torch.export import ExportedProgram

__all__ = ["GraphIR", "NodeInfo", "NodeKind", "ParamInfo", "TensorMeta"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorMeta:
    """Shape and dtype of one tensor; all the planner needs to price it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(map(str, self.shape))}]"


class NodeKind(str, Enum):
    """What a graph node is: a lifted parameter or buffer, a user input, a computation or the output."""

    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"
    CALL = "call"
    OUTPUT = "output"


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeInfo:
    """One node of the exported graph with the facts the cost model needs."""

    name: str  # the FX node's name, unique in the graph
    kind: NodeKind
    op: str  # e.g. "aten.linear.default"; "" for placeholders and the output
    inputs: tuple[str, ...]  # names of the nodes whose tensors this node reads, in argument order
    input_metas: tuple[TensorMeta, ...]  # one per entry of `inputs`
    outputs: tuple[TensorMeta, ...]  # one per tensor this node returns
    module: str  # qualified name of the innermost module that ran it; "" for the root
    module_type: str  # that module's class name
    flops: int  # forward floating-point operations, as torch.utils.flop_counter counts them
    bytes_moved: int  # bytes read plus bytes written; 0 for views
    is_view: bool  # the output aliases an input: no compute, no memory traffic
    requires_grad: bool = False  # a floating output that depends on a trainable parameter
    source: str = ""  # "file:line" of the user code that created it, when known
    # Kept for backward (autograd's saved tensors, probed on meta at capture): whether this node's
    # output is kept (by its own backward, or by a consumer's, through views), and the bytes of
    # internal tensors its backward keeps besides. None: unknown (the op could not run on meta).
    output_kept: bool | None = None
    internal_saved_bytes: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamInfo:
    """One parameter tensor. Tied weights (the same tensor under several names) are one ParamInfo."""

    names: tuple[str, ...]  # every qualified name, the canonical (first registered) one first
    nodes: tuple[str, ...]  # the placeholder nodes that carry it in the graph
    meta: TensorMeta

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def numel(self) -> int:
        return self.meta.numel

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes


@dataclass(frozen=True, kw_only=True, slots=True)
class GraphIR:
    """The captured model: nodes in topological order, parameters, and the ExportedProgram they came from."""

    nodes: tuple[NodeInfo, ...]
    params: tuple[ParamInfo, ...]
    model_type: str
    exported: ExportedProgram | None = field(default=None, compare=False, repr=False)
    # The batch: dim 0 shared by every tensor input (None when they disagree), and a way to capture the
    # same model at another batch size (the planner prices one micro-batch of a pipeline that way).
    batch_size: int | None = None
    recapture: Callable[[int], GraphIR] | None = field(default=None, compare=False, repr=False)
    # pipeline_stage / recompute hints by module path (autoshard.hints.step)
    step_hints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False)
    # where the loss is among the graph's outputs (capture.calls.LossOutput), None when not looked for
    loss: Any = field(default=None, compare=False)

    def node(self, name: str) -> NodeInfo:
        """The node called `name`."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r} in the graph of {self.model_type}")

    @property
    def calls(self) -> tuple[NodeInfo, ...]:
        return tuple(n for n in self.nodes if n.kind is NodeKind.CALL)

    def param_of(self, node_name: str) -> ParamInfo | None:
        """The parameter a placeholder node carries, or None for inputs, buffers and computations."""
        for p in self.params:
            if node_name in p.nodes:
                return p
        return None

    def train_batch_norms(self) -> tuple[str, ...]:
        """The BatchNorms that normalise by the statistics of the batch they see (training mode).

        Their result depends on which rows share a forward: splitting the batch into micro-batches
        (gradient accumulation, pipelining) would give other statistics than the single device's, so
        plans with more than one micro-batch are refused for such a model (dp is exact: the planner
        only runs them on their whole input)."""
        if self.exported is None:
            return ()
        found = []
        for node in self.exported.graph.nodes:
            name = getattr(node.target, "__name__", "")
            if node.op == "call_function" and "batch_norm" in name and "no_training" not in name:
                training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", True)
                if training:
                    found.append(node.name)
        return tuple(found)

    def train_mode_ops(self) -> tuple[str, ...]:
        """The nodes that compute otherwise in `model.eval()`: train-mode BatchNorms and dropouts of
        nonzero probability. The graph is captured in training mode: the runtime turns the dropouts off
        for an eval-mode forward (passes/codegen.py `evaluating`) and refuses one with train-mode
        BatchNorms (runtime/model.py)."""
        if self.exported is None:
            return ()
        dropouts = []
        for node in self.exported.graph.nodes:
            name = getattr(node.target, "__name__", "")
            if node.op == "call_function" and "dropout" in name:
                p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
                train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
                if train and (not isinstance(p, (int, float)) or p > 0):
                    dropouts.append(node.name)
        return (*self.train_batch_norms(), *dropouts)

    def summary(self) -> dict[str, int | str]:
        """Headline figures: node count, parameter elements and bytes, forward FLOPs and bytes moved."""
        calls = self.calls
        return {
            "model": self.model_type,
            "nodes": len(self.nodes),
            "compute_nodes": sum(1 for n in calls if not n.is_view),
            "parameters": sum(p.numel for p in self.params),
            "parameter_tensors": len(self.params),
            "parameter_bytes": sum(p.nbytes for p in self.params),
            "forward_flops": sum(n.flops for n in calls),
            "forward_bytes_moved": sum(n.bytes_moved for n in calls),
        }

    def flops_by_module(self, depth: int = 1) -> dict[str, int]:
        """Forward FLOPs grouped by the first `depth` components of each node's module path."""
        out: dict[str, int] = defaultdict(int)
        for n in self.calls:
            out[".".join(n.module.split(".")[:depth]) if n.module else "<root>"] += n.flops
        return dict(out)

    @property
    def fingerprint(self) -> str:
        """A hash of the graph's structure and shapes: a saved plan carries it to refuse other models."""
        h = hashlib.sha256()
        for n in self.nodes:
            h.update(f"{n.name}|{n.kind.value}|{n.op}|{n.inputs}|{[str(m) for m in n.outputs]}\n".encode())
        for p in self.params:
            h.update(f"{p.names}|{p.meta}\n".encode())
        return h.hexdigest()[:16]

    def table(self, max_rows: int | None = 60, *, show_params: bool = False) -> str:
        """A readable per-node table; long graphs show the first and last rows around an ellipsis.

        Parameter and buffer placeholders are left out unless `show_params` (the header counts them).
        """
        hidden = {NodeKind.OUTPUT} if show_params else {NodeKind.OUTPUT, NodeKind.PARAMETER, NodeKind.BUFFER}
        rows = []
        for n in self.nodes:
            if n.kind in hidden:
                continue
            what = n.op if n.kind is NodeKind.CALL else n.kind.value
            shapes = ", ".join(str(m) for m in n.outputs)
            rows.append(
                [
                    n.name,
                    what,
                    shapes,
                    n.module or "<root>",
                    format_count(n.flops) if n.flops else "",
                    format_count(n.bytes_moved, unit="B") if n.bytes_moved else "",
                    "view" if n.is_view else "",
                ]
            )
        if max_rows is not None and len(rows) > max_rows:
            half = max_rows // 2
            skipped = len(rows) - 2 * half
            rows = rows[:half] + [[f"... {skipped} more nodes", "", "", "", "", "", ""]] + rows[-half:]
        return format_table(["node", "op", "output", "module", "flops", "bytes", ""], rows)

    def __str__(self) -> str:
        s = self.summary()
        head = (
            f"GraphIR of {s['model']}: {s['nodes']} nodes ({s['compute_nodes']} compute), "
            f"{format_count(s['parameters'])} parameters in {s['parameter_tensors']} tensors "
            f"({format_count(s['parameter_bytes'], unit='B')}), "
            f"forward {format_count(s['forward_flops'])}FLOP, "
            f"{format_count(s['forward_bytes_moved'], unit='B')} moved"
        )
        return head + "\n" + self.table()
