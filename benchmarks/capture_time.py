"""Benchmark: capturing GPT-3 175B on the meta device.

Runs each capture in a fresh subprocess so its peak resident memory is its own, and writes
benchmarks/results/capture_time.json plus a readable line per model. Target (issue 2): seconds, not
minutes, and no parameter memory (175B fp32 parameters would be 700 GB).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "capture_time.json"

_CHILD = r"""
import json, resource, sys, time, torch
import autoshard
from autoshard.models import build, preset
name, batch = sys.argv[1], int(sys.argv[2])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter(); model = build(name, device="meta"); t1 = time.perf_counter()
cfg = preset(name); seq = getattr(cfg, "block_size", None) or cfg.max_seq_len
idx = torch.zeros(batch, seq, dtype=torch.long, device="meta")
t2 = time.perf_counter(); ir = autoshard.capture(model, (idx, idx)); t3 = time.perf_counter()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s = ir.summary()
print(json.dumps({"model": name, "batch": batch, "seq": seq, "build_s": t1 - t0, "capture_s": t3 - t2,
    "nodes": s["nodes"], "parameters": s["parameters"], "parameter_bytes": s["parameter_bytes"],
    "forward_flops": s["forward_flops"], "peak_rss_mib": rss1 / 1024, "rss_growth_mib": (rss1 - rss0) / 1024}))
"""


def main() -> None:
    rows = []
    for name in ("gpt2-small", "llama2-7b", "mixtral-8x7b", "gpt3-175b"):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, name, "1"], check=True, capture_output=True, text=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name:14s} capture {row['capture_s']:6.2f} s  {row['nodes']:5d} nodes  "
            f"{row['parameters'] / 1e9:7.2f} B params ({row['parameter_bytes'] / 2**30:8.1f} GiB if real)  "
            f"peak RSS {row['peak_rss_mib']:7.0f} MiB"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "capture_time",
                "torch": torch.__version__,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpus": __import__("os").cpu_count(),
                "target": "GPT-3 175B capture on meta in seconds, no parameter memory",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
