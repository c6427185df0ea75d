"""The errors autoshard raises for bad input.

Every error is raised where the user's input first enters autoshard and says three things: what was
expected, what was found, and how to fix it. They all derive from :class:`AutoshardError` so callers can
catch autoshard's own complaints apart from bugs.
"""

from __future__ import annotations

__all__ = ["AutoshardError", "CaptureError", "InputError", "ShardingError"]


class AutoshardError(Exception):
    """Base class of every error autoshard raises on purpose."""


class InputError(AutoshardError, TypeError):
    """An argument given to autoshard has the wrong kind, shape or value."""


class CaptureError(AutoshardError):
    """torch.export could not capture the model; the message names the module and source line."""


class ShardingError(AutoshardError):
    """No sharding option of a node could be read or kept; the message names the node, its op and the
    user's source line. It means autoshard (or DTensor) lacks a rule for the op: report it with the line."""
