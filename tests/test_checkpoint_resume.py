"""Resume after a crash: a torchrun job whose rank 1 dies by SIGKILL between steps, restarted with
torchrun from its last checkpoint, ends bit-identical to a run never interrupted (parameters and AdamW
state, torch.equal), for a plain plan (dp x tp), a ZeRO-3 plan and a pipelined one (1F1B, pp x dp).
tests/dist/checkpoint_resume.py is the user's script; its batches come from torch's RNG, so the RNG
state the checkpoint restores is part of what is checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autoshard.runtime.checkpoint import INCOMPLETE, MANIFEST
from autoshard.runtime.launch import LaunchError, run_local

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
from checkpoint_resume import SAVE_AT  # noqa: E402

CASES = ["dp2xtp2", "dp2xtp2-zero3", "pp2xdp2-1f1b"]

pytestmark = pytest.mark.slow


def test_sigkilled_job_resumes_bit_identically(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="rank 1: exited with code"):
        run_local(DIST / "checkpoint_resume.py", 4, "crash", str(tmp_path), *CASES, timeout=900)
    for case in CASES:
        saved = [d.name for d in (tmp_path / case).iterdir() if d.is_dir()]
        assert saved == [f"step{SAVE_AT}"], f"{case}: {saved}"
        manifest = json.loads((tmp_path / case / saved[0] / MANIFEST).read_text())
        assert manifest["world_size"] == 4 and not saved[0].endswith(INCOMPLETE)
    run = run_local(DIST / "checkpoint_resume.py", 4, "resume", str(tmp_path), *CASES, timeout=900)
    for rank, result in enumerate(run.results):
        assert set(result) == set(CASES)
        for case, verdict in result.items():
            assert verdict["ok"], f"rank {rank} {case}: {verdict}"
            assert verdict["compared"] > 50, verdict
