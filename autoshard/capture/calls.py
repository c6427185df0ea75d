"""How a model is called and what it returns: keyword inputs in, the loss found among the outputs.

Users call Hugging Face models with keywords (`model(input_ids=..., labels=...)`) and get a ModelOutput
back whose `.loss` is the loss; nanoGPT returns `(logits, loss)`; a plain model may return the scalar
loss alone. autoshard takes the model as it is called: example inputs are a tuple of positional
arguments, a dict of keyword arguments, or a tensor, and `train_step` takes the same.

The exported graph takes its user inputs as one flat list: the leaves of `(args, kwargs)` in
torch.export's order (`ExportedProgram.call_spec.in_spec`). `flatten_call` turns a later call into that
list and refuses a call of another shape, or a non-tensor argument that differs from the one captured
(the graph has it baked in as a constant: passing another value would be silently ignored).

`find_loss` reads the graph's output spec: a scalar output; else the `loss` entry of a ModelOutput or
dict; else the single scalar of a tuple. It returns the loss's position among the graph's outputs
(buffer mutations, such as BatchNorm's running statistics, come first there) or says what it found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export._tree_utils import reorder_kwargs
from torch.export.graph_signature import OutputKind
from torch.utils import _pytree as pytree

from autoshard.errors import InputError

__all__ = ["Call", "LossOutput", "as_call", "eager_loss", "find_loss", "flatten_call"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Call:
    """A model call: positional and keyword arguments."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]

    def map_tensors(self, fn: Any) -> Call:
        """The same call with every tensor leaf replaced by `fn(tensor)`."""
        args, kwargs = pytree.tree_map_only(torch.Tensor, fn, (self.args, dict(self.kwargs)))
        return Call(args=tuple(args), kwargs=kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, dict(self.kwargs))) if isinstance(x, torch.Tensor)]


def as_call(example_inputs: Any, kwargs: Mapping[str, Any] | None = None) -> Call:
    """`example_inputs` (a tensor, a tuple of positional arguments or a dict of keyword arguments) and
    any extra keywords as one Call."""
    extra = dict(kwargs or {})
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise InputError(
                "expected example_inputs as a dict of keyword arguments (str keys), found keys "
                f"{[type(k).__name__ for k in example_inputs if not isinstance(k, str)]}"
            )
        return Call(args=(), kwargs={**example_inputs, **extra})
    if isinstance(example_inputs, torch.Tensor):
        return Call(args=(example_inputs,), kwargs=extra)
    if isinstance(example_inputs, (tuple, list)):
        return Call(args=tuple(example_inputs), kwargs=extra)
    raise InputError(
        "autoshard expected example_inputs as a tensor, a tuple of the forward's positional arguments or a "
        f"dict of its keyword arguments, found {type(example_inputs).__name__}; e.g. `(idx, targets)` or "
        "`{'input_ids': ids, 'labels': labels}`."
    )


def flatten_call(exported: ExportedProgram, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """The user inputs of the exported graph, in its order, for a call `model(*args, **kwargs)`."""
    in_spec = exported.call_spec.in_spec
    expected_kw = list(in_spec.child(1).context) if in_spec is not None else []
    if set(kwargs) != set(expected_kw) or len(args) != in_spec.child(0).num_children:
        raise InputError(
            f"expected the call the model was compiled with: {in_spec.child(0).num_children} positional "
            f"argument(s) and keywords {sorted(expected_kw)}; found {len(args)} positional and keywords "
            f"{sorted(kwargs)}; pass the same arguments as the example inputs"
        )
    leaves, spec = pytree.tree_flatten((tuple(args), reorder_kwargs(dict(kwargs), in_spec)))
    if spec != in_spec:
        raise InputError(
            f"expected inputs structured as the example inputs ({in_spec}), found {spec}; "
            "pass the same kinds of arguments (tensors, lists, dicts) as at compile time"
        )
    captured = _captured_constants(exported)
    for i, (leaf, path) in enumerate(zip(leaves, _leaf_paths(args, kwargs, in_spec), strict=True)):
        if i in captured and not isinstance(leaf, torch.Tensor) and leaf != captured[i]:
            raise InputError(
                f"argument {path} is {leaf!r}, but the model was captured with {captured[i]!r}; a non-tensor "
                "argument is part of the compiled program; compile again with this value"
            )
    return tuple(leaves)


def _captured_constants(exported: ExportedProgram) -> dict[int, Any]:
    """Flat user-input position -> the non-tensor value captured there."""
    from torch.export.graph_signature import ConstantArgument, InputKind

    user = [s for s in exported.graph_signature.input_specs if s.kind is InputKind.USER_INPUT]
    return {i: s.arg.value for i, s in enumerate(user) if isinstance(s.arg, ConstantArgument)}


def _leaf_paths(args: Sequence[Any], kwargs: Mapping[str, Any], in_spec: Any) -> list[str]:
    pairs, _ = pytree.tree_flatten_with_path((tuple(args), reorder_kwargs(dict(kwargs), in_spec)))
    return [pytree.keystr(p) for p, _ in pairs]


@dataclass(frozen=True, kw_only=True, slots=True)
class LossOutput:
    """Where the loss is among the graph's outputs (None: not found), and how the outputs looked."""

    index: int | None  # position among the graph output node's values (buffer mutations included)
    found: str  # e.g. "CausalLMOutputWithPast(loss, logits)" or "tuple(logits [8, 16, 128], loss [])"
    how: str  # "scalar", "loss entry", "single scalar of a tuple", or why nothing was found
    reduction: Any = None  # how it reduces the batch (capture/loss_reduction.py), set by capture


def find_loss(exported: ExportedProgram) -> LossOutput:
    """Find the scalar loss among the model's outputs (see the module docstring for the rules)."""
    specs = exported.graph_signature.output_specs
    output = next(n for n in exported.graph.nodes if n.op == "output")
    values = list(output.args[0])
    user = [i for i, s in enumerate(specs) if s.kind is OutputKind.USER_OUTPUT]
    out_spec = exported.call_spec.out_spec
    leaf_names = _leaf_names(out_spec, len(user))

    def describe(k: int) -> str:
        v = values[user[k]]
        val = v.meta.get("val") if hasattr(v, "meta") else v
        shape = f" {list(val.shape)}" if isinstance(val, torch.Tensor) else f" = {val!r}"
        return f"{leaf_names[k]}{shape}"

    if out_spec is not None and out_spec.is_leaf() and len(user) == 1:
        found = "one tensor" + describe(0).removeprefix(leaf_names[0])
    else:
        found = f"{_type_name(out_spec)}({', '.join(describe(k) for k in range(len(user)))})"

    def scalar(k: int) -> bool:
        v = values[user[k]]
        val = v.meta.get("val") if hasattr(v, "meta") else None
        return isinstance(val, torch.Tensor) and val.numel() == 1 and val.dtype.is_floating_point

    if len(user) == 1 and scalar(0):
        return LossOutput(index=user[0], found=found, how="scalar")
    if "loss" in leaf_names:
        k = leaf_names.index("loss")
        if scalar(k):
            return LossOutput(index=user[k], found=found, how="loss entry")
        return LossOutput(index=None, found=found, how="its `loss` entry is not a scalar floating tensor")
    scalars = [k for k in range(len(user)) if scalar(k)]
    if len(scalars) == 1:
        return LossOutput(index=user[scalars[0]], found=found, how="single scalar of a tuple")
    why = "no scalar floating output" if not scalars else f"{len(scalars)} scalar outputs, none named `loss`"
    return LossOutput(index=None, found=found, how=why)


def _type_name(spec: Any) -> str:
    t = getattr(spec, "type", None)
    return getattr(t, "__name__", "output") if t is not None else "output"


def _leaf_names(spec: Any, n: int) -> list[str]:
    """A name per output leaf: the key of a dict/ModelOutput entry, else its position."""
    if spec is None:
        return [str(i) for i in range(n)]
    names: list[str] = []

    def walk(s: Any, name: str) -> None:
        if s.is_leaf():
            names.append(name)
            return
        context = s.context if isinstance(s.context, (list, tuple)) else None
        for i in range(s.num_children):
            key = str(context[i]) if context is not None and i < len(context) else str(i)
            walk(s.child(i), key if not name else f"{name}.{key}")

    walk(spec, "")
    return names if len(names) == n else [str(i) for i in range(n)]


def eager_loss(output: Any) -> torch.Tensor:
    """The loss in what an eager forward returned, by the rules `find_loss` applies to the graph."""

    def scalar(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype.is_floating_point

    if scalar(output):
        return output
    if isinstance(output, Mapping) and "loss" in output and scalar(output["loss"]):
        return output["loss"]  # a ModelOutput is a Mapping too
    if isinstance(output, (tuple, list)):
        scalars = [x for x in output if scalar(x)]
        if len(scalars) == 1:
            return scalars[0]
    raise InputError(f"expected the model to return its loss, found {type(output).__name__}")
