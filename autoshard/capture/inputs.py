"""Checks on what the user hands to `autoshard.capture`, done before torch sees any of it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoshard.capture.calls import Call
from autoshard.errors import InputError

__all__ = ["model_device", "normalize_inputs"]

# Leaves torch.export accepts as example inputs besides tensors: they become constants of the graph.
_CONSTANT_LEAVES = (int, float, bool, type(None))


def model_device(model: object) -> torch.device:
    """The single device the model's parameters live on; refuse non-modules and parameterless models."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"autoshard.capture expected a torch.nn.Module, found {type(model).__name__}; "
            "pass the model object itself (not its state_dict or a function)."
        )
    devices = {p.device for p in model.parameters()}
    if not devices:
        raise InputError(
            f"{type(model).__name__} has no parameters, so there is nothing to shard or train; "
            "autoshard plans models with parameters. Check that layers are registered as submodules "
            "(assigned as attributes or held in nn.ModuleList, not a plain Python list)."
        )
    if len(devices) > 1:
        found = ", ".join(sorted(str(d) for d in devices))
        raise InputError(
            f"{type(model).__name__} has parameters on several devices ({found}); autoshard expected one. "
            "Build the model on a single device, e.g. under `with torch.device('meta'):`."
        )
    return devices.pop()


def normalize_inputs(call: Call, device: torch.device) -> Call:
    """The call with its leaves on the model's device, refusing leaves export cannot take.

    Only shapes and dtypes matter for capture, so a tensor on another device is replaced by an
    uninitialised tensor of the same shape on the model's device (free on meta). So is a tensor passed
    a second time (`model(idx, idx)`): export would merge the two inputs into one placeholder, and a
    capture at another batch size (separate tensors) would then be another graph.
    """
    args = tuple(_normalize_leaf(x, f"example_inputs[{i}]", device) for i, x in enumerate(call.args))
    kwargs = {k: _normalize_leaf(v, f"example_inputs[{k!r}]", device) for k, v in call.kwargs.items()}
    seen: set[int] = set()

    def once(x: torch.Tensor) -> torch.Tensor:
        if id(x) in seen:
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        seen.add(id(x))
        return x

    return Call(args=args, kwargs=kwargs).map_tensors(once)


def _normalize_leaf(x: object, where: str, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        if x.device == device:
            return x
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    if isinstance(x, (list, tuple)):
        return type(x)(_normalize_leaf(v, f"{where}[{i}]", device) for i, v in enumerate(x))
    if isinstance(x, dict):
        return {k: _normalize_leaf(v, f"{where}[{k!r}]", device) for k, v in x.items()}
    if isinstance(x, _CONSTANT_LEAVES):
        return x
    raise InputError(
        f"{where} is a {type(x).__name__}; autoshard expected a torch.Tensor (or an int, float, bool or "
        "None, or a list/tuple/dict of those). Convert it first, e.g. torch.as_tensor(value)."
    )
