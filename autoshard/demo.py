"""`make demo`: the main job on built-in defaults.

1. Capture a reference model on the meta device (no parameter memory) and print its graph summary,
   the FLOPs per top-level module and the first nodes of its graph.
2. Plan a GPT for a multi-node A100 cluster (every dp x tp mesh searched) and print the plan report
   with the meshes that lost and why.
"""

from __future__ import annotations

import argparse
import time

import torch

import autoshard
from autoshard.models import PRESETS, build
from autoshard.report.table import format_count, format_table

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m autoshard.demo", description=__doc__)
    parser.add_argument("--model", default="gpt2-small", choices=sorted(PRESETS), help="reference preset")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    parser.add_argument("--plan-model", default="gpt3-1.3b", choices=sorted(PRESETS), help="model to plan")
    parser.add_argument("--cluster", default="a100-80g:4x8", help="cluster to plan for, e.g. h100:2x8")
    parser.add_argument("--plan-batch", type=int, default=64, help="global batch (sequences) to plan")
    args = parser.parse_args(argv)
    show_capture(args)
    show_plan(args)


def show_capture(args: argparse.Namespace) -> None:
    model = build(args.model, device="meta")
    seq = args.seq or _max_seq(model.config)
    idx = torch.zeros(args.batch, seq, dtype=torch.long, device="meta")
    start = time.perf_counter()
    ir = autoshard.capture(model, (idx, idx))
    seconds = time.perf_counter() - start

    s = ir.summary()
    print(f"== capture: {args.model}, batch {args.batch} x seq {seq}, on meta, {seconds:.2f} s ==")
    print(
        format_table(
            ["figure", "value"],
            [
                ["nodes", s["nodes"]],
                ["compute nodes", s["compute_nodes"]],
                ["parameters", f"{s['parameters']:,} ({format_count(s['parameters'])})"],
                ["parameter bytes", format_count(s["parameter_bytes"], unit="B")],
                ["forward FLOPs", format_count(s["forward_flops"])],
                ["forward bytes moved", format_count(s["forward_bytes_moved"], unit="B")],
            ],
        )
    )
    print()
    groups = ir.flops_by_module(depth=2)
    print(format_table(["module", "forward FLOPs"], [[k, format_count(v)] for k, v in groups.items() if v]))
    print()
    print(ir.table(max_rows=24))


def show_plan(args: argparse.Namespace) -> None:
    model = build(args.plan_model, device="meta")
    seq = _max_seq(model.config)
    idx = torch.zeros(args.plan_batch, seq, dtype=torch.long, device="meta")
    print(f"\n== plan: {args.plan_model}, global batch {args.plan_batch} x seq {seq}, on {args.cluster} ==")
    start = time.perf_counter()
    plan = autoshard.plan(model, (idx, idx.clone()), args.cluster)
    print(f"(planned in {time.perf_counter() - start:.1f} s)\n")
    print(plan.report())
    if plan.alternatives:
        print()
        rows = [[str(a["mesh"]), a["reason"]] for a in plan.alternatives]
        print(format_table(["mesh", "why it lost"], rows))


def _max_seq(config: object) -> int:
    for field in ("block_size", "max_seq_len"):
        if hasattr(config, field):
            return int(getattr(config, field))
    raise AttributeError(f"{type(config).__name__} names no sequence length")


if __name__ == "__main__":
    main()
