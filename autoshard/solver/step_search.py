"""The outer search: dp x tp x pp, micro-batch size, schedule, ZeRO stage and recomputation, jointly.

1. For each tensor-parallel degree (inside one node) and micro-batch size, the model is captured at that
   micro-batch (`GraphIR.recapture`) and the ILP shards its operators for one replica on the tp mesh.
   There are few such pairs (a 175B model: 4 x 4), each a fraction of a second once captured.
2. Each replica plan becomes a chain of prologue, blocks and epilogue (training.chain_of), and every
   completion -- pp stages cut by training.split_blocks, dp = devices / (tp pp), micro-batches, schedule,
   ZeRO stage, recomputation -- is priced in closed form (training.estimate_step): thousands per second.
3. The fastest configuration that fits the memory of every device wins. Its operator plan is solved once
   more on the operator mesh dp x tp at one micro-batch of all replicas (batch `micro_batch_size * dp`),
   parameters replicated over dp (or sharded there for ZeRO-3), so the code generator gets a placement
   for every tensor on every axis. Each node keeps the tp placements of the replica plan that was priced
   (solver/axis_choices.py), so the ILP decides the dp axis only. The runners-up, with their time,
   memory and the reason each lost, are `plan.alternatives`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch.distributed.tensor import Placement, Replicate

from autoshard.cost_model import Cluster
from autoshard.errors import CaptureError, InputError
from autoshard.hints import block_hints, hints_in_graph
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import RECOMPUTE, Plan, Prediction, Training
from autoshard.report.table import format_count
from autoshard.solver.axis_choices import AxisChoices
from autoshard.solver.blocks import repeated_blocks
from autoshard.solver.planner import plan_on_mesh
from autoshard.solver.problem import NoFeasiblePlan
from autoshard.solver.training import Chain, StepEstimate, chain_of, estimate_step, split_blocks
from autoshard.strategies import MeshSpec

__all__ = ["Config", "check_dp_divides_batch", "search_step"]

log = logging.getLogger(__name__)

MICRO_BATCH_SIZES = (1, 2, 4, 8)  # per replica; a small whole replica batch is tried as well
INTERLEAVED_CHUNKS = 2  # stages per pp rank in the interleaved schedule


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """One way to run a training step."""

    dp: int
    tp: int
    pp: int
    micro_batch_size: int
    num_micro_batches: int
    schedule: str
    virtual_stages: int
    zero_stage: int
    recompute: str

    def describe(self) -> str:
        parts = [f"dp{self.dp} tp{self.tp} pp{self.pp}", f"mbs {self.micro_batch_size} x {self.num_micro_batches}"]
        if self.pp > 1:
            parts.append(self.schedule + (f"(v={self.virtual_stages})" if self.virtual_stages > 1 else ""))
        parts += [f"zero{self.zero_stage}", f"recompute {self.recompute}"]
        return ", ".join(parts)


@dataclass(frozen=True, kw_only=True, slots=True)
class Fixed:
    """What the user pinned; None leaves it to the search."""

    mesh: Mapping[str, int] | None = None
    zero_stage: int | None = None
    recompute: str | None = None
    schedule: str | None = None
    micro_batch_size: int | None = None


class _Progress:
    def __init__(self, sink: bool | Callable[[str], None]) -> None:
        self.sink = sink
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        text = f"[autoshard {time.perf_counter() - self.start:6.1f}s] {message}"
        log.info(text)
        if callable(self.sink):
            self.sink(text)
        elif self.sink:
            print(text, file=sys.stderr, flush=True)


def search_step(
    ir: GraphIR,
    cluster: Cluster,
    *,
    optimizer: str,
    memory_limit: float | None,
    precision: str,
    fixed: Fixed,
    param_placements: Mapping[str, Sequence[Placement]] | None = None,
    time_limit_s: float | None = None,
    progress: bool | Callable[[str], None] = False,
) -> Plan:
    """The fastest configuration of the whole step that fits (see the module docstring)."""
    say = _Progress(progress)
    if ir.batch_size is None or ir.recapture is None:
        raise InputError(
            "the outer search needs the batch size: every tensor input must share dim 0 (the batch), "
            f"found inputs of {ir.model_type} that do not; pass inputs batched along dim 0"
        )
    limit = float(memory_limit if memory_limit is not None else cluster.hardware.hbm_bytes)
    blocks = repeated_blocks(ir)
    pinned_stages, pinned_modes = block_hints(ir.step_hints, blocks)
    chains = _Chains(ir, cluster, optimizer, precision, param_placements, time_limit_s, say)
    evaluated: list[tuple[Config, StepEstimate]] = []
    skipped: list[tuple[str, str]] = []
    splits: dict[tuple[object, ...], tuple[int, ...]] = {}
    check_dp_divides_batch(ir.batch_size, fixed.mesh)
    meshes = _meshes(cluster, len(blocks), fixed.mesh, ir.batch_size)
    if pinned_stages is not None:
        meshes = [(dp, tp, pp) for dp, tp, pp in meshes if pp == len(pinned_stages)]
        if not meshes:
            raise InputError(
                f"the pipeline_stage hints make {len(pinned_stages)} stages {pinned_stages}, which no mesh "
                f"considered has as pp (mesh {dict(fixed.mesh) if fixed.mesh else 'searched'}, {cluster}); "
                "change the hints or the mesh"
            )
    batch_norms = ir.train_batch_norms()
    if batch_norms:  # their statistics are the batch's: one micro-batch per step, no pipeline
        refuse_micro_batches(batch_norms, fixed.mesh.get("pp", 1) if fixed.mesh else 1, 1)
        meshes = [(dp, tp, pp) for dp, tp, pp in meshes if pp == 1]
        skipped.append(("pp > 1, several micro-batches", f"train-mode BatchNorm ({batch_norms[0]}, ...) needs the whole batch"))
    reduction = ir.loss.reduction if ir.loss is not None else None
    whole = bool(batch_norms) or (reduction is not None and reduction.splits is not None)
    if reduction is not None and (reduction.splits or reduction.dp_split):  # a loss a split would change
        if fixed.mesh is not None:
            pinned = fixed.micro_batch_size
            m = ir.batch_size // fixed.mesh.get("dp", 1) // pinned if pinned else 1
            reduction.check_split(dp=fixed.mesh.get("dp", 1), pp=fixed.mesh.get("pp", 1), micro_batches=m)
        if reduction.splits:
            meshes = [(dp, tp, pp) for dp, tp, pp in meshes if pp == 1]
            skipped.append(("pp > 1, several micro-batches", f"the loss is {reduction.found}: {reduction.splits}"))
        if reduction.dp_split:
            meshes = [(dp, tp, pp) for dp, tp, pp in meshes if dp == 1]
            skipped.append(("dp > 1", f"the loss is {reduction.found}: {reduction.dp_split}"))
        if not meshes:
            raise InputError(
                f"the loss is {reduction.found}, which no split of its batch over {cluster} keeps exact "
                f"({reduction.dp_split or reduction.splits}); declare loss_reduction='mean' or 'sum' to "
                "autoshard.plan/compile, or write the loss as one mean or sum reduction"
            )
    expect = getattr(ir.recapture, "expect", None)
    if expect is not None:  # the sizes the replica plans will be captured at (capture/resize.py)
        expect({mbs for dp, _, pp in meshes for mbs in _micro_batch_sizes(ir.batch_size // dp, pp, fixed.micro_batch_size)})
    for dp, tp, pp in meshes:
        replica = ir.batch_size // dp
        for mbs in _micro_batch_sizes(replica, pp, fixed.micro_batch_size):
            m = replica // mbs
            if whole and m > 1:
                continue
            try:
                chain = chains.get(tp, mbs)
            except (NoFeasiblePlan, InputError, CaptureError) as exc:
                where, reason = f"tp{tp} mbs{mbs}", str(exc).splitlines()[0]
                if (where, reason) not in skipped:
                    skipped.append((where, reason))
                    log.warning("skipping micro-batch size %d (tp=%d): %s", mbs, tp, reason)
                continue
            for schedule, v in _schedules(pp, m, len(blocks), fixed.schedule):
                if pinned_stages is not None and v > 1:
                    continue  # stage hints name one stage per pp rank
                for mode in _recompute_modes(blocks, fixed.recompute):
                    modes = _modes(mode, pinned_modes)
                    key = (tp, mbs, pp * v, mode)
                    if pp > 1 and key not in splits:
                        splits[key] = pinned_stages or split_blocks(chain, pp * v, modes)
                    for zero in _zero_stages(dp, fixed.zero_stage):
                        config = Config(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs, num_micro_batches=m,
                                        schedule=schedule, virtual_stages=v, zero_stage=zero, recompute=mode)
                        estimate = estimate_step(
                            chain, cluster, dp=dp, tp=tp, pp=pp, micro_batches=m, schedule=schedule,
                            virtual_stages=v, zero_stage=zero, recompute=modes,
                            stages=splits.get(key) if pp > 1 else None,
                        )
                        evaluated.append((config, estimate))
    say(f"priced {len(evaluated):,} configurations")
    if not evaluated:
        reasons = "; ".join(f"{where}: {reason}" for where, reason in skipped) or "no mesh was considered"
        raise NoFeasiblePlan(
            f"expected at least one configuration of {ir.model_type} to price on {cluster}, found none: "
            f"every (tp, micro-batch size) failed: {reasons}. Fix what the reasons name (a model that cannot "
            "run a small micro-batch, e.g. train-mode BatchNorm on 1x1 maps, needs a larger batch), or pin "
            "micro_batch_size to a size it runs",
            minimum_memory=math.inf,
            memory_limit=limit,
        )
    fits = sorted(((c, e) for c, e in evaluated if e.peak_memory_bytes <= limit), key=_preference)
    if not fits:
        smallest = min((e.peak_memory_bytes for _, e in evaluated), default=math.inf)
        raise NoFeasiblePlan(
            f"no configuration of {ir.model_type} fits in {format_count(limit, unit='B')} per device on "
            f"{cluster} ({len(evaluated):,} tried: dp x tp x pp, micro-batches, schedules, ZeRO 0-3, "
            f"recomputation); the smallest memory per device that would fit is "
            f"{format_count(smallest, unit='B')}. Use more devices or devices with more memory.",
            minimum_memory=smallest,
            memory_limit=limit,
        )
    for best, estimate in fits:
        say(f"best: {best.describe()}: {estimate.step_time_s:.3g} s per step; solving its operator plan on dp x tp")
        try:
            plan = _final_plan(ir, cluster, best, estimate, chains, optimizer, precision, limit, blocks,
                               time_limit_s, _modes(best.recompute, pinned_modes))
            break
        except CaptureError as exc:  # the batch of one micro-batch of all replicas cannot be captured
            skipped.append((best.describe(), str(exc).splitlines()[0]))
            log.warning("skipping %s: %s", best.describe(), skipped[-1][1])
    else:
        raise NoFeasiblePlan(
            f"expected one of the {len(fits):,} configurations that fit to capture at its micro-batch of all "
            f"replicas, found none could: {'; '.join(f'{w}: {r}' for w, r in skipped)}",
            minimum_memory=math.inf,
            memory_limit=limit,
        )
    alternatives = _alternatives(best, estimate, evaluated, limit) + [
        {"config": where, "reason": reason} for where, reason in skipped
    ]
    say("done")
    return dataclasses.replace(plan, alternatives=tuple(alternatives))


def _preference(ce: tuple[Config, StepEstimate]) -> tuple[float, ...]:
    """Fastest first; among configurations predicted equally fast (ZeRO-3's bf16 gathers move the bytes
    of an fp32 all-reduce, say), the simpler one -- lower ZeRO stage, less recomputation, fewer stages --
    then the leaner."""
    c, e = ce
    return (float(f"{e.step_time_s:.9g}"), c.zero_stage, RECOMPUTE.index(c.recompute), c.pp, e.peak_memory_bytes)


# ---- the search space --------------------------------------------------------------------------------


def check_dp_divides_batch(batch: int, mesh: Mapping[str, int] | None) -> None:
    """Refuse a pinned dp that does not divide the planning batch: each replica needs whole sequences."""
    dp = mesh.get("dp", 1) if mesh is not None else 1
    if batch % dp:
        raise InputError(
            f"mesh {dict(mesh or {})} pins dp={dp}, which does not divide the example batch of {batch} "
            f"sequences; expected a dp among {_divisors(batch)}, or an example batch that is a multiple of {dp}"
        )


def _meshes(
    cluster: Cluster, n_blocks: int, mesh: Mapping[str, int] | None, batch: int
) -> list[tuple[int, int, int]]:
    """(dp, tp, pp): tp divides a node's devices; pp at most the block count; dp the rest, and a divisor
    of the batch (a replica runs whole sequences; a smaller batch leaves devices to tp and pp)."""
    if mesh is not None:
        return [(mesh.get("dp", 1), mesh.get("tp", 1), mesh.get("pp", 1))]
    n = cluster.num_devices
    per_node = min(cluster.devices_per_node, n)
    out = []
    for tp in _divisors(per_node):
        if n % tp:
            continue
        for pp in _divisors(n // tp):
            if pp > max(1, n_blocks) or batch % (n // (tp * pp)):
                continue
            out.append((n // (tp * pp), tp, pp))
    return out


def refuse_micro_batches(batch_norms: Sequence[str], pp: int, m: int) -> None:
    """Refuse a step of `pp` stages and `m` micro-batches that would split a train-mode BatchNorm's batch."""
    if pp > 1 or m > 1:
        raise InputError(
            f"the model has {len(batch_norms)} train-mode BatchNorm(s) ({', '.join(batch_norms[:3])}, ...), which "
            f"normalise by the statistics of the batch they see; {'pipeline stages' if pp > 1 else f'{m} micro-batches'} "
            "would give each micro-batch its own statistics, not the single device's. Plan without pp and with one "
            "micro-batch per step (data and tensor parallelism are exact), or put the model in eval mode / use "
            "GroupNorm or LayerNorm"
        )


def _micro_batch_sizes(replica: int, pp: int, fixed: int | None) -> list[int]:
    if fixed is not None:
        if replica % fixed:
            return []
        return [fixed]
    sizes = {s for s in MICRO_BATCH_SIZES if replica % s == 0}
    if pp == 1 and replica <= max(MICRO_BATCH_SIZES):
        sizes.add(replica)  # no pipeline: one micro-batch (each size costs a capture: kept few)
    return sorted(sizes)


def _schedules(pp: int, m: int, n_blocks: int, fixed: str | None) -> list[tuple[str, int]]:
    if pp == 1:
        return [("none", 1)] if fixed in (None, "none") else []
    options = [("gpipe", 1), ("1f1b", 1)]
    if n_blocks >= INTERLEAVED_CHUNKS * pp and m % pp == 0:  # torch's interleaved schedule needs m % pp == 0
        options.append(("interleaved-1f1b", INTERLEAVED_CHUNKS))
    return [(s, v) for s, v in options if fixed in (None, s)]


def _zero_stages(dp: int, fixed: int | None) -> list[int]:
    if fixed is not None:
        return [fixed]
    return [0, 1, 2, 3] if dp > 1 else [0]


def _recompute_modes(blocks: Sequence[str], fixed: str | None) -> list[str]:
    if fixed is not None:
        return [fixed]
    return list(RECOMPUTE) if blocks else ["none"]


def _modes(free: str, pinned: Sequence[str | None]) -> tuple[str, ...]:
    """Recompute mode per block: the hinted ones, and `free` for the rest."""
    return tuple(p or free for p in pinned)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- replica plans ------------------------------------------------------------------------------------


class _Chains:
    """Replica operator plans, one per (tp, micro-batch size), captured and solved on first use."""

    def __init__(self, ir, cluster, optimizer, precision, param_placements, time_limit_s, say) -> None:
        self.ir, self.cluster, self.optimizer, self.precision = ir, cluster, optimizer, precision
        self.param_placements, self.time_limit_s, self.say = param_placements, time_limit_s, say
        self.graphs: dict[int, GraphIR] = {ir.batch_size: ir}
        self.capture_failures: dict[int, CaptureError] = {}
        self.plans: dict[tuple[int, int], Plan] = {}
        self.chains: dict[tuple[int, int], Chain] = {}

    def graph(self, batch: int) -> GraphIR:
        if batch in self.capture_failures:
            raise self.capture_failures[batch]
        if batch not in self.graphs:
            t = time.perf_counter()
            try:
                self.graphs[batch] = self.ir.recapture(batch)
            except CaptureError as exc:
                # remembered: a size the model cannot run (train-mode BatchNorm on one 1x1 sample) is
                # skipped by the search, not retried for every dp
                self.capture_failures[batch] = CaptureError(
                    f"the model cannot be captured at batch {batch}: {str(exc).splitlines()[0]}"
                )
                raise self.capture_failures[batch] from exc
            how = getattr(self.ir.recapture, "how", "")
            self.say(f"captured {self.ir.model_type} at batch {batch} ({how + ', ' if how else ''}{time.perf_counter() - t:.1f} s)")
        return self.graphs[batch]

    def get(self, tp: int, mbs: int) -> Chain:
        key = (tp, mbs)
        if key not in self.chains:
            graph = self.graph(mbs)
            plan = plan_on_mesh(
                graph,
                _sub_cluster(self.cluster, tp),
                MeshSpec.of({"tp": tp} if tp > 1 else {"dp": 1}),
                optimizer=self.optimizer,
                memory_limit=math.inf,
                param_placements=_project(self.param_placements, ("tp",)),
                hints=hints_in_graph(graph.exported) if graph.exported is not None else {},
                time_limit_s=self.time_limit_s,
                precision=self.precision,
            )
            self.plans[key] = plan
            self.chains[key] = chain_of(plan, graph)
            self.say(f"solved the operator plan of one replica for tp={tp}, micro-batch {mbs} "
                     f"({plan.solver.total_seconds:.2f} s)")
        return self.chains[key]


def _sub_cluster(cluster: Cluster, devices: int) -> Cluster:
    """`devices` consecutive devices of `cluster` (whole nodes, or part of one)."""
    per_node = min(cluster.devices_per_node, devices)
    return dataclasses.replace(cluster, nodes=max(1, devices // per_node), devices_per_node=per_node)


def _project(placements: Mapping[str, Sequence[Placement]] | None, axes: Sequence[str]) -> dict | None:
    """A manual strategy given on the mesh's trailing axes (pp, dp, tp: one entry per axis, ending in tp's)
    restricted to `axes`, each entry taken from the axis of its name; an axis it does not name is
    Replicate."""
    if not placements:
        return None
    out = {}
    for pattern, spec in placements.items():
        named = dict(zip(("pp", "dp", "tp")[-len(spec):], spec, strict=True)) if spec else {}
        out[pattern] = tuple(named.get(axis, Replicate()) for axis in axes)
    return out


# ---- the winner ----------------------------------------------------------------------------------------


def _final_plan(
    ir: GraphIR,
    cluster: Cluster,
    best: Config,
    estimate: StepEstimate,
    chains: _Chains,
    optimizer: str,
    precision: str,
    limit: float,
    blocks: tuple[str, ...],
    time_limit_s: float | None,
    modes: tuple[str, ...],
) -> Plan:
    operator_axes = {k: v for k, v in (("dp", best.dp), ("tp", best.tp)) if v > 1} or {"dp": 1}
    if best.dp == 1:
        operator = chains.plans[(best.tp, best.micro_batch_size)]
    else:
        graph = chains.graph(best.micro_batch_size * best.dp)
        operator = plan_on_mesh(
            graph,
            _sub_cluster(cluster, best.dp * best.tp),
            MeshSpec.of(operator_axes),
            optimizer=optimizer,
            memory_limit=math.inf,
            param_placements=_project(chains.param_placements, tuple(operator_axes)),
            hints=hints_in_graph(graph.exported) if graph.exported is not None else {},
            time_limit_s=time_limit_s,
            precision=precision,
            dp_params="shard" if best.zero_stage == 3 else "replicate",
            keep=AxisChoices.of(chains.plans[(best.tp, best.micro_batch_size)], "tp") if best.tp > 1 else None,
        )
    mesh = ({"pp": best.pp} if best.pp > 1 else {}) | operator_axes
    training = Training(
        pp=best.pp,
        blocks=blocks,
        stages=estimate.stages if best.pp > 1 else (),
        schedule=best.schedule,
        virtual_stages=best.virtual_stages,
        micro_batch_size=best.micro_batch_size,
        num_micro_batches=best.num_micro_batches,
        zero_stage=best.zero_stage,
        recompute=modes,
        precision=precision,
    )
    return dataclasses.replace(
        operator,
        cluster=str(cluster),
        mesh=mesh,
        memory_limit_bytes=limit,
        training=training,
        predicted=_prediction(estimate, operator.predicted),
    )


def _prediction(e: StepEstimate, operator: Prediction) -> Prediction:
    peak = max(e.memory, key=lambda m: m.total)
    return Prediction(
        step_time_s=e.step_time_s,
        compute_s=operator.compute_s,  # one micro-batch through the operator plan (the report's node times)
        comm_s=operator.comm_s,
        comm_bytes=operator.comm_bytes,
        parameters_bytes=peak.parameters,
        gradients_bytes=peak.gradients,
        optimizer_bytes=peak.optimizer_state,
        activations_bytes=peak.activations,
        hardware_flops=e.hardware_flops,
        model_flops=e.model_flops,
        tokens=e.tokens,
        bubble_fraction=e.bubble_fraction,
        pipeline_s=e.pipeline_s,
        sync_s=e.sync_s,
        optimizer_s=e.optimizer_s,
        stage_memory=tuple(
            {"parameters": m.parameters, "gradients": m.gradients, "optimizer_state": m.optimizer_state,
             "activations": m.activations}
            for m in e.memory
        ),
    )


def _alternatives(
    best: Config, best_estimate: StepEstimate, evaluated: list[tuple[Config, StepEstimate]], limit: float
) -> list[dict[str, Any]]:
    """The fastest configuration of every other (dp, tp, pp), then the best few that differ from the
    winner in one other decision, each with why it lost."""
    def row(c: Config, e: StepEstimate) -> dict[str, Any]:
        if e.peak_memory_bytes > limit:
            reason = f"does not fit: needs {format_count(e.peak_memory_bytes, unit='B')} per device"
        else:
            slower = e.step_time_s / best_estimate.step_time_s - 1
            reason = f"{slower:.1%} slower than {best.describe()}"
        return {
            "config": c.describe(),
            "mesh": {"pp": c.pp, "dp": c.dp, "tp": c.tp},
            "step_time_s": e.step_time_s,
            "peak_memory_bytes": e.peak_memory_bytes,
            "reason": reason,
        }

    def rank(ce: tuple[Config, StepEstimate]) -> tuple[bool, float]:
        return (ce[1].peak_memory_bytes > limit, ce[1].step_time_s)

    by_mesh: dict[tuple[int, int, int], tuple[Config, StepEstimate]] = {}
    for ce in sorted(evaluated, key=rank):
        by_mesh.setdefault((ce[0].dp, ce[0].tp, ce[0].pp), ce)
    rows = [row(*ce) for key, ce in by_mesh.items() if key != (best.dp, best.tp, best.pp)]
    same_mesh = [ce for ce in sorted(evaluated, key=rank)
                 if (ce[0].dp, ce[0].tp, ce[0].pp) == (best.dp, best.tp, best.pp) and ce[0] != best]
    for field in ("micro_batch_size", "schedule", "zero_stage", "recompute"):
        for ce in same_mesh:
            differs = [f for f in ("micro_batch_size", "schedule", "zero_stage", "recompute")
                       if getattr(ce[0], f) != getattr(best, f)]
            if differs == [field]:
                rows.append(row(*ce))
                break
    return rows

