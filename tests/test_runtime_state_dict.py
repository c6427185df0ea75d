"""full_state_dict and the gather under it, on 4 simulated ranks (LocalTensorMode, as tests/test_runtime_sim.py).

The ground truth is the tensor that was sharded: `full_value` of any placement a parameter can have must
give back exactly what `distribute_tensor` (the plan's placements) or FSDP2 (ZeRO's dp shards) split.
A dim sharded over two axes is the case where the order of the gathers matters: DTensor splits it over
axis 0 first and over axis 1 inside each piece, while FSDP splits its dp shard inside what the later axes
leave (`_StridedShard` on dp).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

import autoshard
from autoshard.runtime import compile
from autoshard.runtime.fsdp import full_value
from test_runtime_sim import WORLD, check_matches, fake_world, forced, local_mode, make, value  # noqa: F401

PLAIN = (Replicate(), Shard(0), Shard(1))
FUSED = _StridedShard(0, split_factor=3)  # a fused qkv's column split (strategies/fused_split.py)
# every plain pair, and the fused split beside each plain placement on the other axis; not (FUSED, S(0)):
# torch 2.13's own full_tensor fails on it (an unpad check), so no runtime can gather it through DTensor
PLAN_PLACEMENTS = [
    *itertools.product(PLAIN, repeat=2),
    *((p, FUSED) for p in PLAIN),
    (FUSED, Replicate()),
    (FUSED, Shard(1)),
]


def _original() -> torch.Tensor:
    # 12 x 8: every split above is even (12 = 3 chunks x 2 x 2), and every entry is distinct
    return torch.arange(12 * 8, dtype=torch.float32).reshape(12, 8)


def _mesh():
    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))


@pytest.mark.parametrize("placements", PLAN_PLACEMENTS, ids=lambda ps: "-".join(map(str, ps)))
def test_full_value_inverts_distribute_tensor(fake_world, placements: tuple[Placement, ...]) -> None:
    with local_mode():
        sharded = distribute_tensor(_original(), _mesh(), placements)
        full = value(full_value(sharded))
    torch.testing.assert_close(full, _original(), rtol=0, atol=0)


def _fsdp_shard(t: DTensor) -> DTensor:
    """What FSDP2's SPMD-mesh mode (torch/distributed/fsdp/_fully_shard/_fsdp_param.py) makes of a parameter
    that is Replicate on dp: each rank keeps chunk `dp rank` of its local tensor along dim 0, and the dp
    placement is `_StridedShard(0, split_factor=s)` with s the split later axes make of dim 0 (else Shard(0))."""
    from torch.distributed._local_tensor import tensor_map

    mesh = t.device_mesh
    dp = mesh.size(0)
    local = tensor_map(t.to_local(), lambda r, x: x.chunk(dp, dim=0)[_dp_coordinate(mesh, r)].clone())
    later = 1
    for i, p in enumerate(t.placements[1:], start=1):
        if isinstance(p, (Shard, _StridedShard)) and p.dim == 0:
            later *= mesh.size(i)
    on_dp = _StridedShard(0, split_factor=later) if later > 1 else Shard(0)
    placements = (on_dp, *t.placements[1:])
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=t.shape, stride=t.stride())


def _dp_coordinate(mesh, rank: int) -> int:
    """Rank `rank`'s index along the mesh's first axis (dp)."""
    return int((mesh.mesh == rank).nonzero()[0][0])


@pytest.mark.parametrize("tp", [*PLAIN, FUSED], ids=str)
def test_full_value_inverts_fsdp_shards(fake_world, tp: Placement) -> None:
    with local_mode():
        planned = distribute_tensor(_original(), _mesh(), (Replicate(), tp))
        full = value(full_value(_fsdp_shard(planned)))
    torch.testing.assert_close(full, _original(), rtol=0, atol=0)


# a dim sharded over both axes: the position table's (and llama's token table's) feature dim over dp and tp
NESTED = {"gpt-tiny": "transformer.wpe.weight", "llama-tiny": "tok_embeddings.weight"}


@pytest.mark.parametrize("model_name", list(NESTED))
def test_state_dict_of_nested_same_dim_shards_is_exact_and_trains_as_one_device(fake_world, model_name: str) -> None:
    model, inputs = make(model_name)
    mesh = {"dp": 2, "tp": 2}
    placements = {**forced(model_name, mesh), NESTED[model_name]: (Shard(1), Shard(1))}
    ir = autoshard.capture(model, inputs)
    plan = autoshard.plan_graph(ir, f"cpu:{WORLD}", mesh=mesh, param_placements=placements, optimizer="sgd")
    assert plan.params[NESTED[model_name]] == "(S(1), S(1))"
    with local_mode():
        compiled = compile(model, inputs, plan=plan, optimizer="sgd", lr=0.1)
        before = {n: value(t) for n, t in compiled.full_state_dict().items()}
    own = dict(model.named_parameters(remove_duplicate=False))
    assert set(before) == set(own)
    for name, p in own.items():
        torch.testing.assert_close(before[name], p.detach(), rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    check_matches(model, inputs, compiled, "sgd", 0.1)
