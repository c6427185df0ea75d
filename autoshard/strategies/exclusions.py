"""Sharding options DTensor offers but computes wrongly: a table of rules, each with its evidence.

autoshard takes its options from DTensor's rule registry (options.py) and trusts them; the ground
truth in tests/test_strategies_ground_truth.py runs every option -- forward and backward -- on a
simulated world and compares with the unsharded op. Where it finds a rule wrong, the rule goes here
and `filter_options` drops the options it matches, so the planner can never pick them.

A rule is kept whatever torch is installed: dropping a correct option costs speed, keeping a wrong one
costs correctness (silently wrong gradients). `torch_versions` records the versions the rule was measured on,
and tests/test_strategy_exclusions.py re-runs each excluded option and fails once it has become right,
so the table is revisited when torch is upgraded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from autoshard.strategies.mesh import MeshSpec, Partial, Shard

if TYPE_CHECKING:
    from autoshard.strategies.options import ShardingOption

__all__ = ["RULES", "ExclusionRule", "filter_options", "rule_table_markdown"]

aten = torch.ops.aten

# A predicate over one option's placements: (option, mesh or None when unknown) -> matched.
Pattern = Callable[["ShardingOption", MeshSpec | None], bool]


@dataclass(frozen=True, kw_only=True, slots=True)
class ExclusionRule:
    """One DTensor sharding rule known to be wrong for some placements of one op."""

    op: torch._ops.OpOverload  # the aten op as it appears in the exported graph
    placement: str  # the placements the rule drops, in words (what `pattern` tests)
    what: str  # what DTensor computes wrongly, and how it was measured
    torch_versions: tuple[str, ...]  # torch versions (major.minor) on which it was measured wrong
    pattern: Pattern  # True for the options to drop

    def excludes(self, op: object, option: ShardingOption, mesh: MeshSpec | None = None) -> bool:
        """Whether `option` of `op` is one this rule drops (`mesh` tells size-1 axes, which never split)."""
        return op is self.op and self.pattern(option, mesh)


def _split(p: object, axis: int, mesh: MeshSpec | None) -> bool:
    return isinstance(p, Shard) and (mesh is None or mesh.sizes[axis] > 1)


def _mean_of_a_sharded_input(option: ShardingOption, mesh: MeshSpec | None) -> bool:
    """On some mesh axis of size > 1 an input is Shard(d) and the output is P(avg) (reduction='mean')."""
    out = option.output[0] or ()
    return any(
        type(o) is Partial and o.reduce_op == "avg" and any(s is not None and _split(s[axis], axis, mesh) for s in option.inputs)
        for axis, o in enumerate(out)
    )


def _partial_into_unreduced_self(option: ShardingOption, mesh: MeshSpec | None) -> bool:
    """The in-place op's output is Partial on some mesh axis while self (input 0) is Partial on none.

    (With self Partial somewhere, DTensor redistributes self and the values come out right.)"""
    self_spec, out = option.inputs[0] or (), option.output[0] or ()
    return any(type(o) is Partial for o in out) and not any(type(s) is Partial for s in self_spec)


RULES: tuple[ExclusionRule, ...] = (
    ExclusionRule(
        op=aten.mse_loss.default,
        placement="an input Shard(d) on a mesh axis of size > 1 with reduction='mean' (output P(avg) there)",
        what=(
            "the loss is right, but mse_loss_backward divides by the local element count: input gradients "
            "come out (product of the sharded axes' sizes) times too large (x4 for S(0) and S(1) on {dp: 4}, "
            "x2 for (S(0), R) on {dp: 2, tp: 2}); reduction='sum' and 'none', and l1_loss, are right"
        ),
        torch_versions=("2.13",),
        pattern=_mean_of_a_sharded_input,
    ),
    ExclusionRule(
        op=aten.cross_entropy_loss.default,
        placement="an input Shard(d) on a mesh axis of size > 1 with reduction='mean' (output P(avg) there)",
        what=(
            "the mean over non-ignored targets is averaged over ranks as per-rank means: wrong when ranks hold "
            "different numbers of real targets (a padded causal-LM batch: Hugging Face GPT-2 on rows with "
            "-100 padding, under {dp: 4} and {dp: 2, tp: 2}); capture rewrites such a loss to a sum over the "
            "global count (capture/loss_reduction.py), so only a class-weighted mean still meets this rule"
        ),
        torch_versions=("2.13",),
        pattern=_mean_of_a_sharded_input,
    ),
    ExclusionRule(
        op=aten.add_.Tensor,
        placement="output Partial on some mesh axis, self (input 0) Partial on none",
        what=(
            "the in-place add keeps self's placement and does not reduce other's Partial: the "
            "values are wrong (R.add_(P(avg)) gives a + 4b, not a + b, on the simulated 4-rank world, and "
            "a value other than a + b on 4 gloo ranks); out-of-place add with the same placements is right (HF ResNet's `hidden_state += residual`)"
        ),
        torch_versions=("2.13",),
        pattern=_partial_into_unreduced_self,
    ),
)


def filter_options(
    op: object, options: Sequence[ShardingOption], mesh: MeshSpec | None = None
) -> list[ShardingOption]:
    """`options` without those a rule in `RULES` drops; an error if none would be left."""
    rules = [r for r in RULES if r.op is op]
    if not rules:
        return list(options)
    kept = [o for o in options if not any(r.excludes(op, o, mesh) for r in rules)]
    if not kept:
        raise AssertionError(
            f"{op}: every sharding option is excluded by autoshard.strategies.exclusions ({len(options)} offered); "
            "a rule should leave at least the replicated option"
        )
    return kept


def rule_table_markdown() -> str:
    """The rules as a markdown table (docs/architecture.md holds a copy that a test keeps current)."""
    rows = ["| op | placement | what is wrong | torch |", "|---|---|---|---|"]
    for r in RULES:
        cells = (f"`{r.op}`", r.placement, r.what, ", ".join(r.torch_versions))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"

