"""Plan: the solver's decision as a plain, JSON-serialisable data object.

A plan names, for every node of the captured graph, the placement of each output and the placement
each input must arrive in (DTensor vocabulary, written like `S(0),R` with one entry per mesh axis),
the placement of every parameter, the collectives this implies, and the predicted time and memory.
It carries the graph's fingerprint so a plan saved for one model is refused for another.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autoshard.errors import InputError

__all__ = ["NodeDecision", "Plan", "PlannedCollective", "Prediction", "SolverStats", "Training"]

PLAN_FORMAT = 2  # 2 added `training`; a format-1 plan reads as one stage, one micro-batch, no ZeRO or recompute

SCHEDULES = ("none", "gpipe", "1f1b", "interleaved-1f1b")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("fp32", "bf16-mixed")


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeDecision:
    """What the plan does at one node and what that costs per device."""

    node: str
    op: str  # "" for parameters and inputs
    module: str
    output: tuple[str | None, ...]  # placement of each tensor output
    inputs: tuple[str | None, ...]  # placement each input must arrive in (None: not a tensor)
    compute_s: float  # forward + backward compute time of this node
    comm_s: float  # forward + backward time of the collectives that bring its inputs in
    memory_bytes: float  # activations it keeps for backward, or a parameter's state


@dataclass(frozen=True, kw_only=True, slots=True)
class PlannedCollective:
    """One collective the plan issues per training step."""

    src: str  # producing node (or parameter)
    dst: str  # consuming node
    phase: str  # "forward" or "backward"
    axis: str  # mesh axis it runs over
    collective: str  # "all_reduce", "all_gather", "reduce_scatter", "all_to_all"
    full_bytes: int  # the buffer it operates on, unsharded on that axis
    bytes_per_device: float  # what each device sends
    seconds: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Prediction:
    """Predicted cost of one training step on one device."""

    step_time_s: float
    compute_s: float
    comm_s: float
    comm_bytes: float  # bytes each device sends per step
    parameters_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    # the step as a whole (issue 5): all devices together, per step
    hardware_flops: float = 0.0  # recomputation included
    model_flops: float = 0.0  # forward and backward only
    tokens: int = 0
    bubble_fraction: float = 0.0
    pipeline_s: float = 0.0  # forward and backward of every micro-batch, bubble included
    sync_s: float = 0.0  # once-per-step gradient reductions and ZeRO collectives
    optimizer_s: float = 0.0
    # per pp rank: {"parameters", "gradients", "optimizer_state", "activations"} bytes per device
    stage_memory: tuple[Mapping[str, float], ...] = ()

    @property
    def peak_memory_bytes(self) -> float:
        if self.stage_memory:
            return max(sum(m.values()) for m in self.stage_memory)
        return self.parameters_bytes + self.gradients_bytes + self.optimizer_bytes + self.activations_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class SolverStats:
    status: str  # "optimal", "feasible" (time limit: best found) or "evaluated" (a given strategy)
    gap: float
    seconds: float  # solver time
    total_seconds: float  # capture excluded: options, pricing and solve
    objective_s: float  # the ILP's objective: equals the predicted step time (a consistency check)
    variables: int
    constraints: int
    folded_blocks: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Training:
    """How a step is organised beyond operator sharding: pipeline stages and micro-batches, ZeRO stage,
    recomputation and precision.

    Pipeline stages are cut between the model's repeated blocks (`blocks`, e.g. `transformer.h.0` ...):
    stage k runs `stages[k]` consecutive blocks; stage 0 also runs everything before the first block
    (embeddings), the last stage everything after the last block (final norm, head, loss). With the
    interleaved schedule there are `pp * virtual_stages` stages and pp rank r runs stages r, r + pp, ...
    A global batch is `micro_batch_size * num_micro_batches * dp` sequences.
    """

    pp: int = 1
    blocks: tuple[str, ...] = ()  # module paths of the repeated blocks, in execution order
    stages: tuple[int, ...] = ()  # blocks per stage, pp * virtual_stages entries (empty: pp == 1)
    schedule: str = "none"  # one of SCHEDULES; "none" when pp == 1
    virtual_stages: int = 1  # stages per pp rank (> 1 only for "interleaved-1f1b")
    micro_batch_size: int = 0  # sequences per micro-batch per data-parallel replica (0: the whole batch)
    num_micro_batches: int = 1
    zero_stage: int = 0  # 0: none; 1: optimizer state, 2: + gradients, 3: + parameters sharded over dp
    recompute: tuple[str, ...] = ()  # per block, one of RECOMPUTE (empty: none anywhere)
    precision: str = "fp32"  # one of PRECISIONS
    # how the loss reduces the batch and how a split batch combines (capture/loss_reduction.py)
    loss_reduction: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage {self.zero_stage!r} is not 0, 1, 2 or 3")
        if bad := [r for r in self.recompute if r not in RECOMPUTE]:
            problems.append(f"recompute modes {bad} are not among {RECOMPUTE}")
        if self.recompute and len(self.recompute) != len(self.blocks):
            problems.append(f"{len(self.recompute)} recompute modes for {len(self.blocks)} blocks")
        if self.pp > 1:
            if len(self.stages) != self.pp * self.virtual_stages:
                problems.append(f"{len(self.stages)} stages for pp={self.pp} x {self.virtual_stages} virtual stages")
            if sum(self.stages) != len(self.blocks) or min(self.stages, default=0) < 1:
                problems.append(f"stages {self.stages} do not split the {len(self.blocks)} blocks into non-empty runs")
            if self.schedule == "none":
                problems.append("pp > 1 needs a schedule")
        if self.virtual_stages > 1 and self.schedule != "interleaved-1f1b":
            problems.append("virtual_stages > 1 needs schedule 'interleaved-1f1b'")
        if self.num_micro_batches < 1 or self.micro_batch_size < 0:
            problems.append(f"micro-batches {self.num_micro_batches} x {self.micro_batch_size} are not positive")
        if problems:
            raise InputError("invalid training configuration: " + "; ".join(problems))

    def recompute_of(self, block: int) -> str:
        return self.recompute[block] if self.recompute else "none"

    def stage_blocks(self, stage: int) -> range:
        """Indices (into `blocks`) of the blocks stage `stage` runs."""
        start = sum(self.stages[:stage])
        return range(start, start + self.stages[stage])


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """A complete sharding plan for one captured model on one cluster and mesh."""

    fingerprint: str
    model: str
    cluster: str
    mesh: Mapping[str, int]
    optimizer: str
    memory_limit_bytes: float
    nodes: tuple[NodeDecision, ...]
    params: Mapping[str, str]  # canonical parameter name -> placement
    collectives: tuple[PlannedCollective, ...]
    predicted: Prediction
    solver: SolverStats
    alternatives: tuple[Mapping[str, Any], ...] = ()
    training: Training = field(default_factory=Training)
    peak_flops: float = 0.0  # per device at the plan's compute precision (the MFU denominator)

    @property
    def operator_mesh(self) -> dict[str, int]:
        """The mesh the node placements are written on: every axis but pp (stages split the graph,
        not tensors)."""
        return {axis: size for axis, size in self.mesh.items() if axis != "pp"}

    def replicated_spec(self) -> str:
        """The placement string of a tensor replicated on every operator axis: `(R,)`, `(R, R)`, ..."""
        n = len(self.operator_mesh)
        return "(" + ", ".join(["R"] * n) + ("," if n == 1 else "") + ")"

    def axis_size(self, axis: str) -> int:
        return int(self.mesh.get(axis, 1))

    def decision(self, node: str) -> NodeDecision:
        for d in self.nodes:
            if d.node == node:
                return d
        raise KeyError(f"the plan has no node named {node!r}")

    def summary(self) -> dict[str, Any]:
        """Headline figures of the plan (per device where it says so)."""
        p, t = self.predicted, self.training
        devices = math.prod(self.mesh.values())
        step = p.step_time_s or math.inf
        modes = t.recompute or ("none",) * max(1, len(t.blocks))
        return {
            "model": self.model,
            "cluster": self.cluster,
            "mesh": dict(self.mesh),
            "dp": self.axis_size("dp"),
            "tp": self.axis_size("tp"),
            "pp": t.pp,
            "stages": list(t.stages) if t.pp > 1 else [len(t.blocks)],
            "schedule": t.schedule,
            "virtual_stages": t.virtual_stages,
            "micro_batch_size": t.micro_batch_size,
            "num_micro_batches": t.num_micro_batches,
            "zero_stage": t.zero_stage,
            "recompute": modes[0] if len(set(modes)) == 1 else {m: modes.count(m) for m in sorted(set(modes))},
            "precision": t.precision,
            "bubble_fraction": p.bubble_fraction,
            "tokens_per_s": p.tokens / step,
            "tflops_per_device": p.hardware_flops / step / devices / 1e12,
            "mfu": p.model_flops / step / devices / self.peak_flops if self.peak_flops else 0.0,
            "step_time_s": p.step_time_s,
            "compute_s": p.compute_s,
            "comm_s": p.comm_s,
            "peak_memory_bytes": p.peak_memory_bytes,
            "memory_limit_bytes": self.memory_limit_bytes,
            "comm_bytes": p.comm_bytes,
            "memory": {
                "parameters": p.parameters_bytes,
                "gradients": p.gradients_bytes,
                "optimizer_state": p.optimizer_bytes,
                "activations": p.activations_bytes,
            },
            "stage_memory": [dict(m) for m in p.stage_memory],
            "solver": {
                "status": self.solver.status,
                "gap": self.solver.gap,
                "seconds": self.solver.seconds,
                "total_seconds": self.solver.total_seconds,
                "objective_s": self.solver.objective_s,
                "variables": self.solver.variables,
                "constraints": self.solver.constraints,
                "folded_blocks": dict(self.solver.folded_blocks),
            },
        }

    def forward_collectives(self) -> list[PlannedCollective]:
        """Collectives of the forward pass, in graph order."""
        return [c for c in self.collectives if c.phase == "forward"]

    def report(self, *, depth: int | None = None) -> str:
        from autoshard.report.plan_report import plan_report

        return plan_report(self, depth=depth)

    # ---- persistence -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = PLAN_FORMAT
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        if data.get("format") not in (1, PLAN_FORMAT):
            raise InputError(
                f"plan format {data.get('format')!r} is not supported; expected {PLAN_FORMAT}. "
                "Re-create the plan with this version of autoshard."
            )
        body = {k: v for k, v in data.items() if k != "format"}
        body["nodes"] = tuple(
            NodeDecision(**{**d, "output": tuple(d["output"]), "inputs": tuple(d["inputs"])})
            for d in body["nodes"]
        )
        body["collectives"] = tuple(PlannedCollective(**c) for c in body["collectives"])
        predicted = dict(body["predicted"])
        predicted["stage_memory"] = tuple(predicted.get("stage_memory", ()))
        body["predicted"] = Prediction(**predicted)
        body["solver"] = SolverStats(**body["solver"])
        body["alternatives"] = tuple(body.get("alternatives", ()))
        training = dict(body.get("training", {}))
        for key in ("blocks", "stages", "recompute"):
            training[key] = tuple(training.get(key, ()))
        body["training"] = Training(**training)
        return cls(**body)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, *, graph: Any | None = None) -> Plan:
        """Load a saved plan; with `graph` (a GraphIR), refuse a plan made for another model."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"could not read a plan from {path}: {exc}") from exc
        plan = cls.from_json(data)
        if graph is not None:
            plan.check_graph(graph)
        return plan

    def check_graph(self, graph: Any) -> None:
        """Refuse to apply this plan to a graph whose fingerprint differs from the one planned."""
        if graph.fingerprint != self.fingerprint:
            raise InputError(
                f"this plan was made for a graph with fingerprint {self.fingerprint} ({self.model}); "
                f"the given model's graph has fingerprint {graph.fingerprint} ({graph.model_type}). "
                "A plan only applies to the model and input shapes it was made for: plan again."
            )
