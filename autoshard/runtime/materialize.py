"""Parameters of a model built on meta, materialised shard by shard with the model's own initialisation.

A model too big for one device is built on the meta device (no memory) and planned as usual; what is
needed to run it is each rank's shards, with values equal to those the same model would have had if
built on one CPU after `torch.manual_seed(seed)`.

How: the model's initialisation is replayed on the meta model under a dispatch mode, in the order
construction runs it: every module's `reset_parameters()` in `model.modules()` order (what `nn.Linear`,
`nn.Embedding`, ... draw inside `__init__`), then the model's `init_weights()` if it has one (nanoGPT-
style models re-initialise after construction). Each in-place initialisation op on a parameter (normal_,
uniform_, zero_, fill_, ...) is run instead on a fresh full-size CPU tensor, drawing from the CPU
generator exactly as the CPU build would, and only this rank's shard of it is kept. Memory peak: one
full parameter (twice: the runtime copies it so each rank owns its storage, runtime/module.py owned_copy),
never the model.

Trade-off, and why not generate only the local shard: torch's CPU generator (mt19937) cannot skip ahead,
and `normal_` consumes it in a size-dependent pattern (vectorised paths), so the values of a shard
depend on every value before it; exact equality with the single-device initialisation needs the whole
stream. Generating only the local shard would need a counter-based generator (Philox, as DTensor's CUDA
random ops use), which is fast and memory-free but gives different numbers than a CPU build. Exactness
was chosen; the cost is generating every parameter in full once on every rank (CPU time, not memory).

Assumption, checked where it can be: the model draws its initial values only in `reset_parameters` /
`init_weights` and constructs its modules in registration order (true of the reference models and of
typical PyTorch code). A parameter that no replayed op writes, or an initialisation that reads another
parameter's values, is refused with an InputError rather than guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from autoshard.errors import InputError

__all__ = ["materialize_shards", "replay_init"]


def replay_init(model: nn.Module) -> None:
    """Run the model's initialisation in construction order: each module's `reset_parameters()`, then
    `model.init_weights()` if defined. On a CPU model seeded with s this reproduces the values a CPU
    build after `torch.manual_seed(s)` has (a test checks it for the reference models)."""
    with torch.no_grad():
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        init = getattr(model, "init_weights", None)
        if callable(init):
            init()


def _writes_first_argument(func: Any) -> bool:
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


class _ShardingInit(TorchDispatchMode):
    """Runs in-place initialisation ops aimed at meta parameters on a full CPU tensor, keeps the shard."""

    def __init__(self, targets: Mapping[int, str], keep: Callable[[str, torch.Tensor], None], seed: int) -> None:
        super().__init__()
        self.targets = targets
        self.keep = keep
        # The replay's own generator state, swapped into the global CPU generator around each draw: what
        # runs between draws (sharding under LocalTensorMode, which saves and sets the global RNG state
        # for its per-rank factories) must not shift the stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.state = torch.random.get_rng_state()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        name = self.targets.get(id(first)) if first is not None else None
        read = [self.targets[id(a)] for a in (*args[1:], *kwargs.values()) if id(a) in self.targets]
        if read:
            raise InputError(
                f"expected the model's initialisation to write parameters only from the random generator "
                f"and constants, found {func} reading parameter {read[0]}; build such a model on cpu, or "
                "initialise that parameter without reading another"
            )
        if name is None or not _writes_first_argument(func):
            return func(*args, **kwargs)
        with _disable_current_modes(), torch.random.fork_rng(devices=[]):  # the CPU generator, as on one device
            torch.random.set_rng_state(self.state)
            full = torch.empty(first.shape, dtype=first.dtype, device="cpu")
            func(full, *args[1:], **kwargs)
            self.state = torch.random.get_rng_state()
        self.keep(name, full)
        return first


def materialize_shards(
    model: nn.Module,
    mesh: DeviceMesh,
    placements: Mapping[str, tuple[Placement, ...]],
    *,
    seed: int,
    owned: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    wanted: Collection[str] | None = None,
) -> dict[str, DTensor]:
    """This rank's shard of every parameter of the meta `model`, as DTensors placed per `placements`
    (canonical parameter name -> placements; tied names map to their canonical one's tensor). With
    `wanted`, only those are kept (a pipeline stage's): every parameter is still generated, in order,
    since each one's values depend on the random stream before it.

    Every rank must call it with the same seed: the full values are generated identically everywhere
    and each rank keeps its own slice (no communication). The global RNG state is left untouched.
    `owned` turns a generated tensor into one the rank owns (runtime/module.py `owned_copy`).
    """
    buffers = [n for n, b in model.named_buffers() if b.is_meta]
    if buffers:
        raise InputError(
            f"expected a meta model without buffers, found {len(buffers)} meta buffers (first: {buffers[0]}); "
            "build the model on cpu, or register those tensors as non-persistent values computed in forward"
        )
    canonical = {id(p): None for p in model.parameters()}
    by_id: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in placements:
            by_id[id(p)] = name
    missing = [n for n, p in model.named_parameters() if id(p) not in by_id]
    if missing or len(by_id) != len(canonical):
        raise InputError(f"expected a placement for every parameter, found none for {missing[:3]}")
    shards: dict[str, DTensor] = {}

    written: set[str] = set()

    def keep(name: str, full: torch.Tensor) -> None:
        written.add(name)
        if wanted is not None and name not in wanted:
            return
        shards[name] = distribute_tensor(
            owned(full.to(mesh.device_type)), mesh, placements[name], src_data_rank=None
        )

    with _ShardingInit(by_id, keep, seed):
        replay_init(model)
    unset = sorted(set(placements) - written)
    if unset:
        raise InputError(
            f"expected the model's reset_parameters()/init_weights() to initialise every parameter, found "
            f"{len(unset)} never written (first: {unset[0]}); give its module a reset_parameters(), or build "
            "the model on cpu"
        )
    return shards
