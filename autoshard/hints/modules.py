"""Module hints with MindSpore ``Cell.shard`` semantics, the public ``shard`` entry point and ``@shardable``.

``shard(module, in_strategy=((4, 1), None), out_strategy=((2, 1),))`` hints each positional tensor input
(one spec per tensor input, None for one without hint) and each output. The hints are applied by forward
hooks that route those tensors through the ``autoshard::shard`` op, so capture records them as graph nodes
exactly like tensor hints: one mechanism, and the solver sees module hints as constraints on the module's
boundary tensors. Syntax is checked when the hint is written; shapes only exist when the forward runs, so
they are checked there (at capture), naming the module.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from autoshard.errors import InputError
from autoshard.hints.ops import shard_tensor
from autoshard.hints.spec import TensorHint, parse_spec

__all__ = [
    "checking_module_hints",
    "ModuleHints",
    "clear_hints",
    "module_hints",
    "record_module_names",
    "shard",
    "shard_module",
    "shardable",
]

_HINTS_ATTR = "_autoshard_hints"
_HANDLES_ATTR = "_autoshard_hint_handles"

Strategy = tuple[TensorHint | None, ...]
M = TypeVar("M", bound=nn.Module)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModuleHints:
    """The hints on one module's boundary: per positional tensor input and per tensor output.

    None for a whole strategy means that side is not hinted; None for an entry means that tensor is not.
    `name` is the module's qualified name, when known, for error messages.
    """

    in_strategy: Strategy | None = None
    out_strategy: Strategy | None = None
    name: str | None = None

    def label(self, module: nn.Module) -> str:
        """How messages name the module: its qualified name when known, else its class."""
        cls = type(module).__name__
        if self.name is None:
            return f"module {cls}"
        if self.name == "":
            return f"the root module ({cls})"
        return f"module `{self.name}` ({cls})"


def shard_module(
    module: M,
    in_strategy: Any = None,
    out_strategy: Any = None,
    *,
    name: str | None = None,
) -> M:
    """Hint `module`'s inputs and outputs, MindSpore ``Cell.shard`` style; returns the module.

    `in_strategy` has one spec per positional tensor input (None for an input without hint) and
    `out_strategy` one per tensor output (a single tensor output counts as one). Calling again replaces
    the earlier hints. `name` is the module's qualified name for messages; ``record_module_names`` (or
    ``@shardable``) fills it in when not given.
    """
    if not isinstance(module, nn.Module):
        raise InputError(
            f"autoshard.hints.shard_module expected a torch.nn.Module, found {type(module).__name__}; "
            "use autoshard.shard(tensor, spec) for a tensor."
        )
    label = ModuleHints(name=name).label(module)
    if in_strategy is None and out_strategy is None:
        raise InputError(
            f"autoshard.shard on {label} expected in_strategy and/or "
            "out_strategy, found neither; e.g. in_strategy=((4, 1),) for one 2-d input split 4 ways on dim 0. "
            "Use autoshard.hints.clear_hints(module) to remove hints."
        )
    hints = ModuleHints(
        in_strategy=_parse_strategy(in_strategy, "in_strategy", label),
        out_strategy=_parse_strategy(out_strategy, "out_strategy", label),
        name=name if name is not None else getattr(module_hints(module), "name", None),
    )
    clear_hints(module)
    handles: list[RemovableHandle] = []
    if hints.in_strategy is not None:
        # Appended, so it runs after the user's own pre-hooks: the hint is on what forward receives.
        handles.append(module.register_forward_pre_hook(_apply_in_hints))
    if hints.out_strategy is not None:
        # Prepended, so it runs before the user's own hooks: the hint is on what forward returns.
        handles.append(module.register_forward_hook(_apply_out_hints, prepend=True))
    setattr(module, _HINTS_ATTR, hints)
    setattr(module, _HANDLES_ATTR, tuple(handles))
    return module


def module_hints(module: nn.Module) -> ModuleHints | None:
    """The hints set on `module` by ``shard``, or None."""
    return getattr(module, _HINTS_ATTR, None)


def clear_hints(module: nn.Module) -> nn.Module:
    """Remove `module`'s hints and their hooks (a no-op on a module without hints); returns the module."""
    for handle in getattr(module, _HANDLES_ATTR, ()):
        handle.remove()
    for attr in (_HINTS_ATTR, _HANDLES_ATTR):
        if attr in module.__dict__:
            delattr(module, attr)
    return module


def record_module_names(root: nn.Module) -> None:
    """Give every hinted submodule of `root` its qualified name, so shape errors at capture name it.

    A module hinted on its own cannot know where it sits in the model; capture calls this on the model
    it is about to export.
    """
    for qualname, module in root.named_modules():
        hints = module_hints(module)
        if hints is not None and hints.name != qualname:
            setattr(module, _HINTS_ATTR, dataclasses.replace(hints, name=qualname))


_APPLIED: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar("autoshard_applied_hints", default=None)


@contextlib.contextmanager
def checking_module_hints(root: nn.Module) -> Iterator[None]:
    """Around a capture of `root`: afterwards, refuse module hints that never took effect.

    A hint on a module that forward never calls (a layer kept for another task, a module replaced
    after it was hinted) would otherwise vanish without a word: the solver would never see it.
    """
    applied: set[int] = set()
    token = _APPLIED.set(applied)
    try:
        yield
    finally:
        _APPLIED.reset(token)
    unused = [
        (name, module) for name, module in root.named_modules()
        if module_hints(module) is not None and id(module) not in applied
    ]
    if unused:
        labels = ", ".join(module_hints(m).label(m) for _, m in unused)
        raise InputError(
            f"the shard hint on {labels} cannot be honoured: the model's forward never called "
            f"{'that module' if len(unused) == 1 else 'those modules'} on the example inputs; hint a module "
            "forward runs, or remove the hint with autoshard.hints.clear_hints(module)"
        )


def _mark_applied(module: nn.Module) -> None:
    applied = _APPLIED.get()
    if applied is not None:
        applied.add(id(module))


def shard(obj: Any, spec: Any = None, *, in_strategy: Any = None, out_strategy: Any = None) -> Any:
    """Hint how a tensor or a module's boundary tensors should be sharded (a constraint for the solver).

    ``shard(tensor, (4, 1))`` or ``shard(tensor, ("dp", None))`` returns the hinted tensor (use it in
    place of the original); ``shard(module, in_strategy=..., out_strategy=...)`` hints a module's inputs
    and outputs with MindSpore ``Cell.shard`` semantics and returns the module.
    """
    if isinstance(obj, torch.Tensor):
        if in_strategy is not None or out_strategy is not None:
            raise InputError(
                "autoshard.shard on a tensor expected a spec, found in_strategy/out_strategy (those are for "
                "nn.Module); call autoshard.shard(tensor, (4, 1)) instead."
            )
        if spec is None:
            raise InputError(
                f"autoshard.shard on a tensor of shape {tuple(obj.shape)} expected a spec, found none; "
                "e.g. autoshard.shard(x, (4, 1)) or autoshard.shard(x, ('dp', None))."
            )
        return shard_tensor(obj, spec)
    if isinstance(obj, nn.Module):
        if spec is not None:
            raise InputError(
                f"autoshard.shard on module {type(obj).__name__} expected in_strategy=/out_strategy=, found a "
                f"positional spec {spec!r}; write autoshard.shard(module, in_strategy=({spec!r},))."
            )
        return shard_module(obj, in_strategy, out_strategy)
    raise InputError(
        f"autoshard.shard expected a torch.Tensor or a torch.nn.Module, found {type(obj).__name__}; "
        "hint a tensor inside forward, or a module's inputs and outputs."
    )


# --- hooks --------------------------------------------------------------------------------------------


def _apply_in_hints(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    hints = module_hints(module)
    if hints is None or hints.in_strategy is None:
        return None
    _mark_applied(module)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    label = hints.label(module)
    if len(positions) != len(hints.in_strategy):
        raise InputError(
            f"in_strategy of {label} has {_count(len(hints.in_strategy), 'entry', 'entries')}, but the module "
            f"was called with {_count(len(positions), 'positional tensor input')}; expected one entry per positional tensor input "
            "(None for an input without hint). Tensors passed by keyword are not hinted: pass them "
            "positionally or drop their entries."
        )
    out = list(args)
    for k, (i, hint) in enumerate(zip(positions, hints.in_strategy)):
        if hint is not None:
            out[i] = shard_tensor(args[i], hint, where=f"in_strategy[{k}] (positional input {i}) of {label}")
    return tuple(out)


def _apply_out_hints(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    hints = module_hints(module)
    if hints is None or hints.out_strategy is None:
        return None
    _mark_applied(module)
    label = hints.label(module)
    single = isinstance(output, torch.Tensor)
    if not single and not isinstance(output, (tuple, list)):
        raise InputError(
            f"out_strategy of {label} expected the forward to return a tensor or a tuple/list of tensors, "
            f"found {type(output).__name__}; hint the tensors inside forward with autoshard.shard instead."
        )
    items = [output] if single else list(output)
    positions = [i for i, o in enumerate(items) if isinstance(o, torch.Tensor)]
    if len(positions) != len(hints.out_strategy):
        raise InputError(
            f"out_strategy of {label} has {_count(len(hints.out_strategy), 'entry', 'entries')}, but the "
            f"forward returned {_count(len(positions), 'tensor')}; expected one entry per tensor output (None for an output without hint)."
        )
    for k, (i, hint) in enumerate(zip(positions, hints.out_strategy)):
        if hint is not None:
            items[i] = shard_tensor(items[i], hint, where=f"out_strategy[{k}] (output {i}) of {label}")
    if single:
        return items[0]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*items)
    return type(output)(items)


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _parse_strategy(strategy: Any, what: str, label: str) -> Strategy | None:
    if strategy is None:
        return None
    if not isinstance(strategy, (tuple, list)) or any(
        e is not None and not isinstance(e, (tuple, list, TensorHint, str)) for e in strategy
    ):
        raise InputError(
            f"{what} of {label} expected a tuple with one spec (or None) per tensor, e.g. ((4, 1), None), "
            f"found {strategy!r}; for a single tensor wrap its spec: {what}=({strategy!r},)."
        )
    return tuple(
        None if e is None else parse_spec(e, None, where=f"{what}[{k}] of {label}") for k, e in enumerate(strategy)
    )


# --- @shardable -------------------------------------------------------------------------------------


class _BoundHintMethod:
    """A method attached to one module instance (``module.shard(...)``) without touching its class.

    A plain object rather than a bound function so that modules stay picklable and deep-copyable: it
    pickles as (module, function, qualified name), and the module reference resolves through the memo.
    """

    __slots__ = ("function", "method", "module", "name")

    def __init__(self, module: nn.Module, method: str, function: Callable[..., Any], name: str | None) -> None:
        self.module = module
        self.method = method
        self.function = function
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.module, *args, name=self.name, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.module, self.method, self.function, self.name))

    def __repr__(self) -> str:
        return f"<autoshard .{self.method}() of {ModuleHints(name=self.name).label(self.module)}>"


def _shard_method(
    module: M, in_strategy: Any = None, out_strategy: Any = None, *, name: str | None = None
) -> M:
    """Hint this module's inputs and outputs (MindSpore ``Cell.shard``); see autoshard.hints.shard_module."""
    return shard_module(module, in_strategy, out_strategy, name=name)


def _recompute_method(module: M, mode: str = "full", *, name: str | None = None) -> M:
    """Recompute this module's blocks in backward (MindSpore ``Cell.recompute()``)."""
    from autoshard.hints.step import recompute

    return recompute(module, mode)


# The methods @shardable gives each submodule: name -> function(module, *args, name=qualname, **kwargs).
# (`module.pipeline_stage = k` needs no method: it is a plain attribute, read at capture.)
_INSTANCE_METHODS: dict[str, Callable[..., Any]] = {"shard": _shard_method, "recompute": _recompute_method}


def shardable(target: T) -> T:
    """Give every submodule of a model a ``.shard(in_strategy=..., out_strategy=...)`` method.

    As a class decorator, every instance gets the methods at the end of ``__init__`` (for the submodules
    that exist then; decorate subclasses that add more, or call ``shardable(instance)`` again). Applied to
    a module instance, it attaches them now. The methods live on the instances, so torch's own layer
    classes are not changed for anyone else. A submodule whose class or attributes already define the
    name is left alone, with a warning.
    """
    if isinstance(target, nn.Module):
        _attach_methods(target)
        return target
    if not (isinstance(target, type) and issubclass(target, nn.Module)):
        raise InputError(
            f"@shardable expected an nn.Module subclass (or a module instance), found {target!r}; "
            "decorate the model's class definition."
        )
    original_init = target.__init__

    @functools.wraps(original_init)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _attach_methods(self)

    target.__init__ = __init__  # type: ignore[misc]
    return target


def _attach_methods(root: nn.Module) -> None:
    for qualname, module in root.named_modules():
        for method, function in _INSTANCE_METHODS.items():
            current = module.__dict__.get(method)
            taken = (
                getattr(type(module), method, None) is not None
                or method in module._modules
                or method in module._parameters
                or method in module._buffers
                or (current is not None and not isinstance(current, _BoundHintMethod))
            )
            if taken:
                warnings.warn(
                    f"@shardable left {ModuleHints(name=qualname).label(module)} without .{method}: the "
                    f"module already has an attribute called {method!r}; use "
                    f"autoshard.hints.shard_module(module, ...) for it instead.",
                    stacklevel=3,
                )
                continue
            # object.__setattr__: plain instance attribute; nn.Module's __setattr__ would do the same here.
            object.__setattr__(module, method, _BoundHintMethod(module, method, function, qualname))
