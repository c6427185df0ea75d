"""Benchmark: planning models nobody here wrote (tests/zoo.py), as a user would, through the default path.

For every zoo model, in a fresh Python process each (nothing cached between models):
- tiny config, `autoshard.plan(model, inputs, "a100-80g:2x8")` with no mesh (the full step search), on
  meta tensors. Target: under 10 s end to end (capture + plan).
- large config (7B-class, GPT-2 XL, BERT-large, T5-large, ViT-L, ResNet-152), the same on
  "a100-80g:4x8": it must succeed; its time is recorded.
- tiny config, the time of `autoshard.compile(model, inputs, mesh={"dp": 4})` on 4 simulated ranks (fake
  process group): what a user waits for before the first step (capture twice, plan, codegen, sharding).

The inputs are the keyword arguments a user passes (`input_ids=..., labels=...`). Times start after
imports. Writes benchmarks/results/zoo_planning.json. Run on an otherwise idle machine.

Usage: python benchmarks/zoo_planning.py [model ...]
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "zoo_planning.json"
TINY_TARGET_S = 10.0

_CHILD = r"""
import json, logging, sys, time, traceback
sys.path.insert(0, sys.argv[4])
logging.disable(logging.WARNING)
import torch
import autoshard, zoo
name, size, what = sys.argv[1], sys.argv[2], sys.argv[3]
large = size == "large"
out = {"model": name, "size": size, "what": what}
try:
    model = zoo.build(name, large=large, device="meta" if what == "plan" else "cpu")
    batch = 8 if not large else 16
    inputs = zoo.inputs(name, batch, large=large, device="meta" if what == "plan" else "cpu")
    out["parameters"] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    if what == "plan":
        plan = autoshard.plan(model, inputs, "a100-80g:2x8" if not large else "a100-80g:4x8")
        s = plan.summary()
        out.update(mesh=dict(plan.mesh), zero_stage=s["zero_stage"], micro_batch_size=s["micro_batch_size"],
                   num_micro_batches=s["num_micro_batches"], step_time_s=s["step_time_s"], mfu=s["mfu"])
    else:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        from torch.distributed._local_tensor import LocalTensorMode
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
        with LocalTensorMode(4):
            autoshard.compile(model, inputs, mesh={"dp": 4})
    out["seconds"] = time.perf_counter() - t0
    out["ok"] = True
except Exception as exc:  # recorded, not raised: the benchmark reports every model
    out.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:500]}")
print(json.dumps(out))
"""


def run(name: str, size: str, what: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, name, size, what, str(ROOT / "tests")],
        capture_output=True, text=True, timeout=1800,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"model": name, "size": size, "what": what, "ok": False, "error": proc.stderr[-500:]}
    return json.loads(lines[-1])


def main(names: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo

    names = names or zoo.names()
    rows = []
    for name in names:
        for size, what in (("tiny", "plan"), ("tiny", "compile"), ("large", "plan")):
            row = run(name, size, what)
            rows.append(row)
            shown = f"{row['seconds']:.1f} s" if row.get("ok") else f"FAILED {row.get('error', '')[:200]}"
            print(f"{name:10s} {size:5s} {what:8s} {shown} {row.get('mesh', '')}", flush=True)
    tiny = [r for r in rows if r["size"] == "tiny" and r["what"] == "plan"]
    summary = {
        "all_ran": all(r.get("ok") for r in rows),
        "tiny_plans_within_target": sum(1 for r in tiny if r.get("ok") and r["seconds"] < TINY_TARGET_S),
        "tiny_plans": len(tiny),
        "tiny_plan_max_s": max((r.get("seconds", float("inf")) for r in tiny), default=None),
        "tiny_plan_target_s": TINY_TARGET_S,
        "large_plans_ok": sum(1 for r in rows if r["size"] == "large" and r.get("ok")),
        "large_plans": sum(1 for r in rows if r["size"] == "large"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "summary": summary, "rows": rows,
    }, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
