"""A checkpoint saved under one plan resumes under every other plan and in one process, equal to one device.

tests/dist/checkpoint_reshard.py: a plain single-device run (one process, no process group) saves a
checkpoint after 2 steps of the user's loop (AdamW with two param groups, warmup, clipping); 4 gloo
ranks then save one under each plan of `RUN`, and load every checkpoint there under every plan of
`RUN`; finally one process loads every checkpoint into the plain model. Each load is followed by the
loop's remaining steps, compared with one device never interrupted: losses, clipped norms, parameters.
CI runs plans covering dp x tp with a fused-qkv split, ZeRO-1 over dp, ZeRO-3 beside tp and an
interleaved pipeline over tp; AUTOSHARD_FULL=1 runs every plan of the native-loop matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoshard.runtime.launch import run_local

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
from native_loop_matches import CASES  # noqa: E402

CI_CASES = ["dp2xtp2", "dp2xtp2-zero3", "pp2xtp2-interleaved"]
RUN = list(CASES) if os.environ.get("AUTOSHARD_FULL") else CI_CASES

pytestmark = pytest.mark.slow


def _one_process(action: str, root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, str(DIST / "checkpoint_reshard.py"), "--one-process", action, str(root)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_checkpoints_reshard_across_plans_and_one_process(tmp_path: Path) -> None:
    _one_process("save", tmp_path)
    run = run_local(DIST / "checkpoint_reshard.py", 4, str(tmp_path), *RUN, timeout=1200)
    results = {k: v for rank in run.results for k, v in rank.items()}
    results.update(_one_process("load", tmp_path))
    sources = ["one-process", *RUN]
    assert set(results) == {f"{a} -> {b}" for a in sources for b in [*RUN, "one-process"]}
    failures = [f"{k}: {v['problems']}" for k, v in results.items() if not v["ok"]]
    assert not failures, "\n".join(failures)
