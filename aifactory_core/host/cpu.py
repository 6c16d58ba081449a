"""CPU topology: cores, packages, thread siblings, NUMA node and isolated CPUs."""

from __future__ import annotations

import re

from aifactory_core.cpulist import parse_cpulist
from aifactory_core.errors import UsageError
from aifactory_core.host.sysfs import list_dir, read_int, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import Cpu, CpuTopology, NumaNode

_CPU_DIR = re.compile(r"^cpu(\d+)$")
_ISOLCPUS = re.compile(r"(?:^|\s)isolcpus=(\S+)")


def _isolcpus_from_cmdline(cmdline: str) -> frozenset[int]:
    """CPUs from ``isolcpus=[flags,]list`` on the kernel command line."""
    match = _ISOLCPUS.search(cmdline)
    if not match:
        return frozenset()
    parts = [part for part in match.group(1).split(",") if part and part[0].isdigit()]
    try:
        return parse_cpulist(",".join(parts), "isolcpus")
    except UsageError:
        return frozenset()


def read_cpu_topology(host: HostRoot, nodes: tuple[NumaNode, ...] = ()) -> CpuTopology:
    base = host.path("/sys/devices/system/cpu")
    node_of = {cpu: node.node_id for node in nodes for cpu in node.cpus}
    cpus: list[Cpu] = []
    for name in list_dir(base):
        match = _CPU_DIR.match(name)
        if not match:
            continue
        cpu_id = int(match.group(1))
        topology = base / name / "topology"
        try:
            siblings = parse_cpulist(read_str(topology / "thread_siblings_list"))
        except UsageError:
            siblings = frozenset()
        online = read_int(base / name / "online")
        cpus.append(
            Cpu(
                cpu_id=cpu_id,
                core_id=read_int(topology / "core_id") or 0,
                package_id=read_int(topology / "physical_package_id") or 0,
                node_id=node_of.get(cpu_id),
                thread_siblings=siblings or frozenset({cpu_id}),
                online=online != 0,
            )
        )
    cpus.sort(key=lambda cpu: cpu.cpu_id)
    try:
        isolated = parse_cpulist(read_str(base / "isolated"))
    except UsageError:
        isolated = frozenset()
    isolated |= _isolcpus_from_cmdline(host.read_text("/proc/cmdline", "") or "")
    return CpuTopology(cpus=tuple(cpus), isolated=isolated)
