"""NUMA readiness: node layout, hugepages per node, CPUs kept for the host, device locality."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aifactory_core.config import Config
from aifactory_core.cpulist import format_cpulist
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import Check, DiscoveredDevice

AIFACTORY_API_VERSION = 1
NAME = "numa"


def _hugepage_check(inventory: HostInventory) -> Check:
    per_node = []
    for node in inventory.numa_nodes:
        reserved = [f"{page.total}x{page.size_kib // 1024}M" for page in node.hugepages if page.total]
        per_node.append(f"node{node.node_id}: {'+'.join(reserved) if reserved else 'none'}")
    if any(page.total for node in inventory.numa_nodes for page in node.hugepages):
        return Check("hugepages", "PASS", "hugepages reserved: " + "; ".join(per_node))
    return Check("hugepages", "WARN", "no hugepages reserved on any NUMA node",
                 fix="reserve 1G pages at boot: default_hugepagesz=1G hugepagesz=1G hugepages=N")


@hookimpl
def aifactory_doctor_checks(
    inventory: HostInventory, devices: Sequence[DiscoveredDevice], config: Config
) -> Iterable[Check]:
    nodes = inventory.numa_nodes
    if not nodes:
        return [Check("numa-nodes", "WARN", "no NUMA information under /sys/devices/system/node",
                      fix="enable CONFIG_NUMA in the kernel")]
    checks = [Check("numa-nodes", "PASS", f"{len(nodes)} NUMA nodes, {len(inventory.cpu.cpus)} CPUs, "
                    f"{inventory.cpu.core_count} cores, {inventory.cpu.threads_per_core} threads per core")]
    checks.append(_hugepage_check(inventory))
    kept = inventory.cpu.isolated | config.host.reserved_cpus
    if kept:
        checks.append(Check("host-cpus", "PASS", f"CPUs kept from VMs: {format_cpulist(kept)}"))
    else:
        checks.append(Check("host-cpus", "WARN", "no CPUs reserved for the host: VM vCPUs and host work share cores",
                            fix="set [host] reserved_cpus in aifactory.conf (and ISOLCPUS on the OpenNebula host)"))
    if len(nodes) > 1:
        for device in devices:
            pci = inventory.pci[device.address]
            if pci.numa_node is None and device.kind in ("gpu", "nic", "dpu"):
                node = inventory.device_node(pci)
                checks.append(Check(
                    "device-numa", "WARN",
                    f"firmware reports no NUMA node; local CPUs say node {node if node is not None else '?'}",
                    fix="enable ACPI SRAT/_PXM reporting (NUMA per socket) in firmware", subject=device.address))
    return checks
