"""Faults end in bounded time with an error that names the rank at fault.

tests/dist/skip_a_step.py: under torchrun, the script lets `autoshard.compile(..., timeout_s=5)` start
the process group, and rank 2 skips one call of `model.step`. The other ranks' last step then waits
on rank 2; gloo's timeout ends it, and the error names rank 2 as the one behind. A hang instead would
run into the launcher's timeout, which is far longer than the collective timeout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autoshard.errors import AutoshardError
from autoshard.runtime.faults import CollectiveFailure, StepWatch
from autoshard.runtime.launch import LaunchError, run_local

DIST = Path(__file__).parent / "dist"


@pytest.mark.slow
def test_a_rank_that_skips_a_step_fails_every_rank_naming_it() -> None:
    with pytest.raises(LaunchError) as failed:
        run_local(DIST / "skip_a_step.py", 4, "5", timeout=300)
    text = str(failed.value)
    assert "ran past" not in text, "the job hung until the launcher's timeout"
    assert "CollectiveFailure: rank" in text and "step 3 (its call 3 of model.step)" in text, text[-3000:]
    assert "rank 2 is behind" in text, text[-3000:]


def test_errors_that_are_not_a_collectives_pass_through() -> None:
    watch = StepWatch()  # no process group in this process: nothing to post
    watch.begin()
    assert watch.explain(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    failure = watch.explain(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert isinstance(failure, CollectiveFailure) and isinstance(failure, AutoshardError)
    assert str(failure).startswith("rank 0: step 1 (its call 1 of model.step) failed in a collective")
