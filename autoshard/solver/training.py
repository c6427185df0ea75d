"""Price a whole training step: pipeline stages, micro-batches, schedule, ZeRO stage and recomputation.

The ILP (planner.plan_on_mesh) shards operators for ONE data-parallel replica and ONE micro-batch on the
tensor-parallel mesh. This module reads that plan as a chain of units -- what precedes the repeated blocks
(embeddings), each block, what follows them (head, loss) -- and prices every way to run the chain:

- Pipeline (Narayanan et al. 2021, section 2.2): stages are contiguous runs of blocks; stage 0 also runs the
  prologue, the last stage the epilogue. A step of `m` micro-batches takes `(m + (pp - 1) / v) * T`, `T` the
  slowest pp rank's time per micro-batch (its stages' compute, collectives and point-to-point sends) and `v`
  the stages per rank (interleaved 1F1B; 1 otherwise). The idle share `((pp - 1) / v) / (m + (pp - 1) / v)`
  is the bubble.
- Activations in flight on pp rank r: GPipe all `m` micro-batches; 1F1B `min(m, pp - r)`; interleaved 1F1B
  `2 (pp - r - 1) + (v - 1) pp + 1` chunk passes of 1/v of the rank's activations each (Megatron-LM's
  warm-up count plus the one in flight), at most `m v`.
- ZeRO over dp (Rajbhandari et al. 2020), as the runtime runs it with FSDP2 (runtime/fsdp.py): stage 1
  shards optimizer state, 2 also gradients, 3 also parameters. Communication per step: stages 0 and 1 one
  all-reduce of the gradients (stage 1 as one all-gather of the parameters plus one reduce-scatter of the
  gradients: the same bytes); 2 a reduce-scatter per micro-batch (gradients accumulate sharded) and one
  all-gather; 3 per micro-batch an all-gather of the parameters in forward and again in backward (fp32:
  FSDP gathers the master shards, autocast casts after) and a reduce-scatter of their gradients.
  Under pipelining torch's schedule drives FSDP itself: no gradient sync and no resharding after any
  micro-batch's backward but the last. So with pp > 1 gradients accumulate unsharded (stage 2 holds and
  sends what stage 1 does), the reduce-scatter runs once per step, and stage 3 keeps a stage's
  parameters gathered from its first backward on (it saves no peak memory, and still gathers in every
  forward and backward). These dp collectives run
  bucketed under compute, as DDP, FSDP and Megatron-LM's distributed optimizer do (Li et al. 2020): the
  gradient reduction under the last micro-batch's backward, ZeRO-3's gathers and reduce-scatter under
  their micro-batch's forward and backward; only what exceeds that compute is counted. Nothing else
  overlaps (tensor-parallel collectives and point-to-point sends sit on the critical path).
- Recomputation per block: "full" keeps only the block's input and runs its forward again in backward
  (collectives included); "selective" drops the outputs of the FLOP-free ops (norms, activations, softmax,
  elementwise: cheap to redo, large to keep) and keeps every output of a matmul-class op (the policy
  passes/recompute.py runs) plus the block's input (the checkpoint reruns the cheap ops from it). A recomputed block's activations live again, one block
  at a time, during its backward. tests/test_recompute_memory.py checks these against the bytes autograd
  really keeps.
- Parameter-gradient reductions and the optimizer step happen once per step; everything else per micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch.distributed.tensor import Partial

from autoshard.cost_model import (
    Cluster,
    Collective,
    Link,
    MemoryBreakdown,
    collective_time,
    optimizer_state_bytes_per_param,
    training_memory,
)
from autoshard.ir.graph import GraphIR, NodeKind
from autoshard.ir.plan import Plan
from autoshard.strategies.fused_split import is_sharded
from autoshard.strategies.mesh import spec_from_str

__all__ = ["Chain", "StepEstimate", "Unit", "chain_of", "estimate_step", "split_blocks"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Unit:
    """One link of the chain: per device and per micro-batch unless it says otherwise."""

    name: str
    compute_s: float = 0.0  # forward + backward compute
    forward_s: float = 0.0  # forward compute alone (paid again by full recomputation)
    comm_s: float = 0.0  # activation collectives, forward + backward
    forward_comm_s: float = 0.0  # forward collectives (paid again by full recomputation)
    flops: float = 0.0  # forward FLOPs of the whole unit, all devices of the replica together
    activation_bytes: float = 0.0  # kept for backward
    matmul_output_bytes: float = 0.0  # outputs of matmul-class ops, all kept by selective recomputation
    cheap_forward_s: float = 0.0  # forward time of the FLOP-free ops (paid again by selective)
    input_bytes: float = 0.0  # what enters from earlier units (kept by full recomputation)
    output_bytes: float = 0.0  # what leaves for later units (sent to the next stage at a cut)
    param_elements: float = 0.0  # local elements of the parameters it owns
    sync_s: float = 0.0  # per step: its parameters' gradient reductions on the operator mesh
    optimizer_s: float = 0.0  # per step: the optimizer update of its parameters

    def activations(self, recompute: str) -> float:
        """Bytes kept per micro-batch between its forward and its backward."""
        if recompute == "full":
            return self.input_bytes  # what the checkpoint keeps to run the block again
        if recompute == "selective":  # every matmul-class output, and the input the cheap ops rerun from
            return self.matmul_output_bytes + self.input_bytes
        return self.activation_bytes

    def seconds(self, recompute: str) -> float:
        """Forward and backward of one micro-batch, recomputation included."""
        extra = {"full": self.forward_s + self.forward_comm_s, "selective": self.cheap_forward_s}.get(recompute, 0.0)
        return self.compute_s + self.comm_s + extra


@dataclass(frozen=True, kw_only=True, slots=True)
class Chain:
    """A replica's operator plan as prologue, blocks and epilogue."""

    pre: Unit
    blocks: tuple[Unit, ...]
    post: Unit
    shared_params: float  # local elements used both before and after the blocks (tied embeddings)
    param_bytes: int  # bytes per parameter element as stored (fp32 master weights)
    tokens: int  # tokens in one micro-batch of one replica
    precision: str
    optimizer: str

    @property
    def flops(self) -> float:
        """Forward FLOPs of one micro-batch through the whole model."""
        return self.pre.flops + self.post.flops + sum(b.flops for b in self.blocks)


def chain_of(plan: Plan, ir: GraphIR) -> Chain:
    """Cut `plan` (one replica, one micro-batch, captured as `ir`) into prologue, blocks and epilogue."""
    blocks = plan.training.blocks
    index = {b: i for i, b in enumerate(blocks)}
    last = len(blocks) + 1  # units: 0 prologue, 1 + i block i, last epilogue

    def block_of(path: str) -> int | None:
        while path:
            if path in index:
                return index[path]
            path = path.rpartition(".")[0]
        return None

    unit_of: dict[str, int] = {}
    seen_block = False
    for node in ir.nodes:
        if node.kind is NodeKind.CALL:
            b = block_of(node.module)
            seen_block |= b is not None
            unit_of[node.name] = 1 + b if b is not None else (last if seen_block else 0)
    consumers: dict[str, list[int]] = {}
    for node in ir.nodes:
        for src in node.inputs:
            if node.name in unit_of:
                consumers.setdefault(src, []).append(unit_of[node.name])
            elif node.kind is NodeKind.OUTPUT:
                consumers.setdefault(src, []).append(last)

    acc = {f.name: [0.0] * (last + 1) for f in dataclasses.fields(Unit) if f.name != "name"}
    shards = _Shards(plan.operator_mesh)
    decisions = {d.node: d for d in plan.nodes}
    home: dict[str, int] = {}  # parameter placeholder -> the unit holding the parameter
    shared = 0.0
    param_bytes = 4
    for p in ir.params:
        users = sorted({u for node in p.nodes for u in consumers.get(node, [])})
        owner = block_of(p.name.rpartition(".")[0])
        unit = 1 + owner if owner is not None else (users[0] if users else 0)
        local = math.prod(p.meta.shape) / shards(plan.params.get(p.name))
        if owner is None and users and users[0] == 0 and users[-1] == last:
            shared += local  # held again by the last stage when the pipeline splits them
        acc["param_elements"][unit] += local
        param_bytes = p.meta.dtype.itemsize
        for node in p.nodes:
            home[node] = unit
            if (d := decisions.get(node)) is not None:
                acc["optimizer_s"][unit] += d.compute_s

    for node in ir.nodes:
        u, d = unit_of.get(node.name), decisions.get(node.name)
        if u is None or d is None:
            continue
        forward_share = 1 / 3 if node.requires_grad else 1.0  # backward is priced at 2x forward
        acc["compute_s"][u] += d.compute_s
        acc["forward_s"][u] += d.compute_s * forward_share
        acc["flops"][u] += node.flops
        acc["activation_bytes"][u] += d.memory_bytes
        nbytes = sum(
            meta.nbytes / shards(spec) * _activation_scale(meta.dtype.itemsize, plan.training.precision)
            for meta, spec in zip(node.outputs, d.output)
        )
        if node.flops:
            acc["matmul_output_bytes"][u] += nbytes
        else:
            acc["cheap_forward_s"][u] += d.compute_s * forward_share
        users = [v for v in consumers.get(node.name, []) if v > u]
        if users:  # crosses every cut between its unit and its last reader
            for cut in range(u, max(users)):
                acc["output_bytes"][cut] += nbytes
                acc["input_bytes"][cut + 1] += nbytes

    for c in plan.collectives:
        if c.src in home and c.phase == "backward":  # a parameter's gradient: reduced once per step
            acc["sync_s"][home[c.src]] += c.seconds
            continue
        u = unit_of.get(c.dst, last)
        acc["comm_s"][u] += c.seconds
        if c.phase == "forward":
            acc["forward_comm_s"][u] += c.seconds

    def unit(i: int, name: str) -> Unit:
        return Unit(name=name, **{k: v[i] for k, v in acc.items()})

    inputs = [n for n in ir.nodes if n.kind is NodeKind.INPUT and n.outputs]
    return Chain(
        pre=unit(0, "prologue"),
        blocks=tuple(unit(1 + i, b) for i, b in enumerate(blocks)),
        post=unit(last, "epilogue"),
        shared_params=shared,
        param_bytes=param_bytes,
        tokens=math.prod(inputs[0].outputs[0].shape) if inputs else 0,
        precision=plan.training.precision,
        optimizer=plan.optimizer,
    )


# ---- stages ----------------------------------------------------------------------------------------


def split_blocks(chain: Chain, num_stages: int, recompute: Sequence[str]) -> tuple[int, ...]:
    """Blocks per stage, contiguous and non-empty, minimising the slowest stage's time per micro-batch.

    The prologue always runs with the first block and the epilogue with the last, so they simply weigh
    on those blocks; what remains is the classic min-max split of a sequence, solved by bisection on the
    bottleneck with a greedy fill (the fewest stages a bottleneck admits is monotone in it). The fill is
    then split further, longest run first, until there are exactly `num_stages` runs.
    """
    n = len(chain.blocks)
    if not 1 <= num_stages <= n:
        raise ValueError(f"{num_stages} stages for {n} blocks")
    weights = [b.seconds(r) for b, r in zip(chain.blocks, recompute)]
    weights[0] += chain.pre.seconds("none")
    weights[-1] += chain.post.seconds("none")

    def fill(limit: float) -> list[int]:
        runs, current = [0], 0.0
        for w in weights:
            if runs[-1] and current + w > limit:
                runs.append(0)
                current = 0.0
            current += w
            runs[-1] += 1
        return runs

    low, high = max(weights), sum(weights)
    best = fill(high)
    for _ in range(100):
        if high - low <= 1e-12 * high:
            break
        mid = (low + high) / 2
        runs = fill(mid)
        if len(runs) <= num_stages:
            best, high = runs, mid
        else:
            low = mid
    candidate = fill(high)
    if len(candidate) <= num_stages:
        best = candidate
    while len(best) < num_stages:  # splitting a run never slows the slowest stage
        i = max(range(len(best)), key=lambda k: best[k])
        half = best[i] // 2
        best[i : i + 1] = [best[i] - half, half]
    return tuple(best)


# ---- one configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class StepEstimate:
    step_time_s: float
    pipeline_s: float  # forward and backward of all micro-batches, bubble included
    sync_s: float  # gradient reductions and ZeRO collectives, once per step
    optimizer_s: float
    bubble_fraction: float
    stages: tuple[int, ...]
    memory: tuple[MemoryBreakdown, ...]  # per pp rank, one device
    hardware_flops: float  # per step, all devices, recomputation included
    model_flops: float  # per step, all devices, forward + backward only
    tokens: int  # per step

    @property
    def peak_memory_bytes(self) -> float:
        return max(m.total for m in self.memory)


def estimate_step(
    chain: Chain,
    cluster: Cluster,
    *,
    dp: int,
    tp: int,
    pp: int,
    micro_batches: int,
    schedule: str,
    virtual_stages: int = 1,
    zero_stage: int = 0,
    recompute: Sequence[str] | None = None,
    stages: Sequence[int] | None = None,
) -> StepEstimate:
    """Time and memory of one training step of `chain` run as configured (see the module docstring)."""
    n_blocks = len(chain.blocks)
    modes = tuple(recompute) if recompute else ("none",) * n_blocks
    v = virtual_stages
    m = micro_batches
    if stages is None:
        stages = split_blocks(chain, pp * v, modes) if pp > 1 else (n_blocks,)
    mesh = {"pp": pp, "dp": dp, "tp": tp}
    pp_link = cluster.axis_link(mesh, "pp")
    dp_link = cluster.axis_link(mesh, "dp")
    latency = dp_link.latency  # ZeRO-3 issues collectives per block; gradient buckets are priced by bandwidth
    dp_link = dataclasses.replace(dp_link, latency=0.0)

    # units of each pp rank: stage s runs on rank s % pp
    rank_units: list[list[tuple[Unit, str]]] = [[] for _ in range(pp)]
    rank_p2p = [0.0] * pp
    start = 0
    for s, count in enumerate(stages):
        units = [(chain.blocks[i], modes[i]) for i in range(start, start + count)]
        if s == 0:
            units.insert(0, (chain.pre, "none"))
        if s == len(stages) - 1:
            units.append((chain.post, "none"))
        else:
            rank_p2p[s % pp] += 2 * _p2p_seconds(units[-1][0].output_bytes, pp_link)  # activation, then its gradient
        rank_units[s % pp].extend(units)
        start += count

    mixed = chain.precision == "bf16-mixed"
    p_b, w_b = chain.param_bytes, (2 if mixed else 0)
    o_b = optimizer_state_bytes_per_param(chain.optimizer, _float_dtype(chain.param_bytes))
    per_mb, memory, sync, optimizer = [], [], [], []
    for r, units in enumerate(rank_units):
        per_mb.append(sum(u.seconds(mode) for u, mode in units) + rank_p2p[r])
        elements = sum(u.param_elements for u, _ in units)
        if pp > 1 and r == (len(stages) - 1) % pp and r != 0:
            elements += chain.shared_params  # the last stage's copy of a tied embedding
        largest = max((u.param_elements for u, _ in units), default=0.0)
        if zero_stage == 3 and pp == 1:  # shards + this and the next unit gathered (and autocast's copies)
            params = elements * p_b / dp + 2 * largest * (p_b + w_b)
        else:  # under pp, ZeRO-3's gathered parameters stay until the step's last backward
            params = elements * (p_b + w_b)
        grads = elements * p_b / (dp if zero_stage >= 2 and pp == 1 else 1)
        states = elements * o_b / (dp if zero_stage >= 1 else 1)
        kept = sum(u.activations(mode) for u, mode in units)
        memory.append(training_memory(
            param_bytes=params,
            grad_bytes=grads,
            optimizer_bytes=states,
            activation_bytes=kept * _in_flight(schedule, r, pp, v, m)
            + max((max(0.0, u.activation_bytes - u.activations(mode)) for u, mode in units), default=0.0),
        ))
        g_bytes = elements * p_b
        backward = sum(u.compute_s for u, _ in units) * 2 / 3  # one micro-batch's backward compute
        if dp == 1:
            dp_s = 0.0
        elif zero_stage <= 1 or (zero_stage == 2 and pp > 1):  # one all-reduce's bytes, under the last backward
            dp_s = _exposed(collective_time(Collective.ALL_REDUCE, int(g_bytes), dp_link), backward)
        elif zero_stage == 2:  # a reduce-scatter under each micro-batch's backward, one all-gather after
            dp_s = m * _exposed(_rs(g_bytes, dp_link), backward) + _ag(elements * p_b, dp_link)
        else:  # per unit (block) one gather under forward, one gather (and pp = 1: a reduce-scatter) under backward
            gather = _ag(elements * p_b, dp_link) + len(units) * latency
            scatter = _rs(g_bytes, dp_link) + len(units) * latency
            if pp == 1:
                dp_s = m * (_exposed(gather, backward / 2) + _exposed(gather + scatter, backward))
            else:  # the reduce-scatter once, after the last micro-batch
                dp_s = m * (_exposed(gather, backward / 2) + _exposed(gather, backward)) + _exposed(scatter, backward)
        sync.append(dp_s + sum(u.sync_s for u, _ in units))
        optimizer.append(sum(u.optimizer_s for u, _ in units) / (dp if zero_stage >= 1 else 1))

    bubble_units = (pp - 1) / v
    pipeline_s = (m + bubble_units) * max(per_mb)
    embedding_s = 0.0
    if pp > 1 and chain.shared_params:  # Megatron's all-reduce of the tied embedding's gradient
        pair = dataclasses.replace(pp_link, group_size=2, latency=0.0)
        embedding_s = collective_time(Collective.ALL_REDUCE, int(chain.shared_params * p_b), pair)
    sync_s = max(sync) + embedding_s
    optimizer_s = max(optimizer)
    recomputed = sum(
        b.flops for b, mode in zip(chain.blocks, modes) if mode == "full"
    )
    replicas = dp * m
    return StepEstimate(
        step_time_s=pipeline_s + sync_s + optimizer_s,
        pipeline_s=pipeline_s,
        sync_s=sync_s,
        optimizer_s=optimizer_s,
        bubble_fraction=bubble_units / (m + bubble_units),
        stages=tuple(stages),
        memory=tuple(memory),
        hardware_flops=replicas * (3 * chain.flops + recomputed),
        model_flops=replicas * 3 * chain.flops,
        tokens=replicas * chain.tokens,
    )


def _exposed(comm_s: float, compute_s: float) -> float:
    """Communication left on the critical path when it runs under `compute_s` of independent compute."""
    return max(0.0, comm_s - compute_s)


def _in_flight(schedule: str, rank: int, pp: int, v: int, m: int) -> float:
    """Micro-batches' worth of a rank's activations held at its peak."""
    if schedule in ("none", "gpipe"):
        return float(m) if schedule == "gpipe" else 1.0
    if schedule == "1f1b":
        return float(min(m, pp - rank))
    passes = 2 * (pp - rank - 1) + (v - 1) * pp + 1  # chunk passes, each 1/v of the rank's layers
    return min(passes, m * v) / v


def _p2p_seconds(nbytes: float, link: Link) -> float:
    return collective_time(Collective.SEND_RECV, int(nbytes), link) if nbytes else 0.0


def _rs(nbytes: float, link: Link) -> float:
    return collective_time(Collective.REDUCE_SCATTER, int(nbytes), link)


def _ag(nbytes: float, link: Link) -> float:
    return collective_time(Collective.ALL_GATHER, int(nbytes), link)


def _activation_scale(itemsize: int, precision: str) -> float:
    return 2 / itemsize if precision == "bf16-mixed" and itemsize >= 4 else 1.0


def _float_dtype(itemsize: int):
    import torch

    return {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(itemsize, torch.float32)


class _Shards:
    """How many pieces a placement string splits a tensor into on the operator mesh."""

    def __init__(self, mesh: dict[str, int]) -> None:
        self.sizes = tuple(mesh.values())
        self._cache: dict[str | None, int] = {}

    def __call__(self, spec: str | None) -> int:
        if spec is None:
            return 1
        if spec not in self._cache:
            placements = spec_from_str(spec)
            self._cache[spec] = math.prod(
                size for p, size in zip(placements, self.sizes) if is_sharded(p) and not isinstance(p, Partial)
            )
        return self._cache[spec]
