"""Step hints: pin a block's pipeline stage or its recomputation (MindSpore's `pipeline_stage` and
`recompute()` on cells).

`autoshard.pipeline_stage(module, k)` (or `module.pipeline_stage = k`) puts the module's blocks on stage
k; blocks without a hint follow the stage of the block before them (the first defaults to 0), so hinting
where each stage starts is enough. `autoshard.recompute(module, "full" | "selective" | "none")` pins the
recomputation of the module's blocks. The solver decides both per block (the model's repeated blocks,
`transformer.h.0`, `layers.3`, ...): a hint on a module containing blocks (the whole model, say) applies
to each of them, and a hint on a module inside one block is refused, since it cannot be honoured there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from autoshard.errors import InputError

__all__ = ["block_hints", "pipeline_stage", "recompute", "step_hints"]

M = TypeVar("M", bound=nn.Module)

_RECOMPUTE_ATTR = "_autoshard_recompute"
_MODES = ("none", "selective", "full")


def pipeline_stage(module: M, stage: int) -> M:
    """Run `module`'s blocks on pipeline stage `stage` (0 is the first)."""
    _check_module(module, "pipeline_stage")
    if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
        raise InputError(f"expected a pipeline stage as an int >= 0, found {stage!r}")
    module.pipeline_stage = stage  # a plain attribute, as MindSpore's Cell.pipeline_stage
    return module


def recompute(module: M, mode: str = "full") -> M:
    """Recompute `module`'s blocks in backward: "full", "selective" (cheap ops only) or "none"."""
    _check_module(module, "recompute")
    if mode not in _MODES:
        raise InputError(f"expected recompute mode among {_MODES}, found {mode!r}")
    object.__setattr__(module, _RECOMPUTE_ATTR, mode)
    return module


def step_hints(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Module path -> {"pipeline_stage": k, "recompute": mode} for every hinted module of `model`."""
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        entry: dict[str, Any] = {}
        stage = module.__dict__.get("pipeline_stage")
        if stage is not None:
            if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
                raise InputError(f"{name or 'the model'}.pipeline_stage is {stage!r}; expected an int >= 0")
            entry["pipeline_stage"] = stage
        if (mode := module.__dict__.get(_RECOMPUTE_ATTR)) is not None:
            entry["recompute"] = mode
        if entry:
            found[name] = entry
    return found


def block_hints(
    hints: Mapping[str, Mapping[str, Any]], blocks: Sequence[str]
) -> tuple[tuple[int, ...] | None, tuple[str | None, ...]]:
    """Per block: the pinned recompute mode (or None), and the stage sizes the pipeline hints imply
    (None without pipeline hints)."""
    stage_of: list[int | None] = [None] * len(blocks)
    modes: list[str | None] = [None] * len(blocks)
    for path, entry in hints.items():
        covered = [i for i, b in enumerate(blocks) if not path or b == path or b.startswith(path + ".")]
        if not covered:
            inside = [b for b in blocks if path.startswith(b + ".")]
            where = f"inside block {inside[0]}" if inside else "outside the repeated blocks"
            raise InputError(
                f"the {' and '.join(entry)} hint on {path} cannot be honoured: it is {where}, and "
                f"pipeline stages and recomputation are decided per block ({', '.join(blocks[:3])}, ...). "
                "Put the hint on a block or on a module that contains blocks."
                if blocks else
                f"the {' and '.join(entry)} hint on {path} cannot be honoured: the model has no repeated "
                "blocks (children of an nn.ModuleList) to cut into stages or recompute."
            )
        for i in covered:
            if "pipeline_stage" in entry:
                stage_of[i] = entry["pipeline_stage"]
            if "recompute" in entry:
                modes[i] = entry["recompute"]
    if all(s is None for s in stage_of):
        return None, tuple(modes)
    filled, current = [], 0
    for i, s in enumerate(stage_of):
        current = s if s is not None else current
        if filled and current < filled[-1]:
            raise InputError(
                f"pipeline stage hints go backwards at block {blocks[i]} (stage {current} after "
                f"{filled[-1]}); stages must follow the blocks' order"
            )
        filled.append(current)
    sizes = [filled.count(k) for k in range(filled[-1] + 1)]
    if 0 in sizes:
        raise InputError(f"pipeline stage hints leave stage {sizes.index(0)} without blocks: {filled}")
    return tuple(sizes), tuple(modes)


def _check_module(module: object, what: str) -> None:
    if not isinstance(module, nn.Module):
        raise InputError(f"autoshard.{what} expected an nn.Module, found {type(module).__name__}")
