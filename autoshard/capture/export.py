"""Run torch.export (non-strict) and turn its failures into errors that point at the user's code."""

from __future__ import annotations

import linecache
import os
import traceback
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from autoshard.capture.calls import Call
from autoshard.errors import AutoshardError, CaptureError

__all__ = ["export_model"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_AUTOSHARD_DIR = os.path.dirname(os.path.dirname(__file__))


def export_model(model: nn.Module, call: Call, dynamic_shapes: Any = None) -> ExportedProgram:
    """torch.export.export(model, args, kwargs, strict=False), with failures reported at the user's line."""
    try:
        return torch.export.export(model, call.args, kwargs=dict(call.kwargs), dynamic_shapes=dynamic_shapes, strict=False)
    except AutoshardError:
        raise  # our own hints refused something during tracing: that message is already precise
    except Exception as exc:  # noqa: BLE001 - every export failure is re-raised with a location
        raise CaptureError(_explain(model, exc)) from exc


def _explain(model: nn.Module, exc: BaseException) -> str:
    where = _user_location(model, exc.__traceback__)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (
        f"torch.export could not capture {type(model).__name__}{where}: "
        f"{type(exc).__name__}: {first_line}\n"
        f"How to fix: {_advice(exc)} (the original error is chained below)."
    )


def _user_location(model: nn.Module, tb: TracebackType | None) -> str:
    """' in module `a.b` (Cls) at file:line `code`': the deepest of the model's modules that was running
    (torch's own layers included) and the deepest line of user code, or '' when neither is found."""
    names = {id(m): name for name, m in model.named_modules()}
    module, line = "", ""
    for frame, lineno in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            module = f" in module `{names[id(owner)] or '<root>'}` ({type(owner).__name__})"
        path = frame.f_code.co_filename
        if not path.startswith((_TORCH_DIR, _AUTOSHARD_DIR, "<")):
            code = linecache.getline(path, lineno).strip()
            line = f" at {path}:{lineno}" + (f" `{code}`" if code else "")
    return module + line


def _advice(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}"
    if "data-dependent" in text or "GuardOnDataDependent" in text or "DataDependent" in text:
        return (
            "the forward branches on or sizes a tensor by its values, which cannot be captured on "
            "shape-only tensors; use torch.where / torch.cond, or static sizes"
        )
    if "device" in text and ("meta" in text or "Expected all tensors" in text):
        return "put the model and example inputs on one device (meta is enough for planning)"
    return (
        "make the model's forward capturable by torch.export.export(model, args, strict=False): "
        "no Python side effects on tensor values, no unsupported ops, inputs as tensors"
    )
