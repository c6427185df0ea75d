"""How the scalar loss reduces the batch, so that a split batch computes what one device computes.

One device computes the loss of the global batch. A plan cuts that batch into micro-batches (gradient
accumulation, pipeline stages) and over data-parallel ranks. Averaging the pieces' losses is exact only
when every piece counts the same number of items, and real losses do not: a padded causal-LM batch
ignores its `-100` labels, a masked-LM batch labels about 15% of its tokens, and a sum must not be
averaged at all. So the loss is read from the captured graph as a numerator over a denominator:

| the graph's loss                                  | numerator (rewritten graph)   | denominator (global)          |
|---------------------------------------------------|-------------------------------|-------------------------------|
| `cross_entropy` / `nll_loss`, mean, class targets | the same loss, reduction=sum  | count of targets != ignore_index |
| the same with label smoothing                     | the same loss, reduction=sum  | count of targets != ignore_index |
| an elementwise loss (mse, l1, bce ...), `mean()`  | the same, reduction=sum       | element count                 |
| `cross_entropy` with probability targets          | the same, reduction=sum       | row count (numel / classes)   |
| a sum (`reduction="sum"`, `.sum()`)               | unchanged                     | 1                             |
| `num.sum() / den.sum()`, den from the inputs only | `num.sum()`                   | `den.sum()` over the batch    |
| `num.sum() / n`, n a non-batched input            | `num.sum()`                   | n                             |

each optionally scaled by constants (`loss * 0.5`, a dtype cast). The graph is rewritten at capture so
that it returns the numerator, a sum that splits exactly (DTensor reduces it as Partial(sum)), and the
runtime divides every micro-batch's numerator by the denominator of the whole global batch before
backward: the accumulated gradients and the summed loss are the single device's. The denominator is
computed from the global batch, which every rank holds when a step starts (the labels, the mask), each
micro-batch's part by its own slice of the captured graph: no collective is needed.

Anything else (a sum of two differently reduced terms, a loss divided by a constant that may be the
batch size, class weights, a `loss_fn` outside the graph) is `unknown`: it runs as captured, and a plan
that would split its batch where that changes the result is refused, naming what was found, unless the
user declares `loss_reduction="mean"` (equal micro-batches weigh equally) or `"sum"`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from autoshard.errors import InputError

__all__ = ["DECLARED", "LossReduction", "analyse_loss", "declared_reduction", "loss_reduction_of", "reduction_at_capture"]

aten = torch.ops.aten
DECLARED = ("mean", "sum")
_MEAN, _SUM = 1, 2  # torch's Reduction enum, as the aten loss ops take it

# elementwise losses: op -> position of their `reduction` argument (default mean)
_ELEMENTWISE = {
    aten.mse_loss.default: 2,
    aten.l1_loss.default: 2,
    aten.smooth_l1_loss.default: 2,
    aten.huber_loss.default: 2,
    aten.soft_margin_loss.default: 2,
    aten.binary_cross_entropy.default: 3,
    aten.binary_cross_entropy_with_logits.default: 4,
    aten.kl_div.default: 2,
}
# class-target losses: (input, target, weight, reduction, ignore_index, ...)
_CLASS = (aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default, aten.nll_loss2d.default)
# ops that pass a scalar through unchanged, or scale it by a constant
_PASS = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default, aten.alias.default,
    aten.view.default, aten.reshape.default, aten.squeeze.default, aten.squeeze.dim, aten.contiguous.default,
}
_SCALE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


@dataclass(frozen=True, kw_only=True, slots=True)
class LossReduction:
    """The loss's reduction: what the (rewritten) graph returns per micro-batch, and the global
    denominator each micro-batch's value is divided by."""

    kind: str  # "token mean", "mean", "row mean", "sum", "masked mean", "divided by an input", "unknown"
    found: str  # the graph's loss as read, for messages and the plan report
    # None: cutting the batch into micro-batches (and pipeline stages) is exact; else why it is not
    splits: str | None = None
    # None: splitting the batch over dp ranks is exact (DTensor reduces it globally); else why it is not
    dp_split: str | None = None
    # one micro-batch's flat user inputs -> its share of the denominator (None: 1)
    counts: Callable[[Sequence[Any]], float] | None = field(default=None, repr=False)
    additive: bool = True  # the denominator is the sum of the micro-batches' shares (else each share is it)
    declared: bool = False
    rewritten: bool = False  # the graph returns the numerator (the loss's sum), not the loss

    def denominator(self, chunks: Sequence[Sequence[Any]]) -> float:
        """The global batch's denominator, from its micro-batches' flat user inputs."""
        if self.counts is None:
            return float(len(chunks)) if self.additive else 1.0
        if self.additive:
            return float(sum(self.counts(c) for c in chunks))
        return float(self.counts(chunks[0]))

    def check_split(self, *, dp: int, pp: int, micro_batches: int) -> None:
        """Refuse a step that would split the batch where that changes this loss."""
        if self.splits is not None and (pp > 1 or micro_batches > 1):
            how = f"{pp} pipeline stages" if pp > 1 else f"{micro_batches} micro-batches"
            raise InputError(
                f"the loss is {self.found}; {how} would combine per-micro-batch losses, which is exact only "
                f"for a known reduction ({self.splits}). Write the loss as a mean or sum reduction (e.g. "
                "F.cross_entropy), declare loss_reduction='mean' (equal micro-batches weigh equally) or 'sum' "
                "to autoshard.plan/compile, or plan one micro-batch without pipeline stages"
            )
        if self.dp_split is not None and dp > 1:
            raise InputError(
                f"the loss is {self.found}; splitting its batch over dp={dp} ranks averages per-rank means "
                f"({self.dp_split}). Write the loss as one reduction at the output, declare "
                "loss_reduction= to autoshard.plan/compile, or plan without dp"
            )

    def describe(self) -> str:
        """One line for reports: the reduction and how a split batch combines."""
        how = {
            "sum": "micro-batch sums added",
            "unknown": "run as captured; refused where a split would change it",
        }.get(self.kind, "micro-batch sums over the global batch's denominator")
        if self.declared:
            how = {"mean": "micro-batch losses averaged (declared)", "sum": "micro-batch losses added (declared)"}[self.kind]
        return f"{self.kind}: {self.found}; {how}"


def loss_reduction_of(ir: Any) -> LossReduction:
    """The reduction capture read for `ir`'s loss; a graph not captured by `autoshard.capture` (none
    was read) is refused rather than averaged."""
    reduction = getattr(ir.loss, "reduction", None) if ir.loss is not None else None
    if reduction is None:
        raise InputError(
            "expected a graph captured by autoshard.capture, whose loss reduction is read at capture; "
            "found one without it: capture the model with autoshard.capture"
        )
    return reduction


def reduction_at_capture(
    exported: Any, index: int | None, batch: int | None, declared: str | None, in_graph: bool, export_at: Any
) -> LossReduction | None:
    """The reduction `capture` records: `declared` ("mean"/"sum") where given, else what the graph's loss
    tail shows (`analyse_loss`, which rewrites the graph to return the numerator); a `loss_fn` outside
    the graph (`in_graph=False`) is unknown unless declared. None where the model returns no loss."""
    if not in_graph:
        if declared is not None:
            return declared_reduction(declared, None)
        return LossReduction(
            kind="unknown",
            found="computed by loss_fn, outside the graph",
            splits="autoshard cannot read a loss_fn's reduction",
            dp_split="autoshard cannot read a loss_fn's reduction",
        )
    found = analyse_loss(exported, index, batch_rows=batch, export_at=export_at) if index is not None else None
    return declared_reduction(declared, found) if declared is not None else found


def declared_reduction(value: str, found: LossReduction | None) -> LossReduction:
    """The reduction a user declares (`loss_reduction=`), where the graph cannot tell (or there is no
    graph loss: a `loss_fn`). One the graph contradicts is refused rather than followed."""
    if value not in DECLARED:
        raise InputError(f"expected loss_reduction among {list(DECLARED)}, found {value!r}")
    if found is not None and found.kind != "unknown" and not _agrees(value, found.kind):
        raise InputError(
            f"loss_reduction={value!r} was declared, but the graph's loss is {found.found} ({found.kind}), "
            "which autoshard splits exactly by itself; leave loss_reduction unset"
        )
    if found is not None and found.kind != "unknown":
        return found
    what = found.found if found is not None else "computed by loss_fn"
    return LossReduction(kind=value, found=what, additive=value == "mean", declared=True)


def _agrees(declared: str, kind: str) -> bool:
    return (declared == "sum" and kind == "sum") or (declared == "mean" and kind in ("mean", "row mean"))


# ---- reading the graph ------------------------------------------------------------------------------


def analyse_loss(
    exported: ExportedProgram,
    index: int,
    *,
    batch_rows: int | None,
    export_at: Callable[[int], tuple[ExportedProgram, int | None]] | None = None,
) -> LossReduction:
    """Read the reduction of the loss at output position `index` and rewrite the graph to return its
    numerator where it is known (see the module docstring). `batch_rows` is the captured batch (dim 0):
    a constant scale of the loss that is a multiple of it may be the batch size baked in by export
    (`loss.sum() / x.shape[0]`); `export_at(rows)` exports the model at another batch (and finds its
    loss), and a constant that follows the batch there is the batch size (refused: see `read`)."""
    reader = _Reader(exported, batch_rows)
    found = reader.read(_output(exported, index))
    if reader.suspect and export_at is not None and batch_rows:
        again = _Reader(exported, 2 * batch_rows)
        try:
            other, other_index = export_at(2 * batch_rows)
        except Exception:  # noqa: BLE001 - a model that only runs its captured batch: assume the worst
            other_index = None
        if other_index is not None:
            again.exported = other
            again.read(_output(other, other_index))
        if other_index is None or [d for _, d in again.scales] != [d for _, d in reader.scales]:
            found = reader.batch_scaled(found)  # the constant moved with the batch: x.shape[0]
        else:
            found = reader.found_unscaled
    elif reader.suspect:
        found = reader.batch_scaled(found)
    if found.kind == "unknown":
        reader.rewrites.clear()
        reader.numerators.clear()
    for rewrite in reader.rewrites:
        rewrite()
    # any other mean over non-ignored targets (inside a loss of two terms, say) becomes its sum over
    # its count inside the graph: DTensor reduces both globally, where it would average per-rank means
    weighted = []
    for node in reader.data_dependent_means():
        if node in reader.numerators:
            continue
        if _arg(node, 2, "weight", None) is None:
            _count_inside(exported, node)
        else:  # its mean divides by the class weights of the targets each rank sees
            weighted.append(node.name)
    exported.graph_module.recompile()
    if weighted:
        found = dataclasses.replace(
            found, dp_split=f"{', '.join(weighted[:3])}: a class-weighted mean, whose weights differ between ranks"
        )
    return found


class _Reader:
    def __init__(self, exported: ExportedProgram, batch_rows: int | None) -> None:
        self.exported, self.batch_rows = exported, batch_rows
        specs = exported.graph_signature.input_specs
        self.user = [s.arg.name for s in specs if s.kind is InputKind.USER_INPUT]
        self.constants = {s.arg.name: exported.constants[s.target] for s in specs if s.kind is InputKind.CONSTANT_TENSOR}
        self.rewrites: list[Callable[[], None]] = []
        self.numerators: set[fx.Node] = set()  # the class-loss nodes the output rewrite turns into sums
        self.scales: list[tuple[str, float]] = []  # (node, divisor) of the constant scales after the reduction
        self.suspect = False  # a scale that is a multiple of the batch rows
        self.found_unscaled: LossReduction | None = None

    def read(self, node: Any) -> LossReduction:
        """The reduction of `node`, through the casts and constant scales after it (kept in `scales`)."""
        while isinstance(node, fx.Node) and node.op == "call_function":
            if node.target in _PASS:
                node = node.args[0]
                continue
            if node.target in _SCALE and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
                c = float(node.args[1])
                divisor = c if node.target in (aten.div.Tensor, aten.div.Scalar) else (1 / c if c else 0.0)
                self.scales.append((node.name, divisor))
                node = node.args[0]
                continue
            break
        found = self._reduction(node)
        self.found_unscaled = found
        self.suspect = found.kind != "unknown" and any(
            self.batch_rows and _multiple_of(d, self.batch_rows) for _, d in self.scales
        )
        return found

    def batch_scaled(self, found: LossReduction) -> LossReduction:
        """`found`, then divided by a constant that is (or may be) the batch size: a micro-batch would
        keep the micro-batch's, so splitting is refused."""
        name, d = next((n, d) for n, d in self.scales if self.batch_rows and _multiple_of(d, self.batch_rows))
        self.rewrites.clear()
        return LossReduction(
            kind="unknown",
            found=f"{found.found}, then {name} divides by {d:g}, the captured batch of {self.batch_rows} rows (x.shape[0])",
            splits="torch.export bakes x.shape[0] into a constant, which each micro-batch would keep",
        )

    def _reduction(self, node: Any) -> LossReduction:
        name = getattr(node, "name", repr(node))
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return _unknown(f"{name} (not an operation)")
        target, args = node.target, node.args
        if target in _CLASS:
            return self._class_loss(node)
        if target in _ELEMENTWISE:
            pos = _ELEMENTWISE[target]
            reduction = _arg(node, pos, "reduction", _MEAN)
            op = target._opname
            if reduction == _SUM:
                return LossReduction(kind="sum", found=f"{op} (sum)", additive=False)
            if reduction != _MEAN:
                return _unknown(f"{op} with reduction={reduction}")
            numel = _numel(args[0])
            self.rewrites.append(_set_arg(node, pos, "reduction", _SUM))
            return LossReduction(kind="mean", found=f"{op} (mean over elements)", counts=lambda _c: numel, rewritten=True)
        if target in (aten.mean.default, aten.mean.dim) and _all_dims(node):
            numel = _numel(args[0])
            self.rewrites.append(_retarget(node, aten.sum.default if target is aten.mean.default else aten.sum.dim_IntList))
            return LossReduction(kind="mean", found="mean() over all elements", counts=lambda _c: numel, rewritten=True)
        if target in (aten.sum.default, aten.sum.dim_IntList) and _all_dims(node):
            return LossReduction(kind="sum", found="sum() over all elements", additive=False)
        if target is aten.div.Tensor and isinstance(args[1], fx.Node):
            return self._division(node)
        return _unknown(f"{name} ({getattr(target, '__name__', target)})")

    def _class_loss(self, node: fx.Node) -> LossReduction:
        op = node.target._opname
        inp, target = node.args[0], node.args[1]
        weight = _arg(node, 2, "weight", None)
        reduction = _arg(node, 3, "reduction", _MEAN)
        ignore = _arg(node, 4, "ignore_index", -100)
        if reduction == _SUM:
            return LossReduction(kind="sum", found=f"{op} (sum)", additive=False)
        if reduction != _MEAN:
            return _unknown(f"{op} with reduction={reduction}")
        if weight is not None:
            return _unknown(f"{op} with class weights (its mean divides by the weights of the targets seen)")
        t_val = target.meta.get("val") if isinstance(target, fx.Node) else None
        if isinstance(t_val, torch.Tensor) and t_val.is_floating_point():  # class probabilities: a row mean
            i_val = inp.meta["val"]
            rows = i_val.numel() // i_val.shape[1] if i_val.ndim >= 2 else 1
            self.rewrites.append(_set_arg(node, 3, "reduction", _SUM))
            self.numerators.add(node)
            return LossReduction(kind="row mean", found=f"{op} with probability targets (mean over rows)",
                                 counts=lambda _c: rows, rewritten=True)  # fmt: skip
        count = self._from_inputs(target)
        if count is None:
            return _unknown(f"{op} whose targets are computed from more than the inputs")
        self.rewrites.append(_set_arg(node, 3, "reduction", _SUM))
        self.numerators.add(node)
        return LossReduction(
            kind="token mean",
            found=f"{op} (mean over targets != {ignore})",
            counts=lambda chunk: int((count(chunk) != ignore).sum()),
            rewritten=True,
        )

    def _division(self, node: fx.Node) -> LossReduction:
        num, den = node.args[0], node.args[1]
        inner = self.read(num)
        if inner.kind != "sum":
            return _unknown(f"{inner.found} divided by {den.name}")
        if den.op == "placeholder" and den.name in self.user:
            if _batched(den, self.batch_rows):
                return _unknown(f"{inner.found} divided by the batched input {den.name}")
            position = self.user.index(den.name)
            self.rewrites.append(_retarget(node, aten.clone.default, args=(num,)))
            return LossReduction(kind="divided by an input", found=f"{inner.found} / input {den.name}",
                                 counts=lambda chunk: float(chunk[position]), additive=False, rewritten=True)  # fmt: skip
        if den.op == "call_function" and den.target in (aten.sum.default, aten.sum.dim_IntList) and _all_dims(den):
            count = self._from_inputs(den)
            if count is not None:
                self.rewrites.append(_retarget(node, aten.clone.default, args=(num,)))
                return LossReduction(kind="masked mean", found=f"{inner.found} / {den.name} (a sum over the inputs)",
                                     counts=lambda chunk: float(count(chunk)), rewritten=True)  # fmt: skip
        return _unknown(f"{inner.found} divided by {den.name}, which is not a sum computed from the inputs alone")

    def _from_inputs(self, node: Any) -> Callable[[Sequence[Any]], torch.Tensor] | None:
        """`node` as a function of one micro-batch's flat user inputs, if it depends on nothing else."""
        if not isinstance(node, fx.Node):
            return None
        needed: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            if n.op == "placeholder" and n.name not in self.user and n.name not in self.constants:
                return None  # a parameter or buffer
            if n.op == "get_attr":
                return None
            stack.extend(n.all_input_nodes)
        graph, env = fx.Graph(), {}
        placeholders = []
        for n in self.exported.graph.nodes:
            if n not in needed:
                continue
            if n.op == "placeholder":
                env[n] = graph.placeholder(n.name)
                placeholders.append(n.name)
            else:
                env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[node])
        module = fx.GraphModule(torch.nn.Module(), graph)
        user, constants = list(self.user), dict(self.constants)

        def evaluate(chunk: Sequence[Any]) -> torch.Tensor:
            by_name = dict(zip(user, chunk, strict=True))
            with torch.no_grad():
                return module(*(constants[p] if p in constants else by_name[p] for p in placeholders))

        return evaluate

    def data_dependent_means(self) -> list[fx.Node]:
        """Mean-reduced class losses with integer targets anywhere in the graph: DTensor averages their
        per-rank means (Partial(avg)), exact only when every rank counts as many targets."""
        out = []
        for n in self.exported.graph.nodes:
            if n.op == "call_function" and n.target in _CLASS and _arg(n, 3, "reduction", _MEAN) == _MEAN:
                t = n.args[1].meta.get("val") if isinstance(n.args[1], fx.Node) else None
                if isinstance(t, torch.Tensor) and not t.is_floating_point():
                    out.append(n)
        return out


# ---- small helpers ------------------------------------------------------------------------------------


def _count_inside(exported: ExportedProgram, node: fx.Node) -> None:
    """Rewrite the class-loss mean `node` as `loss(reduction=sum) / (target != ignore_index).sum()` in
    the graph (new nodes with fake values, for the planner). A split of its batch then reduces the sum
    and the count over every rank before dividing (both Partial(sum)), which is the global mean."""
    from torch._guards import detect_fake_mode

    graph, target = exported.graph, node.args[1]
    ignore = _arg(node, 4, "ignore_index", -100)
    fake = detect_fake_mode([node.meta["val"], target.meta["val"]])
    users = list(node.users)
    _set_arg(node, 3, "reduction", _SUM)()
    with graph.inserting_after(node):
        real = graph.call_function(aten.ne.Scalar, (target, ignore))
    with graph.inserting_after(real):
        count = graph.call_function(aten.sum.default, (real,))
    with graph.inserting_after(count):
        mean = graph.call_function(aten.div.Tensor, (node, count))
    with fake:
        real.meta["val"] = aten.ne.Scalar(target.meta["val"], ignore)
        count.meta["val"] = aten.sum.default(real.meta["val"])
        mean.meta["val"] = aten.div.Tensor(node.meta["val"], count.meta["val"])
    for new in (real, count, mean):  # where the user's code made it: module path and source line
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
    for user in users:
        user.replace_input_with(node, mean)
    for spec in exported.graph_signature.output_specs:  # a model that also returns this loss returns the mean
        if getattr(spec.arg, "name", None) == node.name:
            spec.arg.name = mean.name


def _output(exported: ExportedProgram, index: int) -> Any:
    return next(n for n in exported.graph.nodes if n.op == "output").args[0][index]


def _unknown(found: str) -> LossReduction:
    return LossReduction(kind="unknown", found=found, splits="a mean, a token mean, a sum or sum / count")


def _arg(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, pos: int, name: str, value: Any) -> Callable[[], None]:
    def apply() -> None:
        if len(node.args) > pos:
            node.args = (*node.args[:pos], value, *node.args[pos + 1 :])
        elif name in node.kwargs or len(node.args) < pos:
            node.kwargs = {**node.kwargs, name: value}
        else:
            node.args = (*node.args, value)

    return apply


def _retarget(node: fx.Node, target: Any, args: tuple[Any, ...] | None = None) -> Callable[[], None]:
    def apply() -> None:
        node.target = target
        if args is not None:
            node.args, node.kwargs = args, {}

    return apply


def _numel(node: Any) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return int(val.numel()) if isinstance(val, torch.Tensor) else 1


def _all_dims(node: fx.Node) -> bool:
    """A sum or mean over every dim of its input (no dim argument, or all of them, keepdim or not)."""
    if node.target in (aten.mean.default, aten.sum.default):
        return True
    dims = _arg(node, 1, "dim", None)
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if dims is None or val is None:
        return dims is None
    return sorted(d % max(val.ndim, 1) for d in dims) == list(range(val.ndim))


def _batched(node: fx.Node, rows: int | None) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.ndim > 0 and (rows is None or val.shape[0] == rows)


def _multiple_of(value: float, rows: int) -> bool:
    return value >= rows and math.isclose(value / rows, round(value / rows), rel_tol=0, abs_tol=1e-9)

