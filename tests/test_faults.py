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


def _check_batches(differ: bool) -> str:
    import torch
    import torch.distributed as dist

    from autoshard.errors import InputError
    from autoshard.runtime.stage import check_same_batch

    offset = dist.get_rank() if differ else 0
    batch = [torch.arange(12).view(3, 4) + offset, torch.ones(3, 4) * 0.5, 7]
    try:
        check_same_batch(batch)
    except InputError as exc:
        return str(exc)
    return "ok"


@pytest.mark.parametrize("differ", [False, True], ids=["same", "differ"])
def test_ranks_passing_different_batches_are_refused(differ: bool) -> None:
    # every rank cuts its rows from its own copy of the global batch (no scatter), so copies that differ
    # would train on a batch no rank holds: the first step checks they are equal
    results = run_local(_check_batches, 2, differ, timeout=120).results
    if differ:
        assert all("expected the same global batch on every rank" in r for r in results), results
    else:
        assert results == ["ok", "ok"]
