"""One export with a symbolic batch, specialised to each batch size the step search asks for.

The step search prices a model at several micro-batch sizes (solver/step_search.py), and each size
used to be a fresh `torch.export`: eight exports of GPT-3's 96 layers, about 4 s each, were most of
its plan's time. Here the model is exported once more with dim 0 of every batched input symbolic
(`Dim.DYNAMIC`), and each size is made from that graph by `specialize`: every node keeps its target,
arguments and metadata (module stack, source); its `val` is rebuilt at the new shape by putting the
size into the symbolic shapes export recorded (no op is run again); and the size arithmetic
(`sym_size`, `operator.mul`, the range asserts) is folded into the integers it evaluates to.

A concrete trace also skips what it can see is a no-op: a slice that keeps a whole dimension is not
recorded (and Python indexing that changes nothing becomes `aten.alias`), where the symbolic trace
records a slice of the batch dimension. `specialize` folds those the same way. Whether that makes
the concrete graph is checked, not assumed: the symbolic export is specialised to the batch the model
was captured at and compared node by node (target, arguments, names, shapes) with that capture's own
export; only if they are equal is it used for other sizes (tests/test_capture_resize.py runs the zoo).

It is used only where export's own guarantee covers the size: the batch is the graph's one symbol,
the size lies in the range export proved (`ExportedProgram.range_constraints`; export specialises
size 1, so size 1 is exported concretely), and every guard export's trace assumed of the batch holds
at that size (the range alone does not say so: `view(b // 2, 2, ...)` guards b even, b // 2 != 1).
Anything else -- the export fails, the batch is specialised, another symbol appears, the check
differs -- falls back to a concrete export per size, and `SymbolicBatch.reason` says why.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim, ExportedProgram, ShapesCollection
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils import _pytree as pytree

from autoshard.capture.calls import Call

__all__ = ["SymbolicBatch", "graph_signature", "specialize"]

aten = torch.ops.aten
# ops that only check sizes: once the sizes are integers they have nothing left to check
_SIZE_CHECKS = frozenset({aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
                          aten.sym_constrain_range.default})
_SIZE_QUERIES = frozenset({aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
                           aten.sym_storage_offset.default})
# what Python indexing records after a slice of a dim it keeps whole: a chain the concrete trace
# starts at the next of these, and ends in `alias` when nothing else was indexed
_INDEXING = frozenset({aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.index.Tensor})
_SYMBOLS = (torch.SymInt, torch.SymFloat, torch.SymBool)
# The symbolic export takes about three concrete exports' time (GPT-3 175B: ~10 s against ~4 s;
# the zoo's tiny models: 0.6-2.2 s against 0.3-0.8 s), and each specialisation a fraction of one:
# it pays from about this many sizes on
WORTH_IT_SIZES = 5


class SymbolicBatch:
    """The model exported once with a symbolic batch; `at(rows)` is its ExportedProgram at `rows`, or
    None where a concrete export is needed (`reason` then says why)."""

    def __init__(self, model: torch.nn.Module, call: Call, reference: Sequence[tuple], rows: int,
                 export: Callable[..., ExportedProgram]) -> None:
        self.model, self.call, self.reference, self.rows, self._export_fn = model, call, reference, rows, export
        self._exported: ExportedProgram | None = None
        self._symbol: Any = None
        self._range: Any = None
        self._guards: list[Any] = []  # what export assumed of the batch (shape guards, runtime asserts)
        self._tried = False
        self._expected: set[int] = set()
        self.reason = "not exported yet"

    def expect(self, sizes: Iterable[int]) -> None:
        """Sizes the caller will ask for; until enough are expected (`WORTH_IT_SIZES` in range, besides
        the captured one), `at` answers None and each size is exported concretely."""
        self._expected |= {s for s in sizes if s >= 2 and s != self.rows}

    @property
    def prepared(self) -> bool:
        """Whether the symbolic export has been tried."""
        return self._tried

    @property
    def worth_it(self) -> bool:
        return len(self._expected) >= WORTH_IT_SIZES

    def at(self, rows: int) -> ExportedProgram | None:
        if not self.worth_it:
            self.reason = f"{len(self._expected)} sizes expected, fewer than {WORTH_IT_SIZES}: exported one by one"
            return None
        if not self._tried:
            self._tried = True
            self._prepare()
        if self._exported is None:
            return None
        if not (rows >= 2 and bool(self._range.lower <= rows) and bool(rows <= self._range.upper)):
            return None
        if not self._holds(rows):  # say, the model needs an even batch: a concrete export tells
            return None
        try:
            return specialize(self._exported, {self._symbol: rows})
        except SizeOutOfRange:  # the model's own runtime asserts rule this size out: export it to see
            return None

    def _holds(self, rows: int) -> bool:
        """Whether every assumption export made of the batch holds at `rows`: only then is the symbolic
        graph the model's graph at that size (its range alone does not say so: `view(b // 2, 2, ...)`
        guards b even, and b // 2 != 1)."""
        value = {self._symbol: sympy.Integer(rows)}
        for expr in self._guards:
            held = expr.xreplace(value)
            if held.free_symbols or not bool(held):
                return False
        return True

    def _prepare(self) -> None:
        args, kwargs = self.call.args, dict(self.call.kwargs)
        try:
            shapes = ShapesCollection()
            for a in self.call.tensors():
                if a.dim() > 0:
                    shapes[a] = {0: Dim.DYNAMIC}
            ep = self._export_fn(self.model, args, kwargs, shapes.dynamic_shapes(self.model, args, kwargs))
        except Exception as exc:  # noqa: BLE001 - no symbolic batch for this model: every size is exported
            self.reason = f"the symbolic-batch export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return
        symbols = set(ep.range_constraints)
        batch = {d.node.expr for d in _user_batch_dims(ep) if isinstance(d, torch.SymInt)}
        if len(symbols) != 1 or batch != symbols:
            self.reason = f"the export did not keep the batch as its one symbol (symbols {sorted(map(str, symbols))})"
            return
        (symbol,) = symbols
        try:
            same = graph_signature(specialize(ep, {symbol: self.rows})) == list(self.reference)
        except Exception as exc:  # noqa: BLE001 - a graph specialize cannot rebuild: export every size
            self.reason = f"the symbolic graph could not be specialised: {type(exc).__name__}: {exc}"
            return
        if not same:
            self.reason = f"specialised to the captured batch ({self.rows}), it differs from that batch's own export"
            return
        shape_env = _shape_env(ep)
        if shape_env is None:
            self.reason = "the symbolic export has no shape environment to read its guards from"
            return
        guards = [g.expr for g in shape_env.guards]
        guards += [a.expr for asserts in shape_env.deferred_runtime_asserts.values() for a in asserts]
        # in terms of the batch symbol: export unified the inputs' dims into it (s97 -> s72)
        self._guards = [_in_terms_of(e, dict(shape_env.replacements)) for e in guards]
        self._symbol, self._range, self._exported = symbol, ep.range_constraints[symbol], ep
        self.reason = ""


def _in_terms_of(expr: Any, replacements: dict[Any, Any]) -> Any:
    for _ in range(8):  # replacements may chain; a handful of rounds reaches the representatives
        replaced = expr.xreplace(replacements)
        if replaced == expr:
            break
        expr = replaced
    return expr


def _shape_env(ep: ExportedProgram) -> Any:
    for n in ep.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and getattr(val, "fake_mode", None) is not None:
            return val.fake_mode.shape_env
    return None


def _user_batch_dims(ep: ExportedProgram) -> list[Any]:
    users = set(ep.graph_signature.user_inputs)
    return [
        n.meta["val"].shape[0]
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in users
        and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0
    ]


def graph_signature(ep: ExportedProgram) -> list[tuple]:
    """What two captures of one model must share to be the same graph: per node its kind, name,
    target, arguments (nodes by name) and the shapes, strides and dtypes of its value."""

    def arg(x: Any) -> Any:
        return ("%", x.name) if isinstance(x, fx.Node) else x

    def meta(t: torch.Tensor) -> tuple:
        return tuple(t.shape), tuple(t.stride()), t.dtype

    return [
        (n.op, n.name, str(n.target), repr(pytree.tree_map(arg, (n.args, n.kwargs))),
         repr(pytree.tree_map_only(torch.Tensor, meta, n.meta.get("val"))))
        for n in ep.graph.nodes
    ]


def specialize(ep: ExportedProgram, values: dict[Any, int]) -> ExportedProgram:
    """`ep` with its size symbols set to `values` (see the module docstring)."""
    subs = {k: sympy.Integer(v) for k, v in values.items()}
    cache: dict[Any, Any] = {}

    def concrete(x: Any) -> Any:
        if not isinstance(x, _SYMBOLS):
            return x
        expr = x.node.expr
        if expr not in cache:
            value = expr.xreplace(subs)
            if value.free_symbols:
                raise ValueError(f"size {expr} has symbols beyond the batch")
            cache[expr] = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}[type(x)](value)
        return cache[expr]

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def value_of(val: Any) -> Any:
        if isinstance(val, torch.Tensor):
            with mode:
                return torch.empty_strided([concrete(s) for s in val.shape], [concrete(s) for s in val.stride()],
                                           dtype=val.dtype, device=val.device, requires_grad=val.requires_grad)
        return pytree.tree_map(lambda v: value_of(v) if isinstance(v, torch.Tensor) else concrete(v), val) \
            if isinstance(val, list | tuple) else concrete(val)

    graph = fx.Graph()
    new: dict[fx.Node, Any] = {}  # a node's replacement: a new node, or the integer it folded to
    for node in ep.graph.nodes:
        def arg(n: fx.Node) -> Any:
            return new[n]

        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], arg))
            continue
        if node.op not in ("placeholder", "call_function"):
            raise ValueError(f"unexpected {node.op} node {node.name}")
        if node.target in _SIZE_CHECKS:  # export's runtime asserts (say, an even batch) must hold here
            _check_size_assert(node, fx.map_arg(node.args, arg), fx.map_arg(node.kwargs, arg))
            continue
        old = node.meta.get("val")
        if node.op == "call_function" and (isinstance(old, _SYMBOLS) or node.target in _SIZE_QUERIES):
            new[node] = concrete(old)  # size arithmetic: the integer it evaluates to
            continue
        val = value_of(old)
        source = node.args[0] if node.args else None
        if node.target is aten.slice.Tensor and _keeps_whole(node, val, _val(new.get(source))):
            if all(u.target in _INDEXING for u in node.users):
                new[node] = new[source]  # the next index applies to the tensor itself
                continue
            # indexing that changed nothing: the concrete trace returns an alias
            node_target, node_args, node_kwargs = aten.alias.default, (new[source],), {}
        else:
            node_target, node_args, node_kwargs = node.target, fx.map_arg(node.args, arg), fx.map_arg(node.kwargs, arg)
        if node.op == "placeholder":
            made = graph.placeholder(node.name)
        else:  # named as a concrete trace names it: by target, numbered in graph order
            name = "alias" if node_target is aten.alias.default and node.target is not aten.alias.default \
                else re.sub(r"_\d+$", "", node.name)
            made = graph.create_node("call_function", node_target, node_args, node_kwargs, name=name)
        made.meta = dict(node.meta)
        made.meta["val"] = val
        if "tensor_meta" in node.meta:
            made.meta["tensor_meta"] = pytree.tree_map_only(torch.Tensor, _extract_tensor_metadata, val)
        new[node] = made
    out = copy.copy(ep)
    out._graph_module = fx.GraphModule(ep.graph_module, graph)
    out._graph_module.meta.update(ep.graph_module.meta)
    out._range_constraints = {}
    # the capture rewrites the loss tail of its copy: nothing it may touch is shared with `ep`
    out._graph_signature = copy.deepcopy(ep.graph_signature)
    out._module_call_graph = copy.deepcopy(ep.module_call_graph)
    return out


class SizeOutOfRange(ValueError):
    """A size the symbolic graph's own asserts rule out."""


def _check_size_assert(node: fx.Node, args: tuple, kwargs: dict) -> None:
    if node.target is aten._assert_scalar.default:
        if not args[0]:
            raise SizeOutOfRange(f"{node.name}: {args[1] if len(args) > 1 else 'assert'}")
        return
    size = args[0]
    low = kwargs.get("min", args[1] if len(args) > 1 else None)
    high = kwargs.get("max", args[2] if len(args) > 2 else None)
    if (low is not None and size < low) or (high is not None and size > high):
        raise SizeOutOfRange(f"{node.name}: {size} outside [{low}, {high}]")


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else None


def _keeps_whole(node: fx.Node, val: torch.Tensor, source_val: Any) -> bool:
    """A slice of a dim that was symbolic in the trace, keeping all of it at the concrete size."""
    traced = node.args[0].meta.get("val")
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    step = node.args[4] if len(node.args) > 4 else 1
    return (
        isinstance(traced, torch.Tensor)
        and isinstance(traced.shape[dim], torch.SymInt)
        and start in (0, None)
        and step == 1
        and isinstance(source_val, torch.Tensor)
        and tuple(val.shape) == tuple(source_val.shape)
    )
