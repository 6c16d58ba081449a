"""The planner's memory fit: a node's total less its hugepage pools, the host's reservation and what
other VMs were given, as oned and Nova count it, never the kernel's ``MemFree`` (which lacks the
page cache the kernel gives back and what running VMs already use).

On the real H100 capture (one node, 4.34 GiB, ~0.9 GiB of it page cache) and on simulated
two-node hosts whose nodes are mostly page cache: a VM that fits the node's memory is placed however
little ``MemFree`` says; a node that other VMs' records, domains or oned's NUMA allocations fill
refuses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aifactory_plugins.cpu_pinning.held import DomainXmlHeld, StateFileHeld, usage_of
from aifactory_plugins.cpu_pinning.planner import HostUsage, Placement, Unplaced, VmSpec, plan
from aifactory_plugins.cpu_pinning.topology import HostTopology
from hostroots import FIXTURES, h100_root  # noqa: F401

from aifactory_core.config import parse_config
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot

GIB = 1 << 20
MIB = 1 << 10
HOST_CPUS = frozenset({0})  # else two-node-small's isolcpus= leaves node 1 no CPU for VMs


def _topology(root: Path, reserved_cpus: frozenset[int] = frozenset()) -> tuple[HostInventory, HostTopology]:
    inventory = HostInventory(HostRoot(root))
    return inventory, HostTopology.from_inventory(inventory, reserved_cpus, reserved_memory_kib=512 * MIB)


def _busy_cache_host(tmp_path: Path, cached_kib: list[int]) -> Path:
    """two-node-small (16 and 8 GiB, 1 and 0.5 GiB of 2 MiB pages, 2 GiB of 1 GiB pages on each)
    with ``cached_kib`` of each node used by the page cache; CPU 0 is the host's (:data:`HOST_CPUS`)."""
    import sys

    sys.path.insert(0, str(FIXTURES))
    try:
        import hostgen
    finally:
        sys.path.remove(str(FIXTURES))
    description = json.loads((FIXTURES / "topologies" / "two-node-small.json").read_text())
    description["numa"]["used_kib"] = cached_kib
    return hostgen.generate(description, tmp_path / "host")


def test_the_config_reservation_is_checked() -> None:
    assert parse_config({}).host.reserved_memory_mib == 512
    assert parse_config({"host": {"reserved_memory_mib": 2048}}).host.reserved_memory_mib == 2048
    from aifactory_core.errors import ConfigError

    for bad in (-1, "1G", True, 1.5):
        with pytest.raises(ConfigError, match="host.reserved_memory_mib"):
            parse_config({"host": {"reserved_memory_mib": bad}})


def test_real_h100_host_admits_what_only_its_page_cache_holds(h100_root: Path, tmp_path: Path) -> None:  # noqa: F811
    inventory, topology = _topology(h100_root)
    node = inventory.numa_nodes[0]
    assert (node.memory_total_kib, node.memory_free_kib) == (4550128, 3323344)  # the capture as taken
    request = VmSpec(5, 2, 3584 * MIB)  # 3.5 GiB: more than MemFree, less than total - reserved
    assert request.memory_kib > node.memory_free_kib
    assert topology.nodes[0].memory_kib == 4550128 - 512 * MIB
    placed = plan(topology, HostUsage(), request)
    assert isinstance(placed, Placement) and placed.memory_nodes == (0,)

    # Another VM's record takes 1 GiB of the node: now the node is truly full for 3.5 GiB.
    held = StateFileHeld(HostRoot(h100_root, tmp_path / "state"))
    other = plan(topology, HostUsage(), VmSpec(6, 1, GIB))
    assert isinstance(other, Placement)
    held.record(other)
    usage = usage_of(held, exclude_vm=5)
    assert usage.memory_kib == {0: GIB}
    refused = plan(topology, usage, request)
    assert isinstance(refused, Unplaced) and "lacks" in refused.reason, refused
    assert isinstance(plan(topology, usage, VmSpec(5, 2, 2 * GIB)), Placement)  # what is left still fits


def test_simulated_host_with_busy_cache_admits_and_full_nodes_refuse(tmp_path: Path) -> None:
    # Node 0: 16 GiB, 3 GiB of it hugepage pools, 12 GiB page cache: MemFree says 1 GiB.
    root = _busy_cache_host(tmp_path, [12 * GIB, 5 * GIB + 512 * MIB])
    inventory, topology = _topology(root, HOST_CPUS)
    assert inventory.numa_nodes[0].memory_free_kib == GIB
    assert [node.memory_kib for node in topology.nodes] == [16 * GIB - 3 * GIB - 512 * MIB,
                                                            8 * GIB - 2 * GIB - 512 * MIB - 512 * MIB]
    vm = VmSpec(9, 2, 8 * GIB)
    placed = plan(topology, HostUsage(), vm)
    assert isinstance(placed, Placement) and placed.memory_nodes == (0,)

    # What the other VMs were given, as this host's pinning records and a saved VM document say.
    held_dir = tmp_path / "held"
    held_dir.mkdir()
    (held_dir / "one-21.xml").write_text(  # a running domain bound to node 0 by its numatune
        "<domain type='kvm'><name>one-21</name><memory unit='GiB'>6</memory><vcpu>2</vcpu>"
        "<cputune><vcpupin vcpu='0' cpuset='4'/><vcpupin vcpu='1' cpuset='5'/></cputune>"
        "<numatune><memory mode='strict' nodeset='0'/></numatune></domain>")
    (held_dir / "vm-22.xml").write_text(  # oned's NUMA allocation: 4.5 GiB on node 1
        "<VM><ID>22</ID><UID>0</UID><GID>0</GID><TEMPLATE><MEMORY>4608</MEMORY><NUMA_NODE><CPUS>12,13</CPUS>"
        f"<MEMORY>{4608 * MIB}</MEMORY><MEMORY_NODE_ID>1</MEMORY_NODE_ID><NODE_ID>1</NODE_ID>"
        "<TOTAL_CPUS>2</TOTAL_CPUS></NUMA_NODE></TEMPLATE></VM>")
    usage = usage_of(DomainXmlHeld(held_dir))
    assert usage.memory_kib == {0: 6 * GIB, 1: 4608 * MIB} and usage.cpus == {4, 5, 12, 13}
    refused = plan(topology, usage, vm)  # 6.5 GiB left on node 0, 0.5 GiB on node 1
    assert isinstance(refused, Unplaced) and "lacks" in refused.reason, refused
    assert isinstance(plan(topology, usage, VmSpec(9, 2, 6 * GIB)), Placement)


def test_memory_of_vms_bound_to_no_node_counts_against_the_whole_host(tmp_path: Path) -> None:
    root = _busy_cache_host(tmp_path, [GIB, GIB])
    _, topology = _topology(root, HOST_CPUS)
    total = sum(node.memory_kib or 0 for node in topology.nodes)  # 17.5 GiB
    held_dir = tmp_path / "held"
    held_dir.mkdir()
    (held_dir / "vm-30.xml").write_text(  # not pinned by oned: MEMORY (MiB) somewhere on the host
        "<VM><ID>30</ID><UID>0</UID><GID>0</GID><TEMPLATE><MEMORY>12288</MEMORY></TEMPLATE></VM>")
    (held_dir / "one-31.xml").write_text(  # a running domain without numatune
        "<domain type='kvm'><name>one-31</name><memory unit='KiB'>2097152</memory><vcpu>1</vcpu></domain>")
    usage = usage_of(DomainXmlHeld(held_dir))
    assert usage.unbound_kib == 14 * GIB and usage.memory_kib == {}
    assert total - usage.unbound_kib < 8 * GIB
    refused = plan(topology, usage, VmSpec(9, 2, 8 * GIB))  # node 0 alone would hold it
    assert isinstance(refused, Unplaced) and "the host lacks" in refused.reason, refused
    assert isinstance(plan(topology, usage, VmSpec(9, 2, 3 * GIB)), Placement)


def test_hugepages_count_the_pool_not_the_pages_free_now(tmp_path: Path) -> None:
    """Running VMs' pages are already missing from ``free_hugepages``: the pool less the records."""
    root = _busy_cache_host(tmp_path, [GIB, GIB])
    _, topology = _topology(root, HOST_CPUS)
    assert topology.nodes[0].hugepages == {2048: 512, 1048576: 2}
    page = VmSpec(3, 2, 2 * GIB, hugepage_kib=GIB)
    first = plan(topology, HostUsage(), page)
    assert isinstance(first, Placement) and first.memory_nodes == (0,)
    second = plan(topology, HostUsage().with_placement(first), page)
    assert isinstance(second, Placement) and second.memory_nodes == (1,)  # node 0's pool is given
