"""The user's own training loop around `autoshard.compile`, on 4 real gloo ranks: equal to one device.

tests/dist/native_loop_matches.py runs tests/native_loop.py's loop (AdamW with two param groups, warmup,
global-norm clipping) on gpt-tiny for dp, tp, dp x tp, ZeRO 1/2/3, recomputation, and GPipe, 1F1B and
interleaved 1F1B each with pp x dp and pp x tp. CI runs `CI_CASES`, which touches each kind; the whole
matrix runs with AUTOSHARD_FULL=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from autoshard.runtime.launch import run_local

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
from native_loop_matches import CASES  # noqa: E402

# ZeRO-1 and recomputation here; dp x tp with the fused-qkv split, ZeRO-3 beside tp and an interleaved
# pipeline over tp run the same loop, compared with one device, after a checkpoint is loaded
# (test_checkpoint_reshard.py); plain dp, tp and GPipe/1F1B also run through train_step in
# test_runtime_torchrun.py and test_runtime_pipeline.py
CI_CASES = ["dp4-zero1", "dp2xtp2-recompute"]
RUN = list(CASES) if os.environ.get("AUTOSHARD_FULL") else CI_CASES

pytestmark = pytest.mark.slow


def test_user_loop_matches_single_device_on_4_ranks() -> None:
    run = run_local(DIST / "native_loop_matches.py", 4, *RUN, timeout=1200)
    failures = [
        f"rank {rank} {case}: {v['problems']}"
        for rank, result in enumerate(run.results)
        for case, v in result.items()
        if not v["ok"]
    ]
    assert not failures, "\n".join(failures)
    assert set(run.results[0]) == {"reference", *RUN}
    norms = run.results[0]["reference"]["norms"]
    assert max(norms) > 0.5, f"the reference never clips (norms {norms})"
