"""Recomputation per block: a block's generated code outlined into a submodule called through checkpoint.

`plan.training.recompute[i]` names the mode of block `plan.training.blocks[i]` (a module path such as
`transformer.h.0`):

- "full": `torch.utils.checkpoint` keeps only the block's inputs; backward runs its forward again.
- "selective": checkpoint with a selective policy (`create_selective_checkpoint_contexts`): outputs of
  matmul-class ops (mm, addmm, bmm, linear, scaled-dot-product attention) are saved, everything else
  (norms, activations, softmax, elementwise, views, collectives) is recomputed. Matmuls are most of a
  block's FLOPs, the rest most of its saved bytes (Korthikanti et al. 2022 make the same trade).

The pass outlines, per block, the nodes from the first to the last whose module path lies in the
block (a contiguous run in graph order is convex, so outlining it is always correct; redistributions
codegen inserted in between belong to it) into a GraphModule `self.<block>` and replaces them with
`checkpoint_block(self.<block>, "<mode>", *inputs)`, which the printed code shows.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from autoshard.errors import InputError
from autoshard.ir.plan import Training

__all__ = ["SAVED_OPS", "block_modes", "checkpoint_block", "outline_blocks", "selective_policy"]

_aten = torch.ops.aten
# Ops whose outputs selective recomputation keeps. Dispatch sees ops after CompositeImplicit
# decomposition: `linear` arrives as mm/addmm (listed anyway for completeness), SDPA as its CPU/GPU kernel.
SAVED_OPS = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.linear.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
    }
)


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save matmul-class outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(selective_policy)


@torch.fx.wrap
def checkpoint_block(block: Callable[..., Any], mode: str, *inputs: Any, **kwargs: Any) -> Any:
    """`block(*inputs, **kwargs)` with its activations recomputed in backward: mode "full" or "selective";
    "none" calls it plainly (a block outlined only to be its own module, for FSDP2: runtime/fsdp.py)."""
    if mode not in ("none", "full", "selective"):
        raise InputError(f"expected recompute mode 'none', 'full' or 'selective', found {mode!r}")
    if mode == "none" or not torch.is_grad_enabled():
        return block(*inputs, **kwargs)
    context = {"context_fn": _selective_contexts} if mode == "selective" else {}
    return checkpoint(block, *inputs, use_reentrant=False, **context, **kwargs)


def in_block(module: str, block: str) -> bool:
    return module == block or module.startswith(block + ".")


def outline_blocks(
    gm: GraphModule,
    modes: Mapping[str, str],
    module_of: Mapping[str, str],
    *,
    on_generate_code: Callable[[Graph], None] | None = None,
) -> list[str]:
    """Outline every block in `modes` and call it through `checkpoint_block`.

    `modes` maps block paths (`training.blocks`, or the blocks of one pipeline stage) to their recompute
    mode (`block_modes`); a block given mode "none" is outlined and called plainly. `module_of` maps node names to module paths (the capture's, from the GraphIR).
    Returns the names of the submodules added. `on_generate_code(graph)` is applied to each outlined
    graph (the caller's comment writer).
    """
    added = []
    for block, mode in modes.items():
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        members = [k for k, n in enumerate(nodes) if in_block(module_of.get(n.name, ""), block)]
        if not members:
            raise InputError(
                f"recompute {mode!r} is planned for block {block!r}, but no node of the graph comes from a "
                f"module under that path; expected module paths such as {sorted(set(module_of.values()))[:3]}"
            )
        region = nodes[members[0] : members[-1] + 1]
        name = block.replace(".", "_")
        _outline(gm, region, name, mode, on_generate_code)
        added.append(name)
    if added:
        gm.graph.lint()
        gm.recompile()
    return added


def block_modes(training: Training, blocks: Iterable[int] | None = None, *, every: bool = False) -> dict[str, str]:
    """{block path: recompute mode} for the blocks numbered `blocks` (default: all) that recompute, or
    for all of them with `every` (then "none" where a block does not recompute)."""
    chosen = range(len(training.blocks)) if blocks is None else blocks
    modes = {training.blocks[i]: training.recompute_of(i) for i in chosen}
    return modes if every else {b: m for b, m in modes.items() if m != "none"}


def _outline(
    gm: GraphModule, region: Sequence[Node], name: str, mode: str, on_generate_code: Callable[[Graph], None] | None
) -> None:
    inside = set(region)
    inputs: dict[Node, None] = {}
    for n in region:
        for src in n.all_input_nodes:
            if src not in inside:
                inputs.setdefault(src)
    outputs = [n for n in region if any(user not in inside for user in n.users)]

    sub = Graph()
    env: dict[Node, Node] = {}
    for src in inputs:
        env[src] = sub.placeholder(src.name)
        env[src].meta = dict(src.meta)
    for n in region:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[o] for o in outputs))
    if on_generate_code is not None:
        on_generate_code(sub)
    gm.add_submodule(name, GraphModule(gm, sub, class_name=name))

    graph = gm.graph
    with graph.inserting_before(region[0]):
        block = graph.get_attr(name)
        call = graph.call_function(checkpoint_block, (block, mode, *inputs))
        results = [graph.call_function(operator.getitem, (call, k)) for k in range(len(outputs))]
    for out, new in zip(outputs, results, strict=True):
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
    for n in reversed(region):
        graph.erase_node(n)

