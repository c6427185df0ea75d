"""Measured activation memory under recomputation, on one process, for the cost model to be checked against.

What a forward pass keeps for backward is measured, not modelled: every tensor storage an op creates
during forward is recorded (a dispatch mode, weak references only), and once forward has returned the
storages still alive are exactly what autograd and checkpoint hold for backward (the saved tensors, the
checkpointed blocks' inputs, selective recomputation's cache), since everything else was freed with the
forward's locals. Storages are counted once however many views share them; parameters and inputs are
not activations and are never counted. Each storage is attributed to the block whose forward created it.

The eager model's repeated blocks (children of an `nn.ModuleList`) are run through the same
`checkpoint_block` the generated code calls (passes/recompute.py), so the policy measured is the one
executed.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autoshard.errors import InputError
from autoshard.ir.plan import RECOMPUTE
from autoshard.passes.recompute import checkpoint_block

__all__ = ["measure_saved_activation_bytes", "repeated_blocks", "saved_activation_bytes_by_block"]

OUTSIDE = "outside blocks"


def repeated_blocks(model: nn.Module) -> list[str]:
    """Module paths of the model's repeated blocks: children of every `nn.ModuleList` with 2 or more."""
    return [
        f"{name}.{i}" if name else str(i)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 1
        for i in range(len(module))
    ]


def measure_saved_activation_bytes(model: nn.Module, inputs: Sequence[Any], recompute_mode: str) -> int:
    """Bytes one forward of `model(*inputs)` keeps for backward with every repeated block run with
    `recompute_mode` ("none", "selective" or "full")."""
    return sum(saved_activation_bytes_by_block(model, inputs, recompute_mode).values())


def saved_activation_bytes_by_block(model: nn.Module, inputs: Sequence[Any], recompute_mode: str) -> dict[str, int]:
    """`measure_saved_activation_bytes` split by the block whose forward created each kept storage
    (`OUTSIDE` for embeddings, final norm, head and loss)."""
    if recompute_mode not in RECOMPUTE:
        raise InputError(f"expected recompute_mode in {RECOMPUTE}, found {recompute_mode!r}")
    blocks = repeated_blocks(model)
    if not blocks:
        raise InputError(f"expected a model with repeated blocks (an nn.ModuleList), found none in {type(model).__name__}")
    not_activations = {
        _key(t) for t in (*model.parameters(), *model.buffers(), *tree_leaves(list(inputs))) if isinstance(t, torch.Tensor)
    }
    tracker = _Tracker()
    with _checkpointed(model, blocks, recompute_mode), _attributed(model, blocks, tracker), tracker:
        out = model(*inputs)
    loss = out if isinstance(out, torch.Tensor) else out[0]
    if not loss.requires_grad:
        raise InputError("expected a forward that builds an autograd graph, found an output without grad_fn")
    not_activations.add(_key(loss))  # the output itself: a scalar loss, not kept for backward
    del out
    gc.collect()
    totals = {block: 0 for block in (*blocks, OUTSIDE)}
    seen = set()
    for key, (ref, nbytes, block) in tracker.created.items():
        if ref.expired() or key in not_activations or key in seen:
            continue
        seen.add(key)
        totals[block] += nbytes
    del loss
    return totals


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.untyped_storage().nbytes() else id(t)


class _Tracker(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns, with the block running."""

    def __init__(self) -> None:
        super().__init__()
        self.block = OUTSIDE
        self.created: dict[int, tuple[StorageWeakRef, int, str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                known = self.created.get(key)
                if known is None or known[0].expired():  # a freed address reused by a new storage
                    self.created[key] = (StorageWeakRef(storage), storage.nbytes(), self.block)
        return out


@contextlib.contextmanager
def _checkpointed(model: nn.Module, blocks: Sequence[str], mode: str) -> Iterator[None]:
    """Each block's forward run through `checkpoint_block(mode)` (unchanged for "none")."""
    if mode == "none":
        yield
        return
    patched = []
    for path in blocks:
        module = model.get_submodule(path)
        original = module.forward

        def forward(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            return checkpoint_block(_original, mode, *args, **kwargs)

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward shows through again


@contextlib.contextmanager
def _attributed(model: nn.Module, blocks: Sequence[str], tracker: _Tracker) -> Iterator[None]:
    handles = []
    for path in blocks:
        module = model.get_submodule(path)

        def enter(_module: nn.Module, _args: Any, _path: str = path) -> None:
            tracker.block = _path

        def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
            tracker.block = OUTSIDE

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
