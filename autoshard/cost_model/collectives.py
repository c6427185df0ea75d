"""Alpha-beta (ring) times of collectives over one mesh axis.

Why ring formulas: NCCL and gloo both run large collectives as rings, and the ring is bandwidth-optimal, so
for the tensor sizes that matter in training the ring time is what the hardware achieves (scaled by the
profile's collective efficiency). For small all-reduces NCCL switches to a (double binary) tree, whose
latency grows with log2(n) instead of n - 1; the all-reduce is priced as the faster of the two, otherwise
a large group's latency would be overstated and splitting it into two mesh axes would look cheaper than
one collective over the whole group, which it is not.

Size convention: ``nbytes`` is the size of the largest per-device buffer involved, which for the sharding
collectives is the FULL (unsharded) tensor:

* ALL_GATHER: the gathered output (each device contributes nbytes / n);
* REDUCE_SCATTER: the input each device reduces (each device ends with nbytes / n);
* ALL_REDUCE: the buffer each device holds (input and output are both nbytes);
* ALL_TO_ALL: the buffer each device holds before and after the exchange (equal sizes). When an all-to-all
  moves a tensor from sharded on one dim to sharded on another, each device holds full / n, so pass that;
* SEND_RECV: the message sent from one device to its peer.

With n the group size, B the link bandwidth times the collective efficiency and a the link latency:

* all-gather, reduce-scatter: (n-1)/n * nbytes / B + (n-1) * a   (n-1 ring steps)
* all-reduce: twice that (a reduce-scatter followed by an all-gather), or the tree's
  2 * (nbytes / B + ceil(log2 n) * a) when that is less
* all-to-all: (n-1)/n * nbytes / B + (n-1) * a   (each device keeps 1/n, sends the rest)
* send/recv: nbytes / B + a
* a group of one device communicates nothing: 0 s.
"""

from __future__ import annotations

import math
from enum import Enum

from autoshard.cost_model.cluster import Link

__all__ = ["Collective", "collective_bytes_per_device", "collective_time"]


class Collective(str, Enum):
    """The communication patterns a sharding plan inserts."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    ALL_TO_ALL = "all_to_all"
    SEND_RECV = "send_recv"


def _check(kind: Collective, nbytes: int, group_size: int) -> None:
    if not isinstance(kind, Collective):
        raise TypeError(f"expected a Collective, found {kind!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, found {nbytes}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, found {group_size}")


def collective_bytes_per_device(kind: Collective, nbytes: int, group_size: int) -> float:
    """Bytes each device sends in a ring ``kind`` over ``group_size`` devices (for reporting volume).

    ``nbytes`` follows the module's convention (the full tensor for all-gather, reduce-scatter and
    all-reduce; the per-device buffer for all-to-all; the message for send/recv).
    """
    _check(kind, nbytes, group_size)
    n = group_size
    if n == 1:
        return 0.0
    if kind is Collective.SEND_RECV:
        return float(nbytes)
    fraction = (n - 1) / n * nbytes
    return 2 * fraction if kind is Collective.ALL_REDUCE else fraction


def collective_time(kind: Collective, nbytes: int, link: Link) -> float:
    """Seconds for ``kind`` on ``nbytes`` (see the module's size convention) over one axis's ``link``."""
    _check(kind, nbytes, link.group_size)
    n = link.group_size
    if n == 1:
        return 0.0
    bandwidth = link.effective_bandwidth
    if kind is Collective.SEND_RECV:
        return nbytes / bandwidth + link.latency
    one_pass = (n - 1) / n * nbytes / bandwidth + (n - 1) * link.latency
    if kind is Collective.ALL_REDUCE:
        tree = 2 * (nbytes / bandwidth + math.ceil(math.log2(n)) * link.latency)
        return min(2 * one_pass, tree)
    return one_pass
