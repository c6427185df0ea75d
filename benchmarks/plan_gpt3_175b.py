"""Benchmark: wall time of a full-search plan for GPT-3 175B on 1024 A100-80GB.

The issue's job: `autoshard.plan(build("gpt3-175b"), (idx, idx), "a100-80g:128x8")` with `idx` a meta
LongTensor of shape (1536, 2048) -- GPT-3's batch of 1536 sequences of 2048 tokens (Brown et al. 2020)
on 128 DGX A100 nodes -- searching everything: dp x tp x pp, micro-batch size, schedule, ZeRO stage and
recomputation. Target: under one minute on this machine (2 CPU cores).

Each run is a fresh Python process, so nothing is cached between runs; the time starts after imports
and after the model is built on the meta device, and covers what `autoshard.plan` does: the capture,
the recaptures at each micro-batch size, the replica ILPs, pricing every configuration, and the final
operator ILP on dp x tp. The median of three runs is reported. A fourth run, not timed with the others,
passes a progress callback to record where the time goes.

Writes benchmarks/results/plan_gpt3_175b.json.
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

RESULTS = Path(__file__).parent / "results" / "plan_gpt3_175b.json"
RUNS = 3
TARGET_S = 60.0

_CHILD = r"""
import json, resource, sys, time
import torch
import autoshard
from autoshard.models import build

with_progress = sys.argv[1] == "progress"
model = build("gpt3-175b")
idx = torch.zeros(1536, 2048, dtype=torch.long, device="meta")
messages = []
t0 = time.perf_counter()
plan = autoshard.plan(model, (idx, idx), "a100-80g:128x8", progress=messages.append if with_progress else False)
seconds = time.perf_counter() - t0
s = plan.summary()
print(json.dumps({
    "plan_s": seconds,
    "mesh": s["mesh"], "stages": s["stages"], "schedule": s["schedule"], "virtual_stages": s["virtual_stages"],
    "micro_batch_size": s["micro_batch_size"], "num_micro_batches": s["num_micro_batches"],
    "zero_stage": s["zero_stage"], "recompute": s["recompute"], "precision": s["precision"],
    "bubble_fraction": s["bubble_fraction"], "step_time_s": s["step_time_s"], "tokens_per_s": s["tokens_per_s"],
    "tflops_per_device": s["tflops_per_device"], "mfu": s["mfu"], "peak_memory_bytes": s["peak_memory_bytes"],
    "stage_memory": s["stage_memory"], "alternatives": len(plan.alternatives),
    "runner_up": plan.alternatives[0] if plan.alternatives else None,
    "progress": messages, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def run(mode: str = "timed") -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    load_before = os.getloadavg()
    runs = [run() for _ in range(RUNS)]
    load_after = os.getloadavg()
    traced = run("progress")
    times = [r["plan_s"] for r in runs]
    median = statistics.median(times)
    best = runs[0]
    print(
        f"GPT-3 175B on a100-80g:128x8, batch 1536 x 2048, full search: {median:.1f} s median of {RUNS} "
        f"(min {min(times):.1f}, max {max(times):.1f}; target < {TARGET_S:.0f} s); load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(
        f"chosen: {best['mesh']}, {best['schedule']} v={best['virtual_stages']}, mbs {best['micro_batch_size']} "
        f"x {best['num_micro_batches']}, zero {best['zero_stage']}, recompute {best['recompute']}: "
        f"{best['tflops_per_device']:.0f} TFLOP/s per GPU, MFU {best['mfu']:.1%}, peak "
        f"{best['peak_memory_bytes'] / 1e9:.1f} GB; {best['alternatives']} alternatives"
    )
    for line in traced["progress"]:
        print("  " + line)
    for r in runs[1:]:
        if {k: r[k] for k in ("mesh", "schedule", "micro_batch_size", "zero_stage", "recompute")} != {
            k: best[k] for k in ("mesh", "schedule", "micro_batch_size", "zero_stage", "recompute")
        }:
            print("warning: the runs chose different configurations", file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "plan_gpt3_175b",
                "job": "autoshard.plan(build('gpt3-175b'), (idx, idx), 'a100-80g:128x8'), idx meta LongTensor "
                "(1536, 2048), full search, default precision (bf16-mixed on GPU clusters), AdamW",
                "target_s": TARGET_S,
                "median_plan_s": median,
                "plan_s": times,
                "chosen": {k: v for k, v in best.items() if k not in ("plan_s", "progress")},
                "progress_run": {"plan_s": traced["plan_s"], "messages": traced["progress"]},
                "runs": [{k: v for k, v in r.items() if k in ("plan_s", "peak_rss_mib")} for r in runs],
                "load_average_before": load_before,
                "load_average_after": load_after,
                "note": "2-core machine shared with other work; the load average (1, 5, 15 min) shows how busy it "
                "was. Times start after imports and the meta model build.",
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "git": _git_head(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
