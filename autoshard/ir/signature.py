"""A hashable stand-in for an op's arguments, so identical ops on identical shapes are priced once.

Repeated layers run the same ops on the same shapes: capture counts their FLOPs once and strategies
derive their sharding options once, both keyed by this signature."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

__all__ = ["arg_signature"]


def arg_signature(x: Any) -> Any:
    """Tensors (and graph nodes, by their meta value) by shape, stride and dtype; containers recursively."""
    if isinstance(x, Node):
        x = x.meta.get("val")
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(arg_signature(e) for e in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, arg_signature(v)) for k, v in sorted(x.items())))
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(x)
    return x
