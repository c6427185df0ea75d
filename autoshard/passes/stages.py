"""Stage split: the generated DTensor graph cut into pipeline stages at block boundaries.

The policy (which stage a node belongs to) is kept apart from the mechanism (building one GraphModule
per stage), as `torch.fx.passes.split_module` does:

- a node inside block `b` (its module path is `training.blocks[b]` or below it) goes to the stage that
  runs block `b` (`Training.stage_blocks`);
- a node outside every block goes with the block before it in graph order: stage 0 if it comes before
  the first block (embeddings), the last stage after the last block (final norm, head), and between
  blocks the stage of the block it follows (a residual add written outside the block);
- codegen's own nodes (`redistribute`, `grad_to`) sit right before their consumer and go with it;
  a `getitem` goes with the node it unpacks;
- *constant* nodes, computed from nothing but factory ops and buffers (LLaMA's RoPE cos/sin tables,
  GPT's position ids), are recomputed on every stage that reads them rather than sent along: they are
  tiny, depend on no input and no parameter, and recomputing them keeps the stage boundary to the
  residual stream alone. A constant subgraph must therefore be deterministic (no random factories);
- the *loss tail*, every node that depends on the targets input (the single user input that no block
  reads), is cut off as its own graph: the pipeline schedule calls it as `loss_fn(output, target)`
  on the last stage, so the targets never travel through the pipeline. The same tail, returning every
  output of the model rather than the loss alone, is the `outputs` graph a forward (evaluation) ends
  with; the last stage also returns the model's outputs it computes that the loss does not read;
- parameters, buffers and constants (the graph's lifted placeholders) are inputs of every stage that
  reads them: a parameter read by two stages (GPT's tied wte / lm_head) is held by both, and the
  runtime sums its gradients after backward (runtime/schedule.py).

A value produced on stage i and read on stage j > i + 1 is passed through the stages in between, since
a pipeline stage only receives from its predecessor.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx import Graph, GraphModule, Node

from autoshard.errors import InputError
from autoshard.ir.graph import GraphIR
from autoshard.ir.plan import Training
from autoshard.passes.codegen import grad_to, redistribute

__all__ = ["StageGraph", "StageSplit", "split_stages", "whole_program"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StageGraph:
    """One piece of the split graph: its GraphModule takes `state` (lifted parameter / buffer / constant
    placeholders, by name) and then `inputs` (values from the previous piece, or user inputs on stage 0),
    and returns `outputs` (values for the next piece) as a tuple."""

    graph_module: GraphModule
    state: tuple[str, ...]  # placeholder names of parameters, buffers and constants it reads
    inputs: tuple[str, ...]  # names of the values it receives, in argument order
    outputs: tuple[str, ...]  # names of the values it returns, in order


@dataclass(frozen=True, kw_only=True, slots=True)
class StageSplit:
    stages: tuple[StageGraph, ...]  # pp * virtual_stages of them, in pipeline order
    loss: StageGraph  # inputs: the last stage's outputs, then the target
    outputs: StageGraph  # the loss's inputs; returns the model's outputs (USER_OUTPUT), in order
    target: str  # the user input the loss reads (placeholder name)
    unreachable: tuple[str, ...]  # model outputs made before the last stage: a forward cannot return them


def whole_program(gm: GraphModule, ir: GraphIR) -> StageGraph:
    """Codegen's GraphModule `gm` as the one stage of a plan without pipelining: it takes every lifted
    placeholder as state and every user input, and returns every output of the graph."""
    if ir.exported is None:
        raise InputError("expected a GraphIR that keeps its ExportedProgram, found one without; capture the model")
    kinds = {s.arg.name: s.kind for s in ir.exported.graph_signature.input_specs}
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    values = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    return StageGraph(
        graph_module=gm,
        state=tuple(n for n in placeholders if kinds.get(n) is not InputKind.USER_INPUT),
        inputs=tuple(n for n in placeholders if kinds.get(n) is InputKind.USER_INPUT),
        outputs=tuple(getattr(v, "name", str(v)) for v in values),
    )


def split_stages(gm: GraphModule, ir: GraphIR, training: Training) -> StageSplit:
    """Cut codegen's GraphModule `gm` (for graph `ir`) into `len(training.stages)` stages and a loss tail."""
    if ir.exported is None:
        raise InputError("expected a GraphIR that keeps its ExportedProgram, found one without; capture the model")
    n = len(training.stages)
    kinds = {s.arg.name: s.kind for s in ir.exported.graph_signature.input_specs}
    nodes = list(gm.graph.nodes)
    placeholders = [p for p in nodes if p.op == "placeholder"]
    state = {p for p in placeholders if kinds.get(p.name) is not InputKind.USER_INPUT}
    # an input nothing reads (a constant argument such as use_cache=False) is fed to no stage
    user_inputs = [p for p in placeholders if p not in state and p.users]
    block_of = _block_index(ir, training.blocks)

    params = {p for p in state if kinds[p.name] is InputKind.PARAMETER}
    constant = _constant_nodes(nodes, state - params)
    target = _target_input(user_inputs, block_of)
    tail = _downstream(target)
    output = nodes[-1]
    loss_value = _loss_value(output, tail, ir.loss.index if ir.loss is not None else None)

    # ---- policy: a stage per node (n stands for the loss tail) --------------------------------------
    block_stage = {b: s for s in range(n) for b in training.stage_blocks(s)}
    preceding: dict[Node, int] = {}  # the stage of the last block node before each node in graph order
    current = 0
    for node in nodes:
        if (b := block_of(node)) is not None:
            current = block_stage[b]
        preceding[node] = current
    stage: dict[Node, int] = {}
    for node in reversed(nodes):  # consumers before producers: codegen's nodes follow their consumer
        if node in state or node in constant or node is output:
            continue
        if node.op == "placeholder" and not node.users:
            continue  # an input nothing reads (use_cache=False): no stage holds it
        if node in tail:
            stage[node] = n
        elif node.op == "placeholder":
            stage[node] = 0
        elif (b := block_of(node)) is not None:
            stage[node] = block_stage[b]
        elif node.target in (redistribute, grad_to):
            stage[node] = min((min(stage.get(u, n), n - 1) for u in node.users), default=n - 1)
        else:
            stage[node] = preceding[node]
    for node in nodes:  # a getitem travels with the tuple it unpacks
        if node.op == "call_function" and node.target is operator.getitem and node in stage:
            source = node.args[0]
            if isinstance(source, Node) and source in stage:
                stage[node] = stage[source]
    for node, s in stage.items():
        for src in node.all_input_nodes:
            if src in stage and stage[src] > s:
                raise InputError(
                    f"node {node.name} (stage {s}) reads {src.name} from the later stage {stage[src]}; "
                    "the blocks named in the plan's training.blocks must be listed in execution order"
                )

    # ---- mechanism: one graph per stage ---------------------------------------------------------------
    def values_crossing(k: int) -> list[Node]:
        """Values made on stages <= k that a later stage (or the loss) reads."""
        return [v for v in nodes if v in stage and stage[v] <= k and any(stage.get(u, -1) > k for u in v.users)]

    boundaries = [values_crossing(k) for k in range(n)]
    # the model's outputs: the tensors the last stage makes it returns too, so a forward can return them
    # with what the tail computes; one made earlier cannot be returned (a forward refuses; training
    # needs the loss alone)
    kinds_out = [s.kind for s in ir.exported.graph_signature.output_specs]
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    user_outputs = [v for v, k in zip(values, kinds_out, strict=True) if k is OutputKind.USER_OUTPUT]
    extras = [
        v for v in user_outputs
        if isinstance(v, Node) and stage.get(v) == n - 1 and v not in boundaries[-1] and _is_tensor(v)
    ]  # fmt: skip
    boundaries[-1] = [*boundaries[-1], *extras]
    made = {*boundaries[-1], *(v for v in stage if stage[v] == n)}
    unreachable = tuple(v.name for v in user_outputs if isinstance(v, Node) and v not in made)
    stage_inputs = [[p for p in user_inputs if p is not target], *boundaries[:-1]]
    pieces = []
    for k in range(n):
        members = [v for v in nodes if stage.get(v) == k]
        pieces.append(_build(gm, nodes, members, stage_inputs[k], boundaries[k], state, constant))
    loss_members = [v for v in nodes if stage.get(v) == n and v is not target]
    loss = _build(gm, nodes, loss_members, [*boundaries[-1], target], [loss_value], state, constant)
    forward_outputs = [loss_value] if unreachable else user_outputs
    outputs = _build(gm, nodes, loss_members, [*boundaries[-1], target], forward_outputs, state, constant)
    if loss.state and any(kinds[name] is InputKind.PARAMETER for name in loss.state):
        raise InputError(
            f"the loss reads parameters {list(loss.state)}; expected a loss computed from the model's output "
            "and the targets alone (a pipeline's loss function holds no parameters)"
        )
    return StageSplit(stages=tuple(pieces), loss=loss, outputs=outputs, target=target.name, unreachable=unreachable)


def _block_index(ir: GraphIR, blocks: Sequence[str]):  # -> Callable[[Node], int | None]
    module_of = {info.name: info.module for info in ir.nodes}
    found = {b: False for b in blocks}

    def block_of(node: Node) -> int | None:
        module = module_of.get(node.name, "")
        for i, b in enumerate(blocks):
            if module == b or module.startswith(b + "."):
                return i
        return None

    for info in ir.nodes:
        for b in blocks:
            if info.module == b or info.module.startswith(b + "."):
                found[b] = True
    if missing := [b for b, ok in found.items() if not ok]:
        raise InputError(
            f"the plan's training.blocks name modules that run no op in the captured graph: {missing}; "
            "expected module paths of the model's repeated blocks, e.g. 'transformer.h.0'"
        )
    return block_of


def _constant_nodes(nodes: Sequence[Node], buffers: set[Node]) -> set[Node]:
    """call_function nodes computed from factory ops and buffers / constants only (no parameter, no input)."""
    constant: set[Node] = set()
    for node in nodes:
        if node.op == "call_function" and all(src in constant or src in buffers for src in node.all_input_nodes):
            constant.add(node)
    return constant


def _target_input(user_inputs: Sequence[Node], block_of) -> Node:
    loss_only = [p for p in user_inputs if not any(block_of(v) is not None for v in _downstream(p))]
    if len(loss_only) != 1:
        raise InputError(
            f"expected exactly one user input that only the loss reads (the targets), found "
            f"{[p.name for p in loss_only]} among {[p.name for p in user_inputs]}; a pipelined model's "
            "forward(inputs..., targets) must return the loss"
        )
    return loss_only[0]


def _downstream(start: Node) -> set[Node]:
    seen = {start}
    todo = [start]
    while todo:
        for user in todo.pop().users:
            if user.op != "output" and user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


def _loss_value(output: Node, tail: set[Node], index: int | None) -> Node:
    """The loss among the graph's outputs (`index`, found at capture; the only output when None). A
    pipeline trains on the loss alone: the model's other outputs (logits) are not returned."""
    values = output.args[0]
    values = values if isinstance(values, (tuple, list)) else (values,)
    if index is None and len(values) == 1:
        index = 0
    if index is None or values[index] not in tail:
        raise InputError(
            f"expected the model to return its loss, computed from the targets; found outputs "
            f"{[getattr(v, 'name', v) for v in values]}; a pipelined model's forward must return the scalar loss "
            "(alone, as a ModelOutput's `loss`, or as the one scalar of a tuple)"
        )
    return values[index]


def _is_tensor(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _build(
    gm: GraphModule,
    nodes: Sequence[Node],
    members: Sequence[Node],
    inputs: Sequence[Node],
    outputs: Sequence[Node],
    state: set[Node],
    constant: set[Node],
) -> StageGraph:
    """A GraphModule running `members` (plus the constant nodes they need, recomputed) on `inputs`."""
    include = set(members)
    todo = list(members) + list(outputs)
    while todo:  # the constants the members read, transitively
        for src in todo.pop().all_input_nodes:
            if src in constant and src not in include:
                include.add(src)
                todo.append(src)
    used_state = [p for p in nodes if p in state and any(u in include for u in p.users)]
    graph = Graph()
    env: dict[Node, Node] = {}
    for p in (*used_state, *inputs):
        env[p] = graph.placeholder(p.name)
        env[p].meta = dict(p.meta)
    for node in nodes:
        if node in include and node not in env:
            env[node] = graph.node_copy(node, lambda a: env[a])
    for out in outputs:
        if isinstance(out, Node) and out not in env:
            raise InputError(f"stage output {out.name} is neither computed nor received by the stage")
    graph.output(tuple(env[o] if isinstance(o, Node) else o for o in outputs))
    graph.lint()
    return StageGraph(
        graph_module=GraphModule(gm, graph),
        state=tuple(p.name for p in used_state),
        inputs=tuple(p.name for p in inputs),
        outputs=tuple(o.name if isinstance(o, Node) else repr(o) for o in outputs),
    )
