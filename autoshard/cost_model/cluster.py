"""A cluster (nodes of identical devices) and which links each axis of a device mesh runs over.

A device mesh names axes such as {"dp": 16, "tp": 8}; devices are laid out row-major over the axes in the
order given, the LAST axis varying fastest, and ranks fill nodes in order (ranks 0..7 are node 0 on 8-GPU
nodes). This is the layout ``torch.distributed.device_mesh.init_device_mesh`` uses, so an axis placed last
gets contiguous ranks: the usual way to keep tensor parallelism on NVLink. An axis whose every group lies
inside one node is priced with the intra-node figures; if any group crosses a node boundary the collective
is bottlenecked by the inter-node links, so the whole axis is priced with those.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from autoshard.cost_model.hardware import HardwareSpec, known_hardware, load_hardware
from autoshard.errors import InputError

__all__ = ["Cluster", "Link"]

_GRAMMAR = "'<hardware>:<nodes>x<devices_per_node>' or '<hardware>:<devices>' (one node)"
_EXAMPLES = "'a100-80g:16x8' (16 nodes of 8 GPUs), 'h100:4x8' or 'cpu:4' (4 local processes)"
_PATTERN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*:\s*(?:(\d+)\s*[xX]\s*)?(\d+)\s*$")


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """What one mesh axis's collectives run over: bandwidth per device and direction, and step latency.

    ``efficiency`` is the hardware's collective efficiency, carried along so that collective times need only
    the link; ``bandwidth`` itself is the datasheet figure.
    """

    bandwidth: float  # bytes/s per device, one direction
    latency: float  # s per collective step
    group_size: int  # devices in each group along the axis
    intra_node: bool  # every group lies inside one node
    efficiency: float = 1.0  # fraction of bandwidth collectives achieve

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.bandwidth <= 0 or self.latency < 0 or not 0 < self.efficiency <= 1:
            raise ValueError(f"invalid link {self!r}: group_size >= 1, bandwidth > 0, latency >= 0 and "
                             "0 < efficiency <= 1 are required")

    @property
    def effective_bandwidth(self) -> float:
        """Bandwidth collectives actually achieve, bytes/s."""
        return self.bandwidth * self.efficiency


@dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    """``nodes`` nodes of ``devices_per_node`` devices of one hardware type."""

    hardware: HardwareSpec
    nodes: int
    devices_per_node: int

    def __post_init__(self) -> None:
        if not isinstance(self.hardware, HardwareSpec):
            raise InputError(f"expected Cluster.hardware to be a HardwareSpec, found {self.hardware!r}; "
                             "use load_hardware('a100-80g') or Cluster.parse('a100-80g:16x8').")
        for name in ("nodes", "devices_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"expected Cluster.{name} to be a positive integer, found {value!r}; "
                                 "use e.g. Cluster.parse('a100-80g:16x8').")
        limit = self.hardware.devices_per_node
        if self.devices_per_node > limit:
            hint = f"write '{self.hardware.name}:{self.nodes * self.devices_per_node // limit}x{limit}'" \
                if self.devices_per_node % limit == 0 else f"use at most {limit} devices per node"
            raise InputError(f"expected at most {limit} devices per {self.hardware.name} node (the profile's "
                             f"devices_per_node), found {self.devices_per_node}; {hint}.")

    @classmethod
    def parse(cls, text: str) -> Cluster:
        """Parse "a100-80g:16x8" (16 nodes x 8 devices), "h100:4x8", "cpu:4" or "a100-80g:8" (one node)."""
        match = _PATTERN.match(text) if isinstance(text, str) else None
        if match is None:
            raise InputError(f"expected a cluster as {_GRAMMAR}, e.g. {_EXAMPLES}; found {text!r}. "
                             f"Known hardware: {', '.join(known_hardware())}.")
        name, nodes, devices = match.group(1), match.group(2), match.group(3)
        hardware = load_hardware(name)
        if int(devices) == 0 or (nodes is not None and int(nodes) == 0):
            raise InputError(f"expected positive node and device counts in {_GRAMMAR}, found {text!r}; "
                             f"e.g. {_EXAMPLES}.")
        return cls(hardware=hardware, nodes=1 if nodes is None else int(nodes), devices_per_node=int(devices))

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    def __str__(self) -> str:
        return f"{self.nodes} x {self.devices_per_node} {self.hardware.name} ({self.num_devices} devices)"

    def axis_link(self, mesh_shape: Mapping[str, int], axis: str) -> Link:
        """The link the groups along ``axis`` of a row-major ``mesh_shape`` (last axis fastest) run over."""
        self._check_mesh(mesh_shape)
        if axis not in mesh_shape:
            raise InputError(f"expected a mesh axis among {list(mesh_shape)}, found {axis!r}; "
                             "name one of the mesh's axes.")
        names = list(mesh_shape)
        size = mesh_shape[axis]
        stride = math.prod(mesh_shape[n] for n in names[names.index(axis) + 1:])
        hw = self.hardware
        if _groups_inside_nodes(self.num_devices, size, stride, self.devices_per_node):
            return Link(bandwidth=hw.intra_node_bandwidth, latency=hw.intra_node_latency, group_size=size,
                        intra_node=True, efficiency=hw.collective_efficiency)
        return Link(bandwidth=hw.inter_node_bandwidth, latency=hw.inter_node_latency, group_size=size,
                    intra_node=False, efficiency=hw.collective_efficiency)

    def _check_mesh(self, mesh_shape: Mapping[str, int]) -> None:
        if not isinstance(mesh_shape, Mapping) or not mesh_shape:
            raise InputError(f"expected a mesh shape mapping axis names to sizes, e.g. "
                             f"{{'dp': {self.nodes}, 'tp': {self.devices_per_node}}}, found {mesh_shape!r}.")
        for name, size in mesh_shape.items():
            if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise InputError(f"expected mesh axes as name -> positive integer size, found "
                                 f"{name!r}: {size!r} in {dict(mesh_shape)}; fix that axis.")
        total = math.prod(mesh_shape.values())
        if total != self.num_devices:
            raise InputError(f"expected the mesh sizes to multiply to the cluster's {self.num_devices} "
                             f"devices ({self}), found {dict(mesh_shape)} = {total} devices; change the mesh "
                             "or the cluster so they match.")


def _groups_inside_nodes(num_devices: int, size: int, stride: int, per_node: int) -> bool:
    """True when every group {base + j*stride : j < size} lies inside one node of ``per_node`` ranks.

    Group members increase with j and nodes are contiguous rank ranges, so a group is inside one node exactly
    when its first and last member are. Bases are the ranks whose coordinate on the axis is 0.
    """
    if size == 1:
        return True
    span = size * stride  # ranks covered by one block of the axis and the axes after it
    for block in range(0, num_devices, span):
        for base in range(block, block + stride):
            if base // per_node != (base + (size - 1) * stride) // per_node:
                return False
    return True
