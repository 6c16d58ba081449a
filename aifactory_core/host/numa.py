"""NUMA nodes: CPUs, memory, distances and hugepages from ``/sys/devices/system/node``."""

from __future__ import annotations

import re

from aifactory_core.cpulist import parse_cpulist
from aifactory_core.errors import UsageError
from aifactory_core.host.sysfs import list_dir, read_int, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import HugePages, NumaNode

_NODE_DIR = re.compile(r"^node(\d+)$")
_HUGEPAGE_DIR = re.compile(r"^hugepages-(\d+)kB$")
_MEMINFO = re.compile(r"^Node\s+\d+\s+(\w+):\s+(\d+)\s*kB", re.MULTILINE)


def _meminfo(text: str | None) -> dict[str, int]:
    return {key: int(value) for key, value in _MEMINFO.findall(text or "")}


def read_numa_nodes(host: HostRoot) -> tuple[NumaNode, ...]:
    base = host.path("/sys/devices/system/node")
    nodes: list[NumaNode] = []
    for name in list_dir(base):
        match = _NODE_DIR.match(name)
        if not match:
            continue
        node_dir = base / name
        try:
            cpus = parse_cpulist(read_str(node_dir / "cpulist"))
        except UsageError:
            cpus = frozenset()
        memory = _meminfo(read_str(node_dir / "meminfo"))
        distance_text = read_str(node_dir / "distance") or ""
        distances = tuple(int(value) for value in distance_text.split() if value.isdigit())
        hugepages: list[HugePages] = []
        for page_dir in list_dir(node_dir / "hugepages"):
            page_match = _HUGEPAGE_DIR.match(page_dir)
            if not page_match:
                continue
            pages = node_dir / "hugepages" / page_dir
            hugepages.append(
                HugePages(
                    size_kib=int(page_match.group(1)),
                    total=read_int(pages / "nr_hugepages") or 0,
                    free=read_int(pages / "free_hugepages") or 0,
                )
            )
        hugepages.sort(key=lambda page: page.size_kib)
        nodes.append(
            NumaNode(
                node_id=int(match.group(1)),
                cpus=cpus,
                memory_total_kib=memory.get("MemTotal", 0),
                memory_free_kib=memory.get("MemFree", 0),
                distances=distances,
                hugepages=tuple(hugepages),
            )
        )
    nodes.sort(key=lambda node: node.node_id)
    return tuple(nodes)
