"""Benchmark: planning time end to end (capture, sharding options, pricing, ILP solve).

The issue's job: a 32-layer d=1024 transformer (GPT, 16 heads, vocab 50257, seq 1024, global batch 64)
on an 8x8 mesh of A100-80GB (8 nodes x 8). Target: 5 s or less (the closest open peer needs ~47 s for
this job on this kind of machine). Each run is a fresh Python process, so nothing is cached between
runs; the time starts after imports (which take ~1 s, mostly torch) and ends when the Plan exists.
A sweep over depth shows that folding repeated blocks keeps the ILP the same size at any depth.

Writes benchmarks/results/planning_time.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "planning_time.json"
RUNS = 3

_CHILD = r"""
import json, sys, time
import torch
import autoshard
from autoshard.models import build
layers, batch, mesh = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
model = build("gpt2-medium", device="meta", n_layer=layers)  # d=1024, 16 heads, seq 1024
idx = torch.zeros(batch, 1024, dtype=torch.long, device="meta")
t0 = time.perf_counter()
ir = autoshard.capture(model, (idx, idx.clone()))
t1 = time.perf_counter()
plan = autoshard.plan_graph(ir, "a100-80g:8x8", mesh=mesh)
t2 = time.perf_counter()
s = plan.summary()
print(json.dumps({"layers": layers, "batch": batch, "mesh": mesh, "capture_s": t1 - t0, "plan_s": t2 - t1,
    "total_s": t2 - t0, "variables": s["solver"]["variables"], "status": s["solver"]["status"],
    "solve_s": s["solver"]["seconds"], "step_time_s": s["step_time_s"]}))
"""


def run(layers: int, batch: int = 64, mesh: dict[str, int] | None = None) -> dict:
    mesh = mesh or {"dp": 8, "tp": 8}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(layers), str(batch), json.dumps(mesh)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    target = [run(32) for _ in range(RUNS)]
    totals = [r["total_s"] for r in target]
    print(
        f"32 layers, d=1024, 8x8 mesh: end to end {statistics.median(totals):.2f} s median of {RUNS} "
        f"(min {min(totals):.2f}, max {max(totals):.2f}); capture {target[0]['capture_s']:.2f} s, "
        f"plan {target[0]['plan_s']:.2f} s, ILP {target[0]['variables']} variables, {target[0]['status']}"
    )
    sweep = [run(layers) for layers in (8, 96)]
    for r in sweep:
        print(f"{r['layers']:3d} layers: end to end {r['total_s']:.2f} s, ILP {r['variables']} variables")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "planning_time",
                "job": "GPT 32 layers, d=1024, 16 heads, seq 1024, batch 64, a100-80g:8x8, mesh dp=8 x tp=8",
                "target_s": 5.0,
                "peer_reference_s": 47.0,
                "median_total_s": statistics.median(totals),
                "runs": target,
                "depth_sweep": sweep,
                "torch": torch.__version__,
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
