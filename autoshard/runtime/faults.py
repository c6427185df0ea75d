"""A collective that fails (a peer died, or is desynchronised) becomes an error naming the ranks and steps.

Every collective already ends in bounded time: the process group's timeout (`autoshard.compile(...,
timeout_s=...)` where autoshard starts the group) makes gloo and NCCL raise instead of waiting forever.
What their errors do not say is *which* rank is at fault: gloo reports "Timed out waiting 5000ms for
recv operation" on the ranks that waited. So each rank posts the number of `model.step` calls it has
begun to the process group's store (one small write per step), and a rank whose step fails reads every
rank's count back: the rank that is behind is the one that skipped a step, died, or hangs elsewhere.
"""

from __future__ import annotations

import datetime
import re

import torch.distributed as dist

from autoshard.errors import AutoshardError

__all__ = ["CollectiveFailure", "StepWatch"]

# how gloo and NCCL word a peer that is gone or late (torch 2.13)
_COMM_FAILURE = re.compile(r"Timed out waiting|Connection (closed|reset)|NCCL|ProcessGroup|gloo", re.IGNORECASE)
_KEY = "autoshard/steps/{rank}"


class CollectiveFailure(AutoshardError, RuntimeError):
    """A step's collective failed or timed out; the message names this rank, its step, and the ranks behind."""


class StepWatch:
    """Counts this rank's `model.step` calls and posts the count where every rank can read it."""

    def __init__(self) -> None:
        self.steps = 0
        self._store = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            try:  # private in torch 2.13; without it the error still names this rank and step
                self._store = dist.distributed_c10d._get_default_store()
            except (AttributeError, RuntimeError, ValueError):
                self._store = None

    def begin(self) -> None:
        self.steps += 1
        if self._store is not None:
            try:
                self._store.set(_KEY.format(rank=dist.get_rank()), str(self.steps))
            except (RuntimeError, NotImplementedError):  # a store without set (a fake process group's)
                self._store = None

    def explain(self, error: BaseException) -> CollectiveFailure | None:
        """The error to raise instead of `error` when it is a collective's failure, else None."""
        text = str(error)
        if not (isinstance(error, dist.DistError) or _COMM_FAILURE.search(text)):
            return None
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return CollectiveFailure(
            f"rank {rank}: step {self.steps} (its call {self.steps} of model.step) failed in a collective: "
            f"{first}. {self._who_is_behind(rank)} Every rank must call model.step the same number of "
            "times, with batches of the same shapes; the collective timeout is the process group's "
            "(autoshard.compile(..., timeout_s=...) when autoshard starts it)."
        )

    def _who_is_behind(self, rank: int) -> str:
        if self._store is None:
            return "The other ranks' steps are unknown (no store)."
        counts: dict[int, int | None] = {}
        try:
            self._store.set_timeout(datetime.timedelta(seconds=2))
            for r in range(dist.get_world_size()):
                key = _KEY.format(rank=r)
                counts[r] = int(self._store.get(key)) if self._store.check([key]) else None
        except Exception as e:  # noqa: BLE001 - the store is gone too: say so, keep the first error
            return f"The other ranks' steps could not be read ({type(e).__name__}: the store is unreachable)."
        began = ", ".join(f"rank {r}: {'none' if c is None else c}" for r, c in counts.items())
        known = [c or 0 for c in counts.values()]
        behind = [r for r, c in counts.items() if (c or 0) < max(known)]
        verdict = (
            f"rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} "
            f"{'are' if len(behind) > 1 else 'is'} behind: skipped a step, died, or hangs outside model.step."
            if behind
            else "Every rank began this step: one died or hangs inside it."
        )
        return f"Steps begun by each rank: {began}; {verdict}"
