"""The plan report: per module group, the chosen placements and their compute, communication and
memory per device, with totals. Repeated blocks are shown once with their count (`x96`)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING

from autoshard.report.table import format_count, format_table

if TYPE_CHECKING:
    from autoshard.ir.plan import Plan

__all__ = ["module_pattern", "plan_report"]

_INDEX = re.compile(r"\.\d+(?=\.|$)")


def module_pattern(module: str) -> str:
    """`transformer.h.7.attn` -> `transformer.h.*.attn`: one row stands for every copy of a block."""
    return _INDEX.sub(".*", module)


def plan_report(plan: Plan, *, depth: int | None = None) -> str:
    """Readable text: a header with the headline figures, then one row per (module group, op)."""
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for d in plan.nodes:
        if d.op and d.compute_s == 0 and d.comm_s == 0 and d.memory_bytes == 0:
            continue  # views and free ops: they follow their input
        module = module_pattern(d.module) if d.module else "<root>"
        if depth is not None:
            module = ".".join(module.split(".")[:depth])
        placement = " ".join(p for p in d.output if p) or "-"
        what = d.op.removeprefix("aten.").rsplit(".", 1)[0] if d.op else "parameter/input"
        groups[(module, what, placement)].append(d)
    rows = []
    for (module, what, placement), ds in groups.items():
        rows.append(
            [
                module,
                what,
                placement,
                f"x{len(ds)}" if len(ds) > 1 else "",
                _ms(sum(d.compute_s for d in ds)),
                _ms(sum(d.comm_s for d in ds)),
                format_count(sum(d.memory_bytes for d in ds), unit="B"),
            ]
        )
    p = plan.predicted
    rows.append(["total", "", "", "", _ms(p.compute_s), _ms(p.comm_s), format_count(p.peak_memory_bytes, unit="B")])
    mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
    s = plan.solver
    t = plan.training
    summary = plan.summary()
    per_micro_batch = t.pp > 1 or t.num_micro_batches > 1
    head = [
        f"Plan for {plan.model} on {plan.cluster}, mesh {mesh}, optimizer {plan.optimizer}, {t.precision}",
        f"  step: {t.num_micro_batches} micro-batch(es) of {t.micro_batch_size} per replica"
        + (f", {len(t.stages)} pipeline stages of {list(t.stages)} blocks on {t.pp} ranks, {t.schedule}"
           + (f" ({t.virtual_stages} stages per rank)" if t.virtual_stages > 1 else "")
           + f", bubble {p.bubble_fraction:.1%}" if t.pp > 1 else "")
        + f"; ZeRO stage {t.zero_stage}; recompute {summary['recompute']}",
        f"  step time {_time(p.step_time_s)}"
        + (f" = pipeline {_time(p.pipeline_s)} + gradient sync {_time(p.sync_s)} + optimizer {_time(p.optimizer_s)}"
           if p.pipeline_s and (p.sync_s or p.optimizer_s) else "")
        + f"; {summary['tokens_per_s']:,.0f} tokens/s, {summary['tflops_per_device']:.3g} TFLOP/s per device, "
        f"MFU {summary['mfu']:.1%}",
        f"  {'one micro-batch (the table below)' if per_micro_batch else 'compute and communication'}: "
        f"compute {p.compute_s * 1e3:.3f} ms, communication {p.comm_s * 1e3:.3f} ms; sends "
        f"{format_count(p.comm_bytes, unit='B')} per device",
        f"  memory per device {format_count(p.peak_memory_bytes, unit='B')} of "
        f"{format_count(plan.memory_limit_bytes, unit='B')}: parameters "
        f"{format_count(p.parameters_bytes, unit='B')}, gradients {format_count(p.gradients_bytes, unit='B')}, "
        f"optimizer {format_count(p.optimizer_bytes, unit='B')}, activations "
        f"{format_count(p.activations_bytes, unit='B')}",
        f"  solver {s.status} (gap {s.gap:.2%}) in {s.seconds:.2f} s, {s.variables} variables"
        + (
            ", repeated blocks solved once: " + ", ".join(f"{k} x{v}" for k, v in s.folded_blocks.items())
            if s.folded_blocks
            else ""
        ),
        f"  collectives per step: {_collective_counts(plan)}",
        f"  how each axis is used (share of compute time): {_axis_usage(plan)}",
    ]
    if t.loss_reduction:  # how the loss reduces the batch, and so how its split pieces combine
        head.append(f"  loss: {t.loss_reduction}")
    if norms := _batch_norm_statistics(plan):
        head.append(norms)
    table = format_table(["module", "op", "placement", "count", "compute", "comm", "memory"], rows)
    text = "\n".join(head) + "\n\n" + table
    if len(p.stage_memory) > 1:
        text += "\n\nMemory per device of each pipeline rank\n" + _stage_memory(plan)
    return text


_BATCH_NORMS = ("aten.batch_norm.", "aten.native_batch_norm.", "aten._native_batch_norm_legit")


def _batch_norm_statistics(plan: Plan) -> str:
    """How the plan's BatchNorms get their statistics. A BatchNorm in training normalises by the
    statistics of the batch it sees, so splitting its input along the batch would change the result:
    every BatchNorm the planner accepts reads its input whole along dim 0 (gathered over dp where
    the batch was split), so its statistics, and the running ones, are those of the global batch,
    as synchronised BatchNorm computes them."""
    norms = [d for d in plan.nodes if d.op.startswith(_BATCH_NORMS)]
    if not norms:
        return ""
    whole = sum(1 for d in norms if d.inputs and d.inputs[0] is not None and "S(0)" not in d.inputs[0])
    line = f"  BatchNorm: {whole} of {len(norms)} compute statistics over the global batch (synchronised over dp)"
    if whole != len(norms):
        line += f"; {len(norms) - whole} over a batch shard"
    return line


def _time(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.3f} ms"


def _stage_memory(plan: Plan) -> str:
    t = plan.training
    rows = []
    for rank, m in enumerate(plan.predicted.stage_memory):
        stages = range(rank, len(t.stages), t.pp)
        blocks = sum(t.stages[s] for s in stages)
        rows.append([
            str(rank), str(blocks),
            *(format_count(m[k], unit="B") for k in ("parameters", "gradients", "optimizer_state", "activations")),
            format_count(sum(m.values()), unit="B"),
        ])
    return format_table(["pp rank", "blocks", "parameters", "gradients", "optimizer", "activations", "total"], rows)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds else ""


def _collective_counts(plan: Plan) -> str:
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for c in plan.collectives:
        counts[(c.phase, c.collective, c.axis)] += 1
    if not counts:
        return "none"
    return ", ".join(f"{n} {coll} over {axis} ({phase})" for (phase, coll, axis), n in sorted(counts.items()))


def _axis_usage(plan: Plan) -> str:
    """Per mesh axis, the share of compute time whose output it splits along the batch (dim 0), along
    another dim, as a partial sum, or not at all: the axis names say where an axis lies, this says
    what the solver used it for."""
    totals = [defaultdict(float) for _ in plan.operator_mesh]
    for d in plan.nodes:
        if not d.op or not d.compute_s or not d.output or d.output[0] is None:
            continue
        parts = d.output[0].strip("()").rstrip(",").split(", ")
        for axis, p in enumerate(parts[: len(totals)]):
            kind = "batch" if p == "S(0)" else "replicated" if p == "R" else "partial" if p.startswith("P") else "other dims"
            totals[axis][kind] += d.compute_s
    out = []
    for name, usage in zip(plan.operator_mesh, totals):
        whole = sum(usage.values()) or 1.0
        shares = ", ".join(f"{k} {v / whole:.0%}" for k, v in sorted(usage.items(), key=lambda kv: -kv[1]) if v / whole >= 0.005)
        out.append(f"{name}: {shares}")
    return "; ".join(out)
