"""What every compiled model shares: an `nn.Module` under the model's own names, `step`, clipping.

`autoshard.compile` hands back a CompiledModel (runtime/model.py, for every plan), whose torch-module face
is the `ShardedModule` base here. It is a torch module in the sense torch's own tools rely on:

- `named_parameters()` yields the model's own qualified names (`transformer.h.0.attn.c_attn.weight`),
  each a DTensor parameter in the plan's placement (under ZeRO, FSDP2's dp shard of it; under
  pipelining, the stages this rank runs). The names are a tree of plain `nn.Module` containers mirroring
  the model's, so `state_dict()`, `get_submodule` and torch.distributed.checkpoint's state-dict helpers
  resolve them. Tied weights are one parameter under every name, as in the model. The generated
  program and its FSDP2 modules are deliberately not children: they hold the same tensors under
  internal names that must never reach a state dict.
- `step(*batch)` runs forward and backward over the global batch and leaves every gradient on its
  parameter, in the parameter's placement, so any `torch.optim` optimizer built over `parameters()`
  updates the shards in place. Gradients accumulate across calls as `loss.backward()` does; the user's
  `optimizer.zero_grad()` clears them.
- `clip_grad_norm_(max_norm)` clips by the norm over the whole model: every rank and stage, each
  parameter counted once, with the formula of `torch.nn.utils.clip_grad_norm_`.

The helpers the runtime shares with checkpointing and tests (the DeviceMesh of a plan, an owned copy of
a tensor, the built-in optimizers) live here, public.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from autoshard.errors import InputError
from autoshard.runtime.grad_sync import OverlappedSync, settle_gradients
from autoshard.ir.plan import Plan
from autoshard.runtime.faults import StepWatch

__all__ = [
    "OPTIMIZERS",
    "ShardedModule",
    "as_float",
    "build_mesh",
    "optimizer_factory",
    "owned_copy",
    "submesh",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def optimizer_factory(name: str, lr: float, **kwargs: Any) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """`make(params)` building optimizer `name` ("sgd" or "adamw") at `lr` over `params`."""
    if name not in OPTIMIZERS:
        raise InputError(f"expected optimizer in {tuple(OPTIMIZERS)}, found {name!r}; pass optimizer='sgd' or 'adamw'")
    cls = OPTIMIZERS[name]
    return lambda params: cls(params, lr=lr, **kwargs)


class ShardedModule(nn.Module):
    """A compiled model: parameters under the model's names, `step`, `train_step`, `clip_grad_norm_`.

    The runtime (CompiledModel) keeps this rank's parameters by canonical name in `_params`, calls
    `_adopt` with them and the buffers, and implements `_forward_backward` (one global batch: forward,
    backward, gradients settled), `_norm_parameters` (the parameters this rank counts in the global
    norm) and `_combine_norms` (the norm over the ranks holding other stages)."""

    def __init__(self) -> None:
        super().__init__()
        self._builtin: torch.optim.Optimizer | None = None
        self._watch: StepWatch | None = None  # built on the first step, once the process group exists
        _watch_optimizers()
        self._make_builtin: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
        self._grad_sync: OverlappedSync | None = None  # set by a runtime that overlaps the dp reduction

    # ---- the model's names ------------------------------------------------------------------------------

    def _adopt(
        self,
        names: Mapping[str, tuple[str, ...]],
        params: Mapping[str, nn.Parameter],
        buffers: Mapping[str, torch.Tensor] = {},  # noqa: B006 - read only
        persistent: Iterable[str] = (),
    ) -> None:
        """Register `params` (by canonical name) under each of its `names`, and `buffers` (by the
        model's buffer name; `persistent` ones go into the state dict), in containers mirroring the
        model's module tree."""
        persistent = set(persistent)
        for p in params.values():
            _OWNERS[id(p)] = self
        for canonical, p in params.items():
            for name in names.get(canonical, (canonical,)):
                owner, leaf = self._container(name)
                owner.register_parameter(leaf, p)
        for name, b in buffers.items():
            owner, leaf = self._container(name)
            owner.register_buffer(leaf, b, persistent=name in persistent)

    def _container(self, name: str) -> tuple[nn.Module, str]:
        """The container module that holds `name`'s last atom (created on the way), and that atom."""
        *path, leaf = name.split(".")
        first = path[0] if path else leaf
        if first not in self._modules and (hasattr(type(self), first) or first in self.__dict__):
            raise InputError(
                f"expected the model's top-level names to differ from the compiled model's own attributes, "
                f"found {first!r} (from {name}); rename that submodule, parameter or buffer of the model"
            )
        owner: nn.Module = self
        for atom in path:
            if atom not in owner._modules:
                owner.add_module(atom, nn.Module())
            owner = owner._modules[atom]
        return owner, leaf

    def _hold(self, **runtime: Any) -> None:
        """Keep runtime objects (the generated program, its FSDP2 modules, stage modules) as plain
        attributes, never as children: they hold the parameters under internal names."""
        for name, value in runtime.items():
            object.__setattr__(self, name, value)

    # ---- training -----------------------------------------------------------------------------------

    def step(self, *args: Any, **kwargs: Any) -> float:
        """Forward and backward over the global batch, called as the model is (`step(input_ids=...,
        labels=...)`): the plan's micro-batches, gradient accumulation or pipeline schedule. Each
        parameter's gradient is left on it, in its placement, added to what was there (as
        `loss.backward()` adds); returns the loss of the global batch as a float, on every rank.

        A collective that fails or times out (a rank died, or skipped a step) raises CollectiveFailure
        naming this rank, its step and the ranks that are behind (runtime/faults.py)."""
        if self._watch is None:
            self._watch = StepWatch()
        self._watch.begin()
        try:
            return self._forward_backward(args, kwargs)
        except RuntimeError as e:
            failure = self._watch.explain(e)
            if failure is None:
                raise
            raise failure from e

    def train_step(self, *args: Any, **kwargs: Any) -> float:
        """`zero_grad`, `step` and the built-in optimizer's step (the `optimizer=`/`lr=` given to
        autoshard.compile): the shorthand for a loop without its own optimizer."""
        optimizer = self.builtin_optimizer()
        optimizer.zero_grad(set_to_none=True)
        loss = self.step(*args, **kwargs)
        optimizer.step()
        return loss

    def builtin_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer `train_step` steps, over `parameters()`, built on first use."""
        if self._builtin is None:
            assert self._make_builtin is not None, "the runtime sets _make_builtin"
            self._builtin = self._make_builtin(list(self.parameters()))
        return self._builtin

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """`builtin_optimizer()`: what `train_step` steps."""
        return self.builtin_optimizer()

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Scale every gradient by `min(1, max_norm / (norm + 1e-6))`, the norm taken over every
        parameter of the model (all ranks and stages, each once), and return that norm: the value
        `torch.nn.utils.clip_grad_norm_` gives on the single-device model. Collective: every rank calls it."""
        norm_type = float(norm_type)
        grads = [p.grad for p in self._norm_parameters() if p.grad is not None]
        norms = [_full_norm(g, norm_type) for g in grads]
        local = torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms else torch.zeros((), dtype=torch.float32)
        total = self._combine_norms(local.to(torch.float32), norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)}); "
                "pass error_if_nonfinite=False to clip anyway"
            )
        coef = as_float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for p in self.parameters():  # a shared parameter's copies on other pp ranks are scaled there
            if p.grad is not None:
                p.grad.mul_(coef)
        return total

    def _combine_norms(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        """The global norm from this rank's (overridden where stages live on other ranks)."""
        return local

    def _norm_parameters(self) -> list[nn.Parameter]:
        """The parameters this rank counts in the global norm (all of them, unless stages share one)."""
        return list(self.parameters())

    def gradients(self) -> dict[str, DTensor]:
        """Each gradient of this rank's parameters after the last backward, by canonical name, as the
        optimizer uses it (under ZeRO, FSDP's dp shard: the only one kept)."""
        return {n: p.grad for n, p in self._params.items() if p.grad is not None}

    def _settle_gradients(self) -> None:
        """Bring each gradient to its parameter's placement (the dp gradient all-reduce, bucketed as
        DDP's: runtime/grad_sync.py; a local slice where DTensor returned a replicated gradient): the
        optimizer then updates shards in place. A plan without pipelining overlaps the buckets' reduction
        with its last backward (`OverlappedSync`)."""
        if self._grad_sync is not None:
            self._grad_sync.settle()
        else:
            settle_gradients(self._params.values())

    def _forward_backward(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float:
        raise NotImplementedError


# ---- the user's optimizer against the plan's ------------------------------------------------------

_OWNERS: weakref.WeakValueDictionary[int, ShardedModule] = weakref.WeakValueDictionary()  # id(param) -> model
_CHECKED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_HOOKED: list[Any] = []


def _watch_optimizers() -> None:
    """Once per process: after any optimizer's first step, compare the state it keeps with the state
    the plan budgeted memory for (`_check_optimizer_state`)."""
    if not _HOOKED:
        _HOOKED.append(register_optimizer_step_post_hook(_check_optimizer_state))


def _check_optimizer_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Say once when `optimizer` keeps more parameter-sized state per parameter than the plan of the
    compiled model it steps assumed (`compile(optimizer=...)`): the plan's memory is then too low."""
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model = next((_OWNERS[id(p)] for p in params if id(p) in _OWNERS), None)
    if model is None or not params:
        return
    from autoshard.cost_model.memory import OPTIMIZERS as PLANNED

    planned = PLANNED.get(str(model.plan.optimizer).lower())
    kept = max(
        (sum(1 for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape) for p in params),
        default=0,
    )
    if planned is not None and kept > planned.states_per_param and (not dist.is_initialized() or dist.get_rank() == 0):
        warnings.warn(
            f"autoshard: {type(optimizer).__name__} keeps {kept} parameter-sized state tensor(s) per "
            f"parameter, but the plan budgeted memory for optimizer={model.plan.optimizer!r} "
            f"({planned.states_per_param}: {planned.description}); its memory prediction is low. Plan with "
            f"the optimizer you train with (autoshard.compile(..., optimizer='adamw'))",
            UserWarning,
            stacklevel=3,
        )


def _full_norm(grad: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The norm of the whole gradient (a DTensor's over all its shards), as a plain float32 scalar."""
    norm = torch.linalg.vector_norm(grad, norm_type)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.to(torch.float32)


# ---- the mesh, placements, tensors ------------------------------------------------------------------


def build_mesh(plan: Plan) -> DeviceMesh:
    """The DeviceMesh the plan names, on the current process group (one object per layout)."""
    names = tuple(plan.mesh)
    sizes = tuple(int(plan.mesh[a]) for a in names)
    world = dist.get_world_size()
    if math.prod(sizes) != world:
        raise InputError(
            f"expected the process group's world size to equal the plan's mesh {dict(plan.mesh)} "
            f"({math.prod(sizes)} devices), found world size {world}; launch {math.prod(sizes)} ranks "
            "or plan for this many devices"
        )
    # one DeviceMesh object per layout in a world: DTensor's caches hand back specs on the first mesh of
    # a layout, and FSDP2 requires a parameter's mesh to be the very mesh it is given
    key = (names, sizes, dist.get_backend(), id(dist.group.WORLD))
    if key not in MESHES:
        MESHES[key] = init_device_mesh("cpu", sizes, mesh_dim_names=names)
    return MESHES[key]


def submesh(mesh: DeviceMesh, names: tuple[str, ...]) -> DeviceMesh:
    """`mesh[names]`, one object per (mesh, names), for the same reason as `build_mesh`."""
    key = (id(mesh), names)
    if key not in MESHES:
        MESHES[key] = mesh[names]
    return MESHES[key]


MESHES: dict[tuple, DeviceMesh] = {}  # cleared by strategies._dtensor.reset_caches


def owned_copy(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor holding `t`'s values. `distribute_tensor` keeps a replicated tensor as is, so without
    the copy the optimizer would update the user's model in place (and, under LocalTensorMode, every
    simulated rank would update one shared storage). Created by a factory call so each rank owns it."""
    owned = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return owned.copy_(t)


def as_float(t: torch.Tensor) -> float:
    """A replicated scalar as a Python float (under LocalTensorMode simulation: the ranks' common value)."""
    reconcile = getattr(t, "reconcile", None)
    return float(reconcile().item() if callable(reconcile) else t.item())
