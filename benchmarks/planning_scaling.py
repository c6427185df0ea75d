"""Benchmark: how planning time grows with depth, cluster size and model width.

Three sweeps of `autoshard.plan` (the full step search: dp x tp x pp, micro-batch size, schedule, ZeRO,
recomputation) on a GPT with seq 1024, one fresh process per point, the time from after the meta
model is built to the Plan (capture included):

- depth: 8, 32, 128 layers at d=1024 (16 heads) on 8 x 8 A100-80GB, batch 64;
- devices: 8 (1 x 8) to 16,384 (2,048 x 8) A100-80GB, 32 layers at d=1024, batch 2 sequences per device;
- width: d = 512, 1024, 2048, 4096 (heads d/64), 32 layers on 8 x 8, batch 64.

Block folding keeps the ILP the size of one block at any depth; the device sweep shows the cost of the
search over meshes, and the width sweep that the ILP does not grow with the tensors' sizes.

Writes benchmarks/results/planning_scaling.json. Usage: python benchmarks/planning_scaling.py [sweep ...]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "planning_scaling.json"

_CHILD = r"""
import json, sys, time
import torch
import autoshard
from autoshard.models import build

layers, width, nodes, batch = (int(a) for a in sys.argv[1:5])
model = build("gpt2-medium", device="meta", n_layer=layers, n_embd=width, n_head=width // 64)
idx = torch.zeros(batch, 1024, dtype=torch.long, device="meta")
messages = []
t0 = time.perf_counter()
plan = autoshard.plan(model, (idx, idx.clone()), f"a100-80g:{nodes}x8", progress=messages.append)
seconds = time.perf_counter() - t0
s = plan.summary()
print(json.dumps({"layers": layers, "width": width, "devices": nodes * 8, "batch": batch, "plan_s": seconds,
    "mesh": s["mesh"], "micro_batch_size": s["micro_batch_size"], "zero_stage": s["zero_stage"],
    "step_time_s": s["step_time_s"], "captures": sum("captured" in m for m in messages),
    "configurations": next((m.split("priced ")[1].split(" ")[0] for m in messages if "priced " in m), None)}))
"""

SWEEPS = {
    "depth": [(layers, 1024, 8, 64) for layers in (8, 32, 128)],
    "devices": [(32, 1024, nodes, 16 * nodes) for nodes in (1, 8, 64, 512, 2048)],
    "width": [(32, width, 8, 64) for width in (512, 1024, 2048, 4096)],
}


def run(layers: int, width: int, nodes: int, batch: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(layers), str(width), str(nodes), str(batch)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(names: list[str]) -> None:
    names = names or list(SWEEPS)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    sweeps = dict(previous.get("sweeps", {}))
    for name in names:
        sweeps[name] = []
        for point in SWEEPS[name]:
            r = run(*point)
            sweeps[name].append(r)
            print(f"{name:8} {r['layers']:4d} layers d={r['width']:<5d} {r['devices']:6d} devices: "
                  f"{r['plan_s']:6.1f} s, {r['captures']} captures, {r['configurations']} configurations, "
                  f"mesh {r['mesh']}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "planning_scaling",
        "job": "autoshard.plan (full search) on GPT, seq 1024, A100-80GB nodes of 8; see the module docstring",
        "sweeps": sweeps,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
    }, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
