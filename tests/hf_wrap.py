"""TEMPORARY: zoo models behind a positional forward, until autoshard.capture takes keyword inputs.

autoshard.capture currently accepts positional example inputs only; the zoo's models take keywords
(`input_ids=`, `labels=`, `use_cache=False`). `wrapped(name, batch)` returns a module whose
`forward(*tensors)` passes them on by keyword and returns the loss, with the positional inputs. Delete
this file once keyword-input capture lands, and pass `zoo.inputs(name, batch)` directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import zoo


class W(nn.Module):
    """`m(**dict(zip(keys, args)), **fixed)` and its loss: a positional front to a keyword model."""

    def __init__(self, m: nn.Module, keys: tuple[str, ...], fixed: dict[str, Any]) -> None:
        super().__init__()
        self.m = m
        self.keys = keys
        self.fixed = fixed

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.m(**dict(zip(self.keys, args, strict=True)), **self.fixed)
        if isinstance(out, tuple):  # nanoGPT returns (logits, loss)
            return out[1]
        return out.loss


def wrapped(name: str, batch: int, *, device: str = "cpu", seed: int = 0) -> tuple[W, tuple[torch.Tensor, ...]]:
    """The zoo model `name` behind W, and its example inputs for `batch` rows as a positional tuple."""
    kwargs = zoo.inputs(name, batch, device=device)
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    return W(zoo.build(name, device=device, seed=seed), tuple(tensors), fixed), tuple(tensors.values())
