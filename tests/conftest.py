"""Fixtures shared by the single-process distributed tests."""

from __future__ import annotations

from collections.abc import Iterator

import math
import os

import pytest
import torch.distributed as dist

FAKE_WORLD = 4

# No test may depend on how fast the machine is: the solver runs to optimality (no wall-clock limit)
# unless a test passes its own, here and in the ranks the tests start (they inherit the environment).
os.environ["AUTOSHARD_TIME_LIMIT_S"] = "inf"


def pytest_configure(config: pytest.Config) -> None:
    from autoshard.solver import ilp

    ilp.DEFAULT_TIME_LIMIT_S = math.inf


@pytest.fixture(scope="module")
def fake_world() -> Iterator[int]:
    """A fake process group of 4 ranks for DTensor on one process (LocalTensorMode runs each rank's
    piece); DTensor's per-layout caches are reset on both sides, since each module builds its meshes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from autoshard.strategies._dtensor import reset_caches

    if dist.is_initialized():
        pytest.skip("another process group is already initialised in this process")
    reset_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=FAKE_WORLD)
    yield FAKE_WORLD
    dist.destroy_process_group()
    reset_caches()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow (multi-process, long) tests first: under `pytest -n` the workers then share out the short
    ones at the end instead of one worker finishing a 2-minute torchrun alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
