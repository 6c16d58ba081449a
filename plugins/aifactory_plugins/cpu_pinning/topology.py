"""The host as the pinning planner sees it: nodes, cores with their threads, distances, the
memory and hugepages VMs may be given per node, the CPUs kept for the host, and the NUMA node of
each PCI function.

A node's memory for VMs is its total (``MemTotal``) less its hugepage pools (memory VMs with
hugepages take from the pools, the others cannot) and less the memory reserved for the host
(config ``host.reserved_memory_mib``), as oned and Nova count it: never ``MemFree``, which already
lacks what running VMs use and the page cache the kernel gives back on demand. Hugepages likewise:
the pool (``nr_hugepages``), never ``free_hugepages``. What other VMs were given is the caller's
:class:`~aifactory_plugins.cpu_pinning.planner.HostUsage`.

Built once from :class:`~aifactory_core.host.inventory.HostInventory`; immutable afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aifactory_core.host.inventory import HostInventory

FAR_DISTANCE = 255


@dataclass(frozen=True)
class HostNode:
    """One NUMA node: its usable cores (each a sorted tuple of thread ids), memory and pages."""

    node_id: int
    cores: tuple[tuple[int, ...], ...]
    memory_kib: int | None
    """Memory VMs without hugepages may be given here (``None``: unknown, not checked)."""
    hugepages: Mapping[int, int]
    """Page size (KiB) -> pages in the node's pool (``nr_hugepages``): VMs' pages come out of it."""

    @property
    def cpus(self) -> frozenset[int]:
        return frozenset(cpu for core in self.cores for cpu in core)


@dataclass(frozen=True)
class HostTopology:
    """Nodes (host CPUs removed), distance matrix, host-reserved CPUs and device nodes."""

    nodes: tuple[HostNode, ...]
    distances: Mapping[tuple[int, int], int]
    reserved: frozenset[int]
    threads_per_core: int
    device_nodes: Mapping[str, int | None] = field(default_factory=lambda: MappingProxyType({}))
    device_parents: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))

    def node(self, node_id: int) -> HostNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(node.node_id for node in self.nodes)

    def distance(self, first: int, second: int) -> int:
        if first == second:
            return 10
        return self.distances.get((first, second), FAR_DISTANCE)

    def node_of_device(self, address: str) -> int | None:
        return self.device_nodes.get(address)

    @property
    def cpu_count(self) -> int:
        return sum(len(node.cpus) for node in self.nodes)

    @classmethod
    def from_inventory(
        cls, inventory: HostInventory, reserved_cpus: frozenset[int] = frozenset(), reserved_memory_kib: int = 0
    ) -> HostTopology:
        """Read the topology; ``reserved_cpus`` (config ``host.reserved_cpus``) are never used, nor
        ``reserved_memory_kib`` of each node (config ``host.reserved_memory_mib``).

        Without configured reserved CPUs and with a kernel ``isolcpus=`` list, every online CPU
        outside that list is the host's own (the isolated ones are kept for VMs).
        """
        cpu = inventory.cpu
        online = {item.cpu_id for item in cpu.cpus if item.online}
        reserved = frozenset(reserved_cpus)
        if not reserved and cpu.isolated:
            reserved = frozenset(online - cpu.isolated)
        by_id = cpu.by_id()
        nodes: list[HostNode] = []
        distances: dict[tuple[int, int], int] = {}
        numa = inventory.numa_nodes
        for node in numa:
            for index, value in enumerate(node.distances):
                if index < len(numa):
                    distances[(node.node_id, numa[index].node_id)] = value
            usable = sorted(item for item in node.cpus if item in online and item not in reserved)
            seen: set[int] = set()
            cores: list[tuple[int, ...]] = []
            for cpu_id in usable:
                if cpu_id in seen:
                    continue
                info = by_id.get(cpu_id)
                siblings = info.thread_siblings if info and info.thread_siblings else frozenset({cpu_id})
                threads = tuple(sorted(item for item in siblings if item in usable and item not in seen))
                if cpu_id not in threads:
                    threads = (cpu_id, *threads)
                seen.update(threads)
                cores.append(threads)
            pool = MappingProxyType({page.size_kib: page.total for page in node.hugepages})
            pools = sum(page.size_kib * page.total for page in node.hugepages)
            memory = max(node.memory_total_kib - pools - reserved_memory_kib, 0) if node.memory_total_kib else None
            nodes.append(HostNode(node.node_id, tuple(cores), memory, pool))
        if not nodes:  # a host without NUMA in sysfs: one node holding every CPU
            usable = sorted(item for item in online if item not in reserved)
            nodes.append(HostNode(0, tuple((item,) for item in usable), None, MappingProxyType({})))
        device_nodes = {address: inventory.device_node(device) for address, device in inventory.pci.items()}
        parents = {address: device.parent for address, device in inventory.pci.items()}
        return cls(
            nodes=tuple(nodes),
            distances=MappingProxyType(distances),
            reserved=reserved,
            threads_per_core=max(cpu.threads_per_core, 1),
            device_nodes=MappingProxyType(device_nodes),
            device_parents=MappingProxyType(parents),
        )
