"""Benchmark: how long a plan with `time_limit_s=1` takes on large unfolded ILPs, and the gap it reports.

`time_limit_s` bounds the whole operator plan (solver/planner.py `plan_on_mesh`): pricing the options,
the reductions and writing the ILP count, and what is left goes to HiGHS. A limit that passes before
HiGHS starts returns the reductions' incumbent with its gap to a relaxation's lower bound. Pricing
every option cannot be cut short (no plan exists without it), so it is the floor.

The jobs: a GPT with d=1024 (gpt2-medium's width, seq 1024, batch 64) on an 8x8 A100 mesh (dp 8 x tp 8),
32 and 96 layers, with block folding off, so the ILP has one copy of every layer (0.9M and 2.7M
variables). Each run is a fresh process; the time is `plan_on_mesh` alone (the capture is before it).

Writes benchmarks/results/time_limit.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "time_limit.json"
LIMIT_S = 1.0

_CHILD = r"""
import json, sys, time
import torch
import autoshard
from autoshard.cost_model import Cluster
from autoshard.models import build
from autoshard.solver.planner import plan_on_mesh
from autoshard.strategies.mesh import MeshSpec

layers, limit = int(sys.argv[1]), float(sys.argv[2])
model = build("gpt2-medium", device="meta", n_layer=layers)
idx = torch.zeros(64, 1024, dtype=torch.long, device="meta")
ir = autoshard.capture(model, (idx, idx.clone()))
t0 = time.perf_counter()
plan = plan_on_mesh(ir, Cluster.parse("a100-80g:8x8"), MeshSpec.of({"dp": 8, "tp": 8}), fold=False, time_limit_s=limit)
wall = time.perf_counter() - t0
s = plan.solver
print(json.dumps({"layers": layers, "time_limit_s": limit, "plan_on_mesh_s": wall, "solve_s": s.seconds,
    "variables": s.variables, "constraints": s.constraints, "status": s.status, "gap": s.gap,
    "step_time_s": plan.predicted.step_time_s}))
"""


def run(layers: int, limit: float) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(layers), str(limit)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = [run(layers, LIMIT_S) for layers in (32, 96)]
    for r in rows:
        print(f"{r['layers']:3d} layers unfolded, {r['variables']:,} variables: time_limit_s={r['time_limit_s']:g} -> "
              f"{r['plan_on_mesh_s']:.2f} s (solve {r['solve_s']:.2f} s), {r['status']}, gap {r['gap']:.1%}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "time_limit",
        "job": "plan_on_mesh(GPT d=1024 seq 1024 batch 64, a100-80g:8x8, dp 8 x tp 8, fold=False, time_limit_s=1)",
        "runs": rows,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
