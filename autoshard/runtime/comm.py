"""Communication accounting: the collectives one training step really issues, next to the plan's.

The plan lists the collectives it priced (`Plan.collectives`); DTensor decides at run time which ones it
actually runs. `measure_comm(compiled, *inputs)` runs one training step under a dispatch mode that sees the collective
ops DTensor issues (as `CommDebugMode` does, letting DTensor desugar first) and records each one's kind,
size and mesh axis; the phase (forward, backward, optimizer) is set around the parts of the step.
`CommDebugMode` itself is not used: its module tracker (hooks on the generated GraphModule) breaks the
backward of gpt-tiny ("aten.add.Tensor got mixed torch.Tensor and DTensor", torch 2.13) and it records
counts but not sizes; its forward/backward split would also put the gradient fix-ups run after autograd
in the wrong phase.

The byte figure compared is the plan's `full_bytes`: the buffer a collective operates on, unsharded on
its axis (the tensor with the other axes' shardings applied, as strategies/transitions.py defines it):
the input of an all-reduce or reduce-scatter, the output of an all-gather (local input times the group
size), all ranks' pieces of an all-to-all together (local input times the group size). It does not depend on the algorithm (ring,
tree) so the plan and the run must agree exactly; bytes sent per device follow from it with
`collective_bytes_per_device` and are reported alongside, not compared.

Under ZeRO the plan's collectives of parameters over dp give way to FSDP2's (runtime/fsdp.py
`zero_collectives`): per FSDP group (a block, or the program's remaining parameters) one all-gather
before forward and reduce-scatters of the gradients, as often as the ZeRO stage and the micro-batch
count say. FSDP's own c10d ops are recorded like DTensor's; a dimension dp does not divide is padded
by FSDP, and the padding shows as issued bytes beyond the planned.

One-element collectives are counted apart (`scalars p/i`): DTensor's cross-entropy backward all-reduces
the partial `total_weight` scalar of nll_loss (4 bytes) inside the composite, which no placement of the
plan's graph nodes exposes; `matches_beyond_scalars` compares everything else exactly.

Measuring runs a real step: the parameters are updated as by `train_step`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from autoshard.cost_model.collectives import Collective, collective_bytes_per_device
from autoshard.report.table import format_count, format_table
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import PlannedCollective
from autoshard.runtime.fsdp import zero_collectives
from autoshard.runtime.grad_sync import bucket_sizes

if TYPE_CHECKING:
    from autoshard.runtime.model import CompiledModel

__all__ = ["CommReport", "CommRow", "IssuedCollective", "SCALAR_BYTES", "measure_comm"]

PHASES = ("forward", "backward", "optimizer")
SCALAR_BYTES = 8  # a collective on at most this many bytes moves one element: the loss and its kin

# collective op name (functional, c10d or DTensor's own) -> (kind, how full_bytes follows from the input)
_KINDS: dict[str, tuple[str, str]] = {
    "all_reduce": ("all_reduce", "input"),
    "all_reduce_": ("all_reduce", "input"),
    "allreduce_": ("all_reduce", "input"),
    "all_gather_into_tensor": ("all_gather", "input_x_group"),
    "all_gather_into_tensor_out": ("all_gather", "input_x_group"),
    "_allgather_base_": ("all_gather", "input_x_group"),
    "allgather_": ("all_gather", "input_x_group"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "_reduce_scatter_base_": ("reduce_scatter", "input"),
    "all_to_all_single": ("all_to_all", "input_x_group"),
    "alltoall_base_": ("all_to_all", "input_x_group"),
    "shard_dim_alltoall": ("all_to_all", "input_x_group"),
    "broadcast_": ("broadcast", "input"),
}


# c10d's own ops (what FSDP2 calls) take (output, input, process group, ...): the input is the second
_OUTPUT_FIRST = frozenset({"_allgather_base_", "_reduce_scatter_base_"})


@dataclass(frozen=True, kw_only=True, slots=True)
class IssuedCollective:
    """One collective the run issued."""

    phase: str  # "forward", "backward" (autograd and the gradient fix-up) or "optimizer"
    collective: str  # "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast"
    axis: str  # mesh axis, or "?" for a group that is not one axis of the mesh
    full_bytes: int  # as PlannedCollective.full_bytes
    op: str  # the torch op that ran


@dataclass(frozen=True, kw_only=True, slots=True)
class CommRow:
    """Planned and issued collectives of one kind, on one axis, in one phase."""

    phase: str
    collective: str
    axis: str
    planned_count: int
    planned_bytes: int  # sum of full_bytes
    issued_count: int
    issued_bytes: int
    issued_bytes_per_device: float  # what each device sends for the issued ones (ring), for reading
    planned_scalars: int = 0  # of the counts above: collectives of one element (<= SCALAR_BYTES)
    issued_scalars: int = 0
    scalar_bytes: tuple[int, int] = (0, 0)  # (planned, issued) bytes of those

    @property
    def matches(self) -> bool:
        return self.planned_count == self.issued_count and self.planned_bytes == self.issued_bytes

    @property
    def matches_beyond_scalars(self) -> bool:
        """Equal once one-element collectives are set aside (see the module docstring)."""
        return (
            self.planned_count - self.planned_scalars == self.issued_count - self.issued_scalars
            and self.planned_bytes - self.scalar_bytes[0] == self.issued_bytes - self.scalar_bytes[1]
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CommReport:
    """The collectives of one training step: planned vs issued, per phase, kind and axis."""

    rows: tuple[CommRow, ...]
    issued: tuple[IssuedCollective, ...]
    loss: float

    @property
    def matches(self) -> bool:
        return all(r.matches for r in self.rows)

    @property
    def matches_beyond_scalars(self) -> bool:
        return all(r.matches_beyond_scalars for r in self.rows)

    @property
    def unplanned_scalars(self) -> int:
        """Issued one-element collectives beyond the planned ones (DTensor's loss internals)."""
        return sum(max(0, r.issued_scalars - r.planned_scalars) for r in self.rows)

    def totals(self, phase: str | None = None) -> tuple[int, int]:
        """(planned, issued) full bytes, over all phases or one."""
        rows = [r for r in self.rows if phase is None or r.phase == phase]
        return sum(r.planned_bytes for r in rows), sum(r.issued_bytes for r in rows)

    def table(self) -> str:
        body = [
            (
                r.phase, r.collective, r.axis, r.planned_count, format_count(r.planned_bytes, unit="B"),
                r.issued_count, format_count(r.issued_bytes, unit="B"),
                format_count(r.issued_bytes_per_device, unit="B"), f"{r.planned_scalars}/{r.issued_scalars}",
                "yes" if r.matches else ("scalars only" if r.matches_beyond_scalars else "NO"),
            )
            for r in self.rows
        ]
        header = ("phase", "collective", "axis", "planned", "planned bytes", "issued", "issued bytes",
                  "sent/device", "scalars p/i", "match")
        return format_table(header, body, title="collectives per training step (bytes: full buffer)")

    def __str__(self) -> str:
        return self.table()


class _RecordingCommMode(TorchDispatchMode):
    """Records every collective op with its size, axis and the phase set by the caller."""

    def __init__(self, group_axes: dict[str, str], axis_sizes: dict[str, int]) -> None:
        super().__init__()
        self.phase = "forward"
        self.records: list[IssuedCollective] = []
        self._group_axes = group_axes
        self._axis_sizes = axis_sizes

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run first and desugar into the collectives recorded below
        out = func(*args, **(kwargs or {}))
        if isinstance(func, torch._ops.HigherOrderOperator):
            return out
        name = func._overloadpacket.__name__
        if name in _KINDS and args and isinstance(args[0], torch.Tensor):
            self.records.append(self._record(name, args, kwargs or {}))
        return out

    def _record(self, name: str, args: Sequence[Any], kwargs: dict) -> IssuedCollective:
        kind, rule = _KINDS[name]
        names = (_group_name(a) for a in (*args[1:], *kwargs.values()))
        group = next((g for g in names if g in self._group_axes), None)
        axis = self._group_axes.get(group, "?") if group is not None else "?"
        x = args[1] if name in _OUTPUT_FIRST else args[0]
        nbytes = x.numel() * x.element_size()
        if rule == "input_x_group":
            nbytes *= self._axis_sizes.get(axis, 1)
        return IssuedCollective(phase=self.phase, collective=kind, axis=axis, full_bytes=int(nbytes), op=name)


def _group_name(arg: Any) -> str | None:
    """The process group an op argument names: functional collectives pass its name, c10d's ops the
    group itself (boxed as a ScriptObject)."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, torch.ScriptObject):
        try:
            return ProcessGroup.unbox(arg).group_name
        except RuntimeError:  # another script object
            return None
    return None


def measure_comm(compiled: CompiledModel, *inputs: Any) -> CommReport:
    """Run one training step of `compiled` on `inputs` and compare its collectives with the plan's."""
    mesh = compiled.mesh
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    group_axes = {mesh.get_group(axis).group_name: axis for axis in names}
    axis_sizes = {axis: mesh.size(i) for i, axis in enumerate(names)}
    mode = _RecordingCommMode(group_axes, axis_sizes)
    optimizer = compiled.builtin_optimizer()
    optimizer.zero_grad(set_to_none=True)
    with mode:
        loss = compiled._step(inputs, phase=mode.in_phase)
        with mode.in_phase("optimizer"):
            optimizer.step()
    issued: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # count, bytes, scalars
    sent: dict[tuple[str, str, str], float] = defaultdict(float)
    for r in mode.records:
        key = (r.phase, r.collective, r.axis)
        scalar = r.full_bytes <= SCALAR_BYTES
        issued[key][0] += 1
        issued[key][1] += r.full_bytes
        issued[key][2] += scalar
        issued[key][3] += r.full_bytes if scalar else 0
        if r.collective in {c.value for c in Collective}:
            n = axis_sizes.get(r.axis, 1)
            buffer = r.full_bytes // n if r.collective == "all_to_all" else r.full_bytes  # its per-device buffer
            sent[key] += collective_bytes_per_device(Collective(r.collective), buffer, n)
    planned: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    expected = compiled.plan.collectives
    if compiled.fsdp:  # ZeRO: the parameters' dp traffic is FSDP's
        expected = zero_collectives(compiled.plan, compiled.ir, compiled.fsdp)
    name_of = {id(p): n for n, p in compiled._params.items()}
    settled = [name_of[id(p)] for p in compiled._grad_sync.params]  # the runtime's own, in its order
    expected = bucketed_gradients(expected, compiled.ir, settled, axis_sizes)
    for c in expected:
        key = (c.phase, c.collective, c.axis)
        scalar = c.full_bytes <= SCALAR_BYTES
        planned[key][0] += 1
        planned[key][1] += int(c.full_bytes)
        planned[key][2] += scalar
        planned[key][3] += int(c.full_bytes) if scalar else 0
    order = {p: i for i, p in enumerate(PHASES)}
    zero = [0, 0, 0, 0]
    keys = sorted(set(planned) | set(issued), key=lambda k: (order.get(k[0], 9), k[1], k[2]))
    rows = tuple(
        CommRow(
            phase=k[0], collective=k[1], axis=k[2],
            planned_count=planned.get(k, zero)[0], planned_bytes=planned.get(k, zero)[1],
            issued_count=issued.get(k, zero)[0], issued_bytes=issued.get(k, zero)[1],
            issued_bytes_per_device=sent.get(k, 0.0),
            planned_scalars=planned.get(k, zero)[2], issued_scalars=issued.get(k, zero)[2],
            scalar_bytes=(planned.get(k, zero)[3], issued.get(k, zero)[3]),
        )
        for k in keys
    )
    return CommReport(rows=rows, issued=tuple(mode.records), loss=loss)


def bucketed_gradients(
    collectives: Sequence[PlannedCollective], ir: GraphIR, order: Sequence[str], axes: Mapping[str, int]
) -> list[PlannedCollective]:
    """`collectives` with the parameters' gradient all-reduces as runtime/grad_sync.py issues them after
    backward: one per parameter and axis (a parameter read twice, GPT's tied wte and lm_head, is priced
    once per use, but autograd sums its uses and it is reduced once), in buckets of gradients that need
    the same axes and dtype, filled in the reverse of `order`: the parameters the runtime settles, in
    its order. FSDP2 reduces the gradients of the parameters it manages itself, one by one."""
    node_param = {n: info.name for info in ir.params for n in info.nodes}
    dtypes = {info.name: info.meta.dtype for info in ir.params}
    needs: dict[str, dict[str, int]] = {}  # parameter -> axis -> bytes of its gradient there
    out = []
    settled = set(order)
    for c in collectives:
        canonical = node_param.get(c.src)
        if c.phase == "backward" and c.collective == "all_reduce" and canonical in settled:
            needs.setdefault(canonical, {})[c.axis] = int(c.full_bytes)
        else:
            out.append(c)
    groups: dict[tuple[object, ...], list[int]] = {}
    for name in reversed(order):
        if name in needs:
            on = tuple(a for a in axes if a in needs[name])
            groups.setdefault((on, dtypes[name]), []).append(max(needs[name].values()))
    position = {a: i for i, a in enumerate(axes)}
    for (on, _dtype), nbytes in groups.items():
        start = 0
        for count in bucket_sizes(nbytes):
            total = sum(nbytes[start:start + count])
            start += count
            out += [
                PlannedCollective(
                    src="gradient bucket", dst="", phase="backward", axis=axis, collective="all_reduce",
                    full_bytes=total, seconds=0.0,
                    bytes_per_device=collective_bytes_per_device(Collective.ALL_REDUCE, total, axes[axis]),
                )
                for axis in sorted(on, key=position.__getitem__)
            ]
    return out
