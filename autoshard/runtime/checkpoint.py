"""Checkpoints on torch.distributed.checkpoint (DCP): sharded, plan-independent, atomic, resumable.

`save_checkpoint(dir, model, optimizer, step=..., sched=...)` writes what exact resume needs:

- the model's state dict and the optimizer's, under the model's own parameter names. Each rank writes
  only its shards (DCP), so no rank ever gathers the model, and the files describe every tensor by its
  global shape and the offsets of each chunk, never by the plan that cut it. A checkpoint saved under one
  plan therefore loads under any other plan and world size, pipelined or not, with or without ZeRO, and
  into the plain single-device model in one process: DCP reads for each rank exactly the chunks its
  placement needs. The optimizer's state is flattened per parameter name
  (`StateDictOptions(flatten_optimizer_state_dict=True)`), so a pipeline rank that holds some
  parameters saves and loads only theirs;
- the user's extras (`**extra`: the step, the LR scheduler's state dict, the data position), as rank 0
  holds them, in `extra.pt`;
- every rank's RNG state (torch's CPU and CUDA generators, Python's `random`), restored on load where
  the loading rank's number was saved, so dropout and sampling continue as if never interrupted;
- `autoshard.json`, the manifest: the size of every file, the parameter names, shapes and dtypes, the
  optimizer's class and the plan's mesh.

Atomic: everything is written into `<dir>.incomplete`; only when every rank has finished does rank 0
write the manifest and rename the directory to `<dir>` (one rename on one file system). A directory
without a manifest, or whose files do not have the manifest's sizes, is refused by `load_checkpoint`, so
an interrupted or truncated save is never mistaken for a complete one. `load_checkpoint` checks the
checkpoint against the model and optimizer before it reads a single tensor, so a refused load leaves
both as they were.

`checkpoint_state_dict(dir)` reads the model's state dict as full tensors in one process, and
`export_checkpoint(dir, path)` writes it as one file (`.safetensors` or a `torch.save` file) for the
original model's `load_state_dict` (for a Hugging Face model, then its `save_pretrained`).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, Placement, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from autoshard.errors import InputError
from autoshard.runtime.fsdp import full_value

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PLAN",
    "checkpoint_state_dict",
    "export_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = 1  # the manifest's "format"; bumped when the layout changes
MANIFEST = "autoshard.json"
PLAN = "plan.json"
INCOMPLETE = ".incomplete"
_EXTRA = "extra.pt"
_RNG = "rng"
_MODEL, _OPTIM = "model.", "optim."
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# ---- saving ---------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    overwrite: bool = False,
    **extra: Any,
) -> Path:
    """Write `model`'s and `optimizer`'s state, every rank's RNG state and `extra` to `directory`
    (see the module docstring); collective: every rank calls it with the same `directory`. `extra`
    values are anything `torch.load(weights_only=True)` reads back (numbers, strings, lists, dicts,
    tensors: a scheduler's `state_dict()`). An existing checkpoint is replaced only with `overwrite=True`.
    Returns the checkpoint's path."""
    final = Path(directory)
    rank = _rank()
    extra_bytes = _extra_bytes(extra)  # bad extras are refused before anything is written
    if final.exists() and not overwrite:
        raise InputError(
            f"expected no checkpoint at {final}, found one; pass overwrite=True to replace it, or save to "
            "another directory"
        )
    partial = final.with_name(final.name + INCOMPLETE)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted save left
        (partial / _RNG).mkdir(parents=True)
        plan = getattr(model, "plan", None)
        if plan is not None:  # the plan it ran, to compile the resumed run with (Plan.load)
            plan.save(partial / PLAN)
    _barrier()
    state = {_MODEL + k: v for k, v in model.state_dict().items()}
    if optimizer is not None:
        state.update({_OPTIM + k: v for k, v in get_optimizer_state_dict(model, optimizer, options=_OPTIONS).items()})
    for key in _strided(state):  # in one order on every rank: each conversion is collective
        state[key] = _as_stored(state[key])
    dcp.save(state, checkpoint_id=str(partial), no_dist=not dist.is_initialized())
    torch.save(_rng_state(), partial / _RNG / f"rank{rank}.pt")
    if rank == 0:
        (partial / _EXTRA).write_bytes(extra_bytes)
    _barrier()  # every rank's files are complete
    if rank == 0:
        manifest = _manifest(partial, model, optimizer)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if final.exists():  # overwrite=True: the old one goes only once the new one is whole
            stale = final.with_name(final.name + ".replaced")
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            partial.rename(final)
            shutil.rmtree(stale)
        else:
            partial.rename(final)
    _barrier()  # no rank goes on (or is killed) before the checkpoint is complete
    return final


def _extra_bytes(extra: Mapping[str, Any]) -> bytes:
    """`extra` as torch.save bytes, refused unless torch.load(weights_only=True) reads it back."""
    buffer = io.BytesIO()
    try:
        torch.save(dict(extra), buffer)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as e:
        kinds = {k: type(v).__name__ for k, v in extra.items()}
        raise InputError(
            f"expected checkpoint extras that torch.load(weights_only=True) reads back (numbers, strings, "
            f"lists, dicts, tensors), found {kinds} ({e}); pass a state_dict() rather than the object"
        ) from None
    return buffer.getvalue()


# ---- layouts DCP cannot describe ------------------------------------------------------------------
#
# DCP describes a rank's part of a DTensor as one box (offsets, sizes) of the global tensor. A
# `_StridedShard` part is several boxes: a fused qkv weight split per projection holds rows of q, k and
# v; FSDP's dp shard of a tp shard holds a piece inside each tp piece. DCP in torch 2.13 writes those
# with wrong offsets (measured: overlapping chunks refused at save). Such a tensor is stored in the
# layout with each `_StridedShard` replaced by a plain `Shard` of its dim (same bytes per rank, one
# box each), so the checkpoint holds the tensor itself and any plan reads it back.


def _strided(state: Mapping[str, Any]) -> list[str]:
    """The keys of DTensors DCP cannot describe, in one order on every rank."""
    return sorted(
        k for k, v in state.items() if isinstance(v, DTensor) and any(isinstance(p, _StridedShard) for p in v.placements)
    )


def _plain(placements: tuple[Placement, ...]) -> list[Placement]:
    return [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in placements]


def _as_stored(t: DTensor) -> DTensor:
    """`t` in the stored layout (collective: the whole value is gathered once, then cut locally)."""
    return distribute_tensor(full_value(t.detach()), t.device_mesh, _plain(t.placements), src_data_rank=None)


def _stored_layout(t: DTensor) -> DTensor:
    """An empty DTensor with `t`'s global shape in the stored layout, for DCP to load into."""
    empty = torch.empty(t.shape, dtype=t.dtype, device=t.to_local().device)
    return distribute_tensor(empty, t.device_mesh, _plain(t.placements), src_data_rank=None)


def _copy_stored(loaded: DTensor, into: DTensor) -> None:
    """Copy `loaded` (stored layout) into `into`'s local shard, in `into`'s own layout (collective)."""
    local = into.to_local()
    values = loaded.full_tensor().reshape(-1)[_positions(into)]
    with torch.no_grad():
        local.copy_(values.view(local.shape))


def _positions(t: DTensor) -> torch.Tensor:
    """For each element of this rank's shard of `t` (flattened), its index in the flattened whole
    tensor. Found by gathering, with full_value (which every layout here is tested against), a DTensor
    of `t`'s layout whose every element holds a code naming its rank and local index: where this
    rank's codes land in the whole tensor is where its elements live."""
    local = t.to_local()
    n = local.numel()
    base = dist.get_rank() * t.numel()
    codes = torch.arange(base, base + n, dtype=torch.int64).view(local.shape)
    whole = full_value(
        DTensor.from_local(codes, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    ).reshape(-1)
    mine = (whole >= base) & (whole < base + n)
    positions = torch.full((n,), -1, dtype=torch.int64)
    positions[whole[mine] - base] = torch.nonzero(mine).reshape(-1)
    assert int(mine.sum()) == n and bool((positions >= 0).all()), f"layout {t.placements} is not a partition"
    return positions


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _manifest(partial: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    metadata = dcp.FileSystemReader(str(partial)).read_metadata()
    plan = getattr(model, "plan", None)
    return {
        "format": FORMAT,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "world_size": _world(),
        "mesh": dict(plan.mesh) if plan is not None else None,
        "pp": plan.training.pp if plan is not None else 1,
        "model": plan.model if plan is not None else type(model).__name__,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "tensors": {
            k[len(_MODEL):]: [list(m.size), str(m.properties.dtype).removeprefix("torch.")]
            for k, m in sorted(metadata.state_dict_metadata.items())
            if k.startswith(_MODEL) and isinstance(m, TensorStorageMetadata)
        },
        "files": {
            str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()
        },
    }


# ---- loading --------------------------------------------------------------------------------------


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` into `model` (a compiled model under any plan,
    or the plain single-device model) and `optimizer` (built over `model.parameters()`, as for
    training), restore this rank's RNG state (unless `rng=False`) and return the extras. Collective
    where a process group exists. The checkpoint is checked against the model and optimizer first
    (names, shapes, dtypes, optimizer state, file sizes); a refused load changes nothing."""
    path = Path(directory)
    manifest = _complete(path)
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    model_state = model.state_dict()
    _check_model(path, manifest, metadata, model_state)
    state = {_MODEL + k: v for k, v in model_state.items()}
    optim_state: dict[str, Any] = {}
    if optimizer is not None:
        _check_optimizer_class(path, manifest, optimizer)
        optim_state = get_optimizer_state_dict(model, optimizer, options=_OPTIONS)  # initialises its state
        _check_optimizer(path, metadata, optim_state)
        state.update({_OPTIM + k: v for k, v in optim_state.items()})
    strided = _strided(state)
    into = {key: state[key] for key in strided}
    state.update({key: _stored_layout(into[key]) for key in strided})
    # in place: each rank reads the chunks its shards need
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    for key in strided:
        _copy_stored(state[key], into[key])
        state[key] = into[key]
    if optimizer is not None:
        loaded = {k[len(_OPTIM):]: v for k, v in state.items() if k.startswith(_OPTIM)}
        set_optimizer_state_dict(model, optimizer, loaded, options=_OPTIONS)
    if rng:
        _restore_rng(path)
    return torch.load(path / _EXTRA, weights_only=True)


def _complete(path: Path) -> dict[str, Any]:
    """The manifest of the complete checkpoint at `path`, whose files have the sizes it records."""
    if not path.is_dir():
        partial = path.with_name(path.name + INCOMPLETE)
        hint = (
            f"; {partial} is a save that did not finish (a crash mid-write): load the checkpoint before it"
            if partial.exists() else "; check the path, or save a checkpoint there first"
        )  # fmt: skip
        raise InputError(f"expected a checkpoint directory at {path}, found none{hint}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise InputError(
            f"expected {path} to be a complete autoshard checkpoint, found no {MANIFEST} in it (a save that "
            "did not finish, or a directory autoshard.save_checkpoint did not write)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"expected {manifest_path} to be JSON, found a damaged file ({e})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(
            f"expected checkpoint format {FORMAT}, found {manifest.get('format')!r} in {manifest_path}; "
            "load it with the autoshard version that wrote it"
        )
    damaged = []
    for name, size in manifest["files"].items():
        f = path / name
        found = f.stat().st_size if f.is_file() else None
        if found != size:
            damaged.append(f"{name}: {size} bytes recorded, {'missing' if found is None else f'{found} found'}")
    if damaged:
        raise InputError(
            f"expected the files of checkpoint {path} as its manifest records them, found "
            f"{len(damaged)} truncated or missing: {'; '.join(damaged[:5])}; the checkpoint is damaged, "
            "load an earlier one"
        )
    return manifest


def _check_model(path: Path, manifest: Mapping[str, Any], metadata: Metadata, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of another model: other names, shapes or dtypes."""
    saved = {k[len(_MODEL):]: m for k, m in metadata.state_dict_metadata.items() if k.startswith(_MODEL)}
    missing = sorted(set(state) - set(saved))
    unexpected = sorted(set(saved) - _everywhere(state))  # a pipeline rank holds its stages' alone
    mismatched = []
    for name in sorted(set(state) & set(saved)):
        m, t = saved[name], state[name]
        if not isinstance(m, TensorStorageMetadata) or not torch.is_tensor(t):
            continue
        if tuple(m.size) != tuple(t.shape) or m.properties.dtype != t.dtype:
            mismatched.append(
                f"{name}: {tuple(m.size)} {m.properties.dtype} saved, {tuple(t.shape)} {t.dtype} in the model"
            )
    if missing or unexpected or mismatched:
        parts = [
            f"{len(missing)} of the model's tensors missing ({', '.join(missing[:4])})" if missing else "",
            f"{len(unexpected)} the model lacks ({', '.join(unexpected[:4])})" if unexpected else "",
            f"{len(mismatched)} of another shape or dtype ({'; '.join(mismatched[:3])})" if mismatched else "",
        ]
        raise InputError(
            f"expected checkpoint {path} (of {manifest.get('model')}) to hold this model's state dict, found "
            f"{', '.join(p for p in parts if p)}; load a checkpoint of this model"
        )


def _check_optimizer_class(path: Path, manifest: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse a checkpoint saved without an optimizer, or with another optimizer class."""
    saved_class = manifest.get("optimizer")
    if saved_class is None:
        raise InputError(
            f"expected checkpoint {path} to hold optimizer state, found none (saved without an optimizer); "
            "pass optimizer=None to load the model alone"
        )
    if saved_class != type(optimizer).__name__:
        raise InputError(
            f"expected checkpoint {path} to hold {type(optimizer).__name__} state, found {saved_class}'s; "
            f"build a {saved_class} to resume, or pass optimizer=None to load the model alone"
        )


def _check_optimizer(path: Path, metadata: Metadata, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint that lacks state of a parameter the optimizer steps (other parameters or
    param groups)."""
    saved = {k[len(_OPTIM):] for k in metadata.state_dict_metadata if k.startswith(_OPTIM)}
    missing = set(state) - saved
    if missing:
        # "state.<name>.exp_avg", "param_groups.<name>.lr": the parameters whose entries are missing
        names = sorted({k.split(".", 1)[1].rsplit(".", 1)[0] for k in missing})
        raise InputError(
            f"expected checkpoint {path} to hold the optimizer's state for every parameter it steps, found "
            f"none for {len(names)} ({', '.join(names[:4])}); build the optimizer over the same parameters "
            "(and param groups) as the run that saved it"
        )


def _restore_rng(path: Path) -> None:
    f = path / _RNG / f"rank{_rank()}.pt"
    if not f.is_file():
        return  # a rank the saving run did not have: its generators stay as they are
    state = torch.load(f, weights_only=False)  # python's random state is a tuple of ints (our own file)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- one process: the single-device state dict ---------------------------------------------------


def checkpoint_state_dict(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The model's state dict in the checkpoint at `directory`, as full CPU tensors under the model's
    names: what the original single-device model's `load_state_dict` takes. Reads in this process
    alone (no process group needed)."""
    path = Path(directory)
    _complete(path)
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in metadata.state_dict_metadata.items()
        if k.startswith(_MODEL) and isinstance(m, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {k[len(_MODEL):]: v for k, v in state.items()}


def export_checkpoint(directory: str | os.PathLike[str], file: str | os.PathLike[str]) -> Path:
    """Write the checkpoint's model state dict (`checkpoint_state_dict`) to `file`: safetensors for a
    `.safetensors` name (tied weights stored once per name), else `torch.save`."""
    out = Path(file)
    state = checkpoint_state_dict(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise InputError("expected the safetensors package for a .safetensors export; pip install safetensors") from None
        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    else:
        torch.save(state, out)
    return out


def latest_checkpoint(parent: str | os.PathLike[str]) -> Path | None:
    """The most recently saved complete checkpoint directly under `parent` (by its manifest's time),
    or None: what a restarted job resumes from. Incomplete saves are never returned."""
    root = Path(parent)
    if not root.is_dir():
        return None
    complete = [d for d in root.iterdir() if d.is_dir() and (d / MANIFEST).is_file()]
    return max(complete, key=lambda d: (d / MANIFEST).stat().st_mtime_ns, default=None)


# ---- the process group, if any --------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _everywhere(keys: Any) -> set[str]:
    """The union of `keys` over every rank (collective where a process group exists)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return set(keys)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(keys))
    return {k for ks in every for k in ks}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
