"""The deterministic pinning planner: a VM's vCPUs, emulator threads, memory and hugepages on the
NUMA node(s) of its devices, on whole cores where the thread policy asks, away from host CPUs and
from what other pinned VMs hold.

Thread policies follow Nova's: ``prefer`` packs sibling threads together and falls back to any
free thread; ``require`` only packs sibling threads; ``isolate`` takes one thread of fully free
cores and holds the whole core. Emulator threads ``share`` the VM's pCPUs (or the host's reserved
CPUs when configured), or with ``isolate`` get one extra pCPU on the node backing guest cell 0.

Order of preference: one node holding every device's node; then any single node (the VM is then
not device-local and the placement says why); then a spill from the device node to the nearest
nodes by the distance matrix. With oned's allocation (``TEMPLATE/NUMA_NODE``) the planner stays
inside oned's CPUs and memory nodes and only refines the vCPU-to-pCPU map.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from aifactory_plugins.cpu_pinning.pcie import pair_gpus_with_nics
from aifactory_plugins.cpu_pinning.topology import HostNode, HostTopology

ThreadPolicy = Literal["prefer", "isolate", "require"]
EmulatorPolicy = Literal["share", "isolate"]
THREAD_POLICIES: tuple[str, ...] = ("prefer", "isolate", "require")
EMULATOR_POLICIES: tuple[str, ...] = ("share", "isolate")


@dataclass(frozen=True)
class OnedCell:
    """One guest cell as oned allocated it: host CPUs and the host memory node."""

    cpus: frozenset[int]
    memory_node: int
    memory_kib: int | None = None


@dataclass(frozen=True)
class VmSpec:
    """What the planner needs to know about one VM."""

    vm_id: int
    vcpus: int
    memory_kib: int
    hugepage_kib: int | None = None
    thread_policy: ThreadPolicy = "prefer"
    emulator_policy: EmulatorPolicy = "share"
    gpus: tuple[str, ...] = ()
    nics: tuple[str, ...] = ()
    oned_cells: tuple[OnedCell, ...] = ()
    shared_cpus: bool = False  # oned PIN_POLICY=SHARED: every vCPU floats over its cell's CPUs

    @property
    def devices(self) -> tuple[str, ...]:
        return self.gpus + self.nics


@dataclass(frozen=True)
class CellPlacement:
    """Guest cell ``cell_id`` on host node ``host_node``: its vCPUs and their host CPUs."""

    cell_id: int
    host_node: int
    vcpus: tuple[int, ...]
    pcpus: tuple[frozenset[int], ...]  # per vCPU of this cell, in ``vcpus`` order
    memory_kib: int


@dataclass(frozen=True)
class Placement:
    """A planned VM: cells, emulator CPUs, what it holds on the host, and how local it is."""

    vm_id: int
    cells: tuple[CellPlacement, ...]
    emulator_cpus: frozenset[int]
    held_cpus: frozenset[int]
    hugepage_kib: int | None
    device_nodes: Mapping[str, int | None]
    pairs: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    conflict: str | None = None

    @property
    def memory_nodes(self) -> tuple[int, ...]:
        return tuple(sorted({cell.host_node for cell in self.cells}))

    @property
    def vcpu_cpus(self) -> tuple[frozenset[int], ...]:
        """Host CPUs of each vCPU, indexed by vCPU id."""
        mapping = {vcpu: cpus for cell in self.cells for vcpu, cpus in zip(cell.vcpus, cell.pcpus, strict=True)}
        return tuple(mapping[index] for index in range(len(mapping)))

    @property
    def all_vcpu_cpus(self) -> frozenset[int]:
        return frozenset(cpu for cpus in self.vcpu_cpus for cpu in cpus)

    def cell_of_node(self, host_node: int) -> int | None:
        for cell in self.cells:
            if cell.host_node == host_node:
                return cell.cell_id
        return None

    @property
    def local(self) -> bool:
        """vCPUs, memory and every device with a known node on one NUMA node."""
        nodes = {cell.host_node for cell in self.cells}
        known = {node for node in self.device_nodes.values() if node is not None}
        return len(nodes) == 1 and known <= nodes

    def to_dict(self) -> dict[str, object]:
        from aifactory_core.cpulist import format_cpulist

        return {
            "vm_id": self.vm_id,
            "local": self.local,
            "cells": [
                {
                    "cell": cell.cell_id,
                    "host_node": cell.host_node,
                    "vcpus": list(cell.vcpus),
                    "pcpus": [format_cpulist(cpus) for cpus in cell.pcpus],
                    "memory_kib": cell.memory_kib,
                }
                for cell in self.cells
            ],
            "emulator_cpus": format_cpulist(self.emulator_cpus),
            "held_cpus": format_cpulist(self.held_cpus),
            "hugepage_kib": self.hugepage_kib,
            "device_nodes": dict(self.device_nodes),
            "gpu_nic_pairs": [list(pair) for pair in self.pairs],
            "notes": list(self.notes),
            "conflict": self.conflict,
        }


@dataclass(frozen=True)
class Unplaced:
    """The VM cannot be placed; ``reason`` says why in one line."""

    vm_id: int
    reason: str


@dataclass(frozen=True)
class HostUsage:
    """What the other VMs already hold: CPUs, memory (KiB) and hugepages per node, and the memory
    of VMs bound to no node (counted against the host as a whole)."""

    cpus: frozenset[int] = frozenset()
    memory_kib: Mapping[int, int] = field(default_factory=dict)
    pages: Mapping[tuple[int, int], int] = field(default_factory=dict)  # (node, size KiB) -> pages
    unbound_kib: int = 0

    def with_placement(self, placement: Placement) -> HostUsage:
        memory = dict(self.memory_kib)
        pages = dict(self.pages)
        for cell in placement.cells:
            if placement.hugepage_kib:
                key = (cell.host_node, placement.hugepage_kib)
                pages[key] = pages.get(key, 0) + cell.memory_kib // placement.hugepage_kib
            else:
                memory[cell.host_node] = memory.get(cell.host_node, 0) + cell.memory_kib
        return HostUsage(self.cpus | placement.held_cpus, memory, pages, self.unbound_kib)


class PlanInputError(ValueError):
    """The request itself is impossible on this host (not merely full): refuse, exit 2."""


# --------------------------------------------------------------------------------------------
# Packing vCPUs onto one node's cores.


@dataclass(frozen=True)
class _Packed:
    pcpus: tuple[int, ...]
    held: frozenset[int]
    emulator: frozenset[int]


def _free_cores(
    node: HostNode, unavailable: frozenset[int], allowed: frozenset[int] | None
) -> list[tuple[tuple[int, ...], bool]]:
    """Each core's free threads, and whether the whole core is free."""
    result = []
    for core in node.cores:
        free = tuple(cpu for cpu in core if cpu not in unavailable and (allowed is None or cpu in allowed))
        if free:
            result.append((free, len(free) == len(core)))
    return result


def capacity(
    node: HostNode, unavailable: frozenset[int], policy: ThreadPolicy, allowed: frozenset[int] | None = None
) -> int:
    """How many vCPUs this node can still take under ``policy``."""
    cores = _free_cores(node, unavailable, allowed)
    if policy == "isolate":
        return sum(1 for _, whole in cores if whole)
    if policy == "require":
        return sum(len(free) for free, _ in cores if len(free) >= 2)
    return sum(len(free) for free, _ in cores)


def pack(
    node: HostNode,
    unavailable: frozenset[int],
    count: int,
    policy: ThreadPolicy,
    emulator: bool = False,
    allowed: frozenset[int] | None = None,
) -> _Packed | None:
    """Choose ``count`` pCPUs (plus one emulator pCPU when asked) on one node, or ``None``."""
    cores = _free_cores(node, unavailable, allowed)
    chosen: list[int] = []
    used_cores: list[tuple[int, ...]] = []
    if policy == "isolate":
        whole = [free for free, is_whole in cores if is_whole]
        if len(whole) < count + (1 if emulator else 0):
            return None
        used_cores = whole[:count]
        chosen = [core[0] for core in used_cores]
        held = {cpu for core in used_cores for cpu in core}
        extra: frozenset[int] = frozenset()
        if emulator:
            extra = frozenset(whole[count])
            held |= extra
        return _Packed(tuple(chosen), frozenset(held), frozenset(extra) and frozenset({min(extra)}))
    widest = max((len(free) for free, _ in cores), default=0)
    lowest = 2 if policy == "require" else 1
    for width in range(widest, lowest - 1, -1):
        eligible = [free for free, _ in cores if len(free) >= width]
        if width * len(eligible) < count:
            continue
        chosen = []
        for free in eligible:
            if len(chosen) >= count:
                break
            chosen.extend(free[: min(width, count - len(chosen))])
        break
    else:
        if policy == "require" or sum(len(free) for free, _ in cores) < count:
            return None
        chosen = [cpu for free, _ in cores for cpu in free][:count]
    held_set = frozenset(chosen)
    emulator_cpus: frozenset[int] = frozenset()
    if emulator:
        rest = [cpu for free, _ in cores for cpu in free if cpu not in held_set]
        if not rest:
            return None
        emulator_cpus = frozenset({rest[0]})
    return _Packed(tuple(chosen), held_set | emulator_cpus, emulator_cpus)


# --------------------------------------------------------------------------------------------
# Memory.


def _split_memory(total_kib: int, counts: list[int], page_kib: int | None) -> list[int]:
    unit = page_kib or 1024
    units = total_kib // unit
    vcpus = sum(counts)
    shares = [units * count // vcpus for count in counts]
    shares[0] += units - sum(shares)
    parts = [share * unit for share in shares]
    parts[0] += total_kib - units * unit
    return parts


def _memory_fits(topology: HostTopology, usage: HostUsage, node_id: int, kib: int, page_kib: int | None) -> bool:
    node = topology.node(node_id)
    if page_kib:
        free = node.hugepages.get(page_kib, 0) - usage.pages.get((node_id, page_kib), 0)
        return free * page_kib >= kib
    if node.memory_kib is None:  # unknown memory: do not refuse on it
        return True
    return node.memory_kib - usage.memory_kib.get(node_id, 0) >= kib


def _host_memory_fits(topology: HostTopology, usage: HostUsage, kib: int) -> bool:
    """The host as a whole: memory of VMs bound to no node (``unbound_kib``) is somewhere."""
    if not usage.unbound_kib or any(node.memory_kib is None for node in topology.nodes):
        return True
    total = sum(node.memory_kib or 0 for node in topology.nodes)
    return total - sum(usage.memory_kib.values()) - usage.unbound_kib >= kib


# --------------------------------------------------------------------------------------------
# Planning.


def _check_request(topology: HostTopology, spec: VmSpec) -> None:
    if spec.vcpus < 1:
        raise PlanInputError(f"VM {spec.vm_id} asks for {spec.vcpus} vCPUs")
    if spec.memory_kib < 1:
        raise PlanInputError(f"VM {spec.vm_id} asks for no memory")
    if spec.hugepage_kib and spec.memory_kib % spec.hugepage_kib:
        raise PlanInputError(
            f"VM {spec.vm_id} memory {spec.memory_kib} KiB is not a whole number of {spec.hugepage_kib} KiB pages"
        )
    total = topology.cpu_count
    needed = spec.vcpus + (1 if spec.emulator_policy == "isolate" else 0)
    if needed > total:
        raise PlanInputError(f"VM {spec.vm_id} asks for {needed} CPUs; the host has {total} for VMs")
    unknown = [address for address in spec.devices if address not in topology.device_nodes]
    if unknown:
        raise PlanInputError(f"VM {spec.vm_id} device {unknown[0]} is not on this host")


def _device_nodes(topology: HostTopology, spec: VmSpec) -> dict[str, int | None]:
    return {address: topology.node_of_device(address) for address in spec.devices}


def _candidate_single_nodes(
    topology: HostTopology, usage: HostUsage, wanted: set[int], policy: ThreadPolicy
) -> list[int]:
    """Single nodes to try: the device node first, then by distance to it, then by free CPUs."""

    def key(node: HostNode) -> tuple[int, int, int, int]:
        local = 0 if not wanted or wanted == {node.node_id} else 1
        distance = sum(topology.distance(node.node_id, other) for other in wanted)
        return (local, distance, -capacity(node, usage.cpus, policy), node.node_id)

    return [node.node_id for node in sorted(topology.nodes, key=key)]


def _single(topology: HostTopology, usage: HostUsage, spec: VmSpec, node_id: int) -> Placement | None:
    node = topology.node(node_id)
    packed = pack(node, usage.cpus, spec.vcpus, spec.thread_policy, spec.emulator_policy == "isolate")
    if packed is None or not _memory_fits(topology, usage, node_id, spec.memory_kib, spec.hugepage_kib):
        return None
    cell = CellPlacement(
        0, node_id, tuple(range(spec.vcpus)), tuple(frozenset({cpu}) for cpu in packed.pcpus), spec.memory_kib
    )
    return _finish(topology, spec, (cell,), packed.emulator, packed.held)


def _emulator_share(topology: HostTopology, cells: Iterable[CellPlacement]) -> frozenset[int]:
    if topology.reserved:
        return topology.reserved
    return frozenset(cpu for cell in cells for cpus in cell.pcpus for cpu in cpus)


def _finish(
    topology: HostTopology,
    spec: VmSpec,
    cells: tuple[CellPlacement, ...],
    emulator: frozenset[int],
    held: frozenset[int],
    notes: tuple[str, ...] = (),
    conflict: str | None = None,
) -> Placement:
    if not emulator:
        emulator = _emulator_share(topology, cells)
    pairs = pair_gpus_with_nics(spec.gpus, spec.nics, topology.device_parents)
    placement = Placement(
        vm_id=spec.vm_id,
        cells=cells,
        emulator_cpus=emulator,
        held_cpus=held,
        hugepage_kib=spec.hugepage_kib,
        device_nodes=_device_nodes(topology, spec),
        pairs=pairs,
        notes=notes,
        conflict=conflict,
    )
    extra: list[str] = []
    unpaired = sorted(set(spec.gpus) - {gpu for gpu, _ in pairs})
    if spec.nics and unpaired:
        extra.append(f"GPU {', '.join(unpaired)} has no NIC of this VM behind the same PCIe switch")
    if not placement.local:
        nodes = ",".join(str(node) for node in placement.memory_nodes)
        devices = ",".join(f"{address}@{node}" for address, node in sorted(placement.device_nodes.items()))
        extra.append(f"not device-local: VM on node(s) {nodes}, devices {devices or 'none'}")
    return replace(placement, notes=placement.notes + tuple(extra))


def _spill(topology: HostTopology, usage: HostUsage, spec: VmSpec, wanted: set[int]) -> Placement | Unplaced:
    """Several nodes: start at the device node(s), add the nearest by distance until it fits."""
    policy = spec.thread_policy
    caps = {node.node_id: capacity(node, usage.cpus, policy) for node in topology.nodes}
    start = sorted(wanted, key=lambda node_id: (-caps[node_id], node_id)) if wanted else []
    if not start:
        start = [max(topology.node_ids, key=lambda node_id: (caps[node_id], -node_id))]

    def nearness(node_id: int) -> tuple[int, int, int]:
        return (min(topology.distance(node_id, other) for other in start), -caps[node_id], node_id)

    order = start + sorted((node_id for node_id in topology.node_ids if node_id not in start), key=nearness)
    remaining = spec.vcpus
    emulator_needed = spec.emulator_policy == "isolate"
    shares: list[tuple[int, int]] = []
    for node_id in order:
        if remaining <= 0:
            break
        room = caps[node_id] - (1 if emulator_needed and not shares and policy != "isolate" else 0)
        room -= 1 if emulator_needed and not shares and policy == "isolate" else 0
        take = min(max(room, 0), remaining)
        if take > 0:
            shares.append((node_id, take))
            remaining -= take
    if remaining > 0:
        return Unplaced(spec.vm_id, f"VM {spec.vm_id} needs {spec.vcpus} vCPUs under thread policy {policy}"
                        f"{' with an isolated emulator thread' if emulator_needed else ''}; "
                        f"only {spec.vcpus - remaining} are free")  # fmt: skip
    memory = _split_memory(spec.memory_kib, [count for _, count in shares], spec.hugepage_kib)
    cells: list[CellPlacement] = []
    held: set[int] = set()
    emulator: frozenset[int] = frozenset()
    next_vcpu = 0
    for index, ((node_id, count), kib) in enumerate(zip(shares, memory, strict=True)):
        if not _memory_fits(topology, usage, node_id, kib, spec.hugepage_kib):
            return Unplaced(spec.vm_id, f"VM {spec.vm_id}: node {node_id} lacks {kib} KiB of free "
                            f"{'hugepage ' if spec.hugepage_kib else ''}memory")  # fmt: skip
        packed = pack(topology.node(node_id), usage.cpus, count, policy, emulator_needed and index == 0)
        if packed is None:
            return Unplaced(spec.vm_id, f"VM {spec.vm_id}: node {node_id} cannot hold {count} vCPUs")
        if index == 0:
            emulator = packed.emulator
        held |= packed.held
        vcpus = tuple(range(next_vcpu, next_vcpu + count))
        next_vcpu += count
        cells.append(CellPlacement(index, node_id, vcpus, tuple(frozenset({cpu}) for cpu in packed.pcpus), kib))
    spread = ", ".join(f"node {node_id}: {count}" for node_id, count in shares)
    note = f"spilled over {len(shares)} nodes ({spread}): no single node holds {spec.vcpus} vCPUs"
    return _finish(topology, spec, tuple(cells), emulator, frozenset(held), (note,))


def _within_oned(topology: HostTopology, usage: HostUsage, spec: VmSpec, conflict_policy: str) -> Placement | Unplaced:
    """Refine oned's allocation: its CPUs and memory nodes stay; the vCPU map follows our policy."""
    oned_nodes = {cell.memory_node for cell in spec.oned_cells}
    device_nodes = _device_nodes(topology, spec)
    foreign = sorted(
        f"{address}@{node}" for address, node in device_nodes.items() if node is not None and node not in oned_nodes
    )
    conflict = None
    notes: list[str] = []
    if foreign:
        conflict = (f"VM {spec.vm_id}: oned placed it on node(s) {','.join(map(str, sorted(oned_nodes)))} "
                    f"but its devices are on {', '.join(foreign)}")  # fmt: skip
        if conflict_policy == "refuse":
            return Unplaced(spec.vm_id, conflict + " (conflict policy: refuse)")
        notes.append(conflict + " (conflict policy: warn; oned's placement kept)")
    total = sum(len(cell.cpus) for cell in spec.oned_cells)
    if total < 1:
        return Unplaced(spec.vm_id, f"VM {spec.vm_id}: oned's NUMA_NODE lists no CPUs")
    overlap = usage.cpus & frozenset(cpu for cell in spec.oned_cells for cpu in cell.cpus)
    if overlap:
        from aifactory_core.cpulist import format_cpulist

        notes.append(f"CPUs {format_cpulist(overlap)} given by oned are also held by another pinned VM")
    counts = [len(cell.cpus) for cell in spec.oned_cells]
    if sum(counts) != spec.vcpus:  # oned gave whole cores (PIN_POLICY=CORE): spread vCPUs over cells
        counts = [spec.vcpus * count // total for count in counts]
        counts[0] += spec.vcpus - sum(counts)
    memory = [cell.memory_kib for cell in spec.oned_cells]
    if any(value is None for value in memory) or sum(value or 0 for value in memory) != spec.memory_kib:
        memory = list(_split_memory(spec.memory_kib, counts, spec.hugepage_kib))
    cells: list[CellPlacement] = []
    held: set[int] = set()
    emulator: frozenset[int] = frozenset()
    next_vcpu = 0
    for index, (cell, count) in enumerate(zip(spec.oned_cells, counts, strict=True)):
        vcpus = tuple(range(next_vcpu, next_vcpu + count))
        next_vcpu += count
        held |= cell.cpus
        if spec.shared_cpus:
            cells.append(
                CellPlacement(index, cell.memory_node, vcpus, tuple(cell.cpus for _ in vcpus), memory[index] or 0)
            )
            continue
        node = topology.node(cell.memory_node) if cell.memory_node in topology.node_ids else None
        allowed = cell.cpus
        packed = None
        host_node = (
            node if node is not None else HostNode(cell.memory_node, tuple((cpu,) for cpu in sorted(allowed)), None, {})
        )
        policies: list[ThreadPolicy] = [spec.thread_policy, "prefer"]
        for policy in policies:
            wants_emulator = spec.emulator_policy == "isolate" and index == 0
            packed = pack(host_node, frozenset(), count, policy, wants_emulator, allowed)
            if packed is None and wants_emulator:
                packed = pack(host_node, frozenset(), count, policy, False, allowed)
                if packed is not None:
                    notes.append("no spare CPU inside oned's allocation for an isolated emulator thread; shared")
            if packed is not None:
                if policy != spec.thread_policy:
                    notes.append(f"thread policy {spec.thread_policy} does not fit oned's CPUs; used prefer")
                break
        if packed is None:
            return Unplaced(spec.vm_id, f"VM {spec.vm_id}: oned's cell {index} has too few CPUs for {count} vCPUs")
        if index == 0 and packed.emulator:
            emulator = packed.emulator
        cells.append(
            CellPlacement(
                index, cell.memory_node, vcpus, tuple(frozenset({cpu}) for cpu in packed.pcpus), memory[index] or 0
            )
        )
    return _finish(topology, spec, tuple(cells), emulator, frozenset(held), tuple(notes), conflict)


def plan(topology: HostTopology, usage: HostUsage, spec: VmSpec, conflict_policy: str = "warn") -> Placement | Unplaced:
    """Place one VM. Raises :class:`PlanInputError` when the request can never fit this host."""
    _check_request(topology, spec)
    if spec.oned_cells:
        return _within_oned(topology, usage, spec, conflict_policy)
    if not spec.hugepage_kib and not _host_memory_fits(topology, usage, spec.memory_kib):
        return Unplaced(spec.vm_id, f"VM {spec.vm_id}: the host lacks {spec.memory_kib} KiB of memory for VMs "
                                    f"({usage.unbound_kib} KiB are given to VMs bound to no node)")
    wanted = {node for node in _device_nodes(topology, spec).values() if node is not None}
    single_order = _candidate_single_nodes(topology, usage, wanted, spec.thread_policy)
    first_remote: Placement | None = None
    for node_id in single_order:
        placement = _single(topology, usage, spec, node_id)
        if placement is None:
            continue
        if placement.local or not wanted:
            return placement
        first_remote = placement
        break
    if len(wanted) > 1 or first_remote is None:
        spilled = _spill(topology, usage, spec, wanted)
        if isinstance(spilled, Placement) or first_remote is None:
            return spilled
    assert first_remote is not None
    # The device node cannot hold the VM: spilling from it keeps the devices covered.
    spilled = _spill(topology, usage, spec, wanted)
    if isinstance(spilled, Placement) and wanted <= set(spilled.memory_nodes):
        return spilled
    return first_remote


def plan_many(
    topology: HostTopology, specs: Iterable[VmSpec], usage: HostUsage | None = None, conflict_policy: str = "warn"
) -> tuple[list[Placement | Unplaced], HostUsage]:
    """Plan VMs one after the other, each seeing what the earlier ones hold."""
    current = usage or HostUsage()
    results: list[Placement | Unplaced] = []
    for spec in specs:
        result = plan(topology, current, spec, conflict_policy)
        if isinstance(result, Placement):
            current = current.with_placement(result)
        results.append(result)
    return results, current
