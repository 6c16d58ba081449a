"""What the other pinned VMs on this host hold.

:class:`HeldCpus` is the interface the planner's caller reads; two providers:

- :class:`StateFileHeld` reads the small JSON records this plugin writes at deploy
  (``<state_dir>/pinning/<vmid>.json``, atomic: temp file, fsync, rename). Where the host has
  libvirt's live-domain directory (``/run/libvirt/qemu``), records of VMs that no longer run there
  are ignored, so a VM that vanished without a release does not hold CPUs for ever.
- :class:`DomainXmlHeld` reads what the VMs in a directory of XML files were given: libvirt
  domains (the live ``/run/libvirt/qemu/*.xml``, or ``virsh dumpxml`` output saved by an operator)
  or OpenNebula VM documents (``onevm show -x``). Pins and memory: a domain's memory belongs to the
  host node its ``<numatune>`` binds each guest cell to; a VM document's to its ``NUMA_NODE``'s
  ``MEMORY_NODE_ID`` (oned's NUMA allocation); memory bound to no node counts against the host as a
  whole.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aifactory_core.cpulist import format_cpulist, parse_cpulist
from aifactory_core.errors import UsageError
from aifactory_plugins.cpu_pinning.planner import HostUsage, Placement

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_core.hostroot import HostRoot

STATE_SUBDIR = "pinning"
LIBVIRT_RUN_DIR = "/run/libvirt/qemu"
_RECORD = re.compile(r"\A(\d{1,10})\.json\Z")
_ONE_DOMAIN = re.compile(r"\Aone-(\d{1,10})\.xml\Z")
MAX_RECORD_BYTES = 1 << 16


@dataclass(frozen=True)
class Holding:
    """CPUs, and memory per node, one pinned VM holds."""

    vm_id: int | None
    cpus: frozenset[int]
    memory_kib: tuple[tuple[int, int], ...] = ()  # (node, KiB) without hugepages
    pages: tuple[tuple[int, int, int], ...] = ()  # (node, page KiB, pages)
    unbound_kib: int = 0  # memory without hugepages bound to no node


class HeldCpus(Protocol):
    """Where the planner learns what the other pinned VMs hold."""

    def holdings(self) -> Iterable[Holding]: ...


def usage_of(provider: HeldCpus, exclude_vm: int | None = None, *, exclude_vms: Collection[int] = ()) -> HostUsage:
    """Sum the holdings of every VM but ``exclude_vm`` and ``exclude_vms`` (VMs being planned again)."""
    excluded = set(exclude_vms) | ({exclude_vm} if exclude_vm is not None else set())
    cpus: set[int] = set()
    memory: dict[int, int] = {}
    pages: dict[tuple[int, int], int] = {}
    unbound = 0
    for holding in provider.holdings():
        if holding.vm_id in excluded:
            continue
        cpus |= holding.cpus
        for node, kib in holding.memory_kib:
            memory[node] = memory.get(node, 0) + kib
        for node, size, count in holding.pages:
            pages[(node, size)] = pages.get((node, size), 0) + count
        unbound += holding.unbound_kib
    return HostUsage(frozenset(cpus), memory, pages, unbound)


def holding_of(placement: Placement) -> Holding:
    memory: list[tuple[int, int]] = []
    pages: list[tuple[int, int, int]] = []
    for cell in placement.cells:
        if placement.hugepage_kib:
            pages.append((cell.host_node, placement.hugepage_kib, cell.memory_kib // placement.hugepage_kib))
        else:
            memory.append((cell.host_node, cell.memory_kib))
    return Holding(placement.vm_id, placement.held_cpus, tuple(memory), tuple(pages))


def _running_vm_ids(host: HostRoot) -> set[int] | None:
    directory = host.path(LIBVIRT_RUN_DIR)
    if not directory.is_dir():
        return None
    result = set()
    for name in os.listdir(directory):
        match = _ONE_DOMAIN.match(name)
        if match:
            result.add(int(match.group(1)))
    return result


@dataclass(frozen=True)
class StateFileHeld:
    """The plugin's own records under ``<state_dir>/pinning``."""

    host: HostRoot

    @property
    def directory(self) -> Path:
        return self.host.state_dir / STATE_SUBDIR

    def holdings(self) -> Iterable[Holding]:
        if not self.directory.is_dir():
            return []
        running = _running_vm_ids(self.host)
        result = []
        for name in sorted(os.listdir(self.directory)):
            match = _RECORD.match(name)
            if not match or (running is not None and int(match.group(1)) not in running):
                continue
            holding = _read_record(self.directory / name)
            if holding is not None:
                result.append(holding)
        return result

    def record(self, placement: Placement) -> Path:
        """Write the VM's record atomically (temp file, fsync, rename, fsync of the directory)."""
        holding = holding_of(placement)
        data = json.dumps({
            "vm_id": holding.vm_id,
            "cpus": format_cpulist(holding.cpus),
            "memory_kib": [list(item) for item in holding.memory_kib],
            "pages": [list(item) for item in holding.pages],
        }, sort_keys=True).encode()  # fmt: skip
        from aifactory_core.lifecycle.atomic import write_atomic

        target = self.directory / f"{placement.vm_id}.json"
        write_atomic(target, data, mode=0o640)
        return target

    def forget(self, vm_id: int) -> bool:
        from aifactory_core.lifecycle.atomic import remove

        return remove(self.directory / f"{vm_id}.json")


def _read_record(path: Path) -> Holding | None:
    """A record, or ``None`` when it is torn or malformed (it then holds nothing)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            return None
        data = json.loads(raw)
        cpus = parse_cpulist(str(data["cpus"]), "held CPUs")
        memory = tuple((int(node), int(kib)) for node, kib in data.get("memory_kib", []))
        pages = tuple((int(node), int(size), int(count)) for node, size, count in data.get("pages", []))
        return Holding(int(data["vm_id"]), cpus, memory, pages)
    except (OSError, ValueError, KeyError, TypeError, UsageError):
        return None


@dataclass(frozen=True)
class DomainXmlHeld:
    """What the VMs whose XML files lie in ``directory`` (``*.xml``) hold: libvirt domains
    (``<domain>``, ``<domstatus>``) or OpenNebula VM documents (``<VM>``)."""

    directory: Path

    def holdings(self) -> Iterable[Holding]:
        from aifactory_core.errors import AifactoryError
        from aifactory_core.one.xmlsafe import parse_xml

        if not self.directory.is_dir():
            return []
        result = []
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".xml"):
                continue
            try:
                data = (self.directory / name).read_bytes()
                document = parse_xml(data, name)
                if document.tag == "VM":
                    holding = _vm_document_holding(data, name)
                else:
                    root = document.find("domain") if document.tag == "domstatus" else document
                    match = _ONE_DOMAIN.match(name)
                    vm_id = int(match.group(1)) if match else None
                    holding = _domain_holding(root, vm_id) if root is not None else None
            except (OSError, AifactoryError, ValueError):
                continue
            if holding is not None and (holding.cpus or holding.memory_kib or holding.pages or holding.unbound_kib):
                result.append(holding)
        return result


def _single_node(nodeset: str | None) -> int | None:
    try:
        nodes = parse_cpulist(nodeset, "nodeset") if nodeset else frozenset()
    except UsageError:
        return None
    return min(nodes) if len(nodes) == 1 else None


def _domain_holding(root: etree._Element, vm_id: int | None) -> Holding:
    """Pins, and memory per host node from ``<numatune>`` (a guest cell's ``memnode``, else the
    ``<memory nodeset>`` when it names one node); hugepage memory as pages of that node."""
    from aifactory_plugins.cpu_pinning.spec import cell_memory_kib, domain_hugepage_kib, domain_memory_kib

    cpus: set[int] = set()
    for tag in ("cputune/vcpupin", "cputune/emulatorpin"):
        for pin in root.findall(tag):
            try:
                cpus |= parse_cpulist(pin.get("cpuset"), "cpuset")
            except UsageError:
                continue
    total = domain_memory_kib(root) if root.find("memory") is not None else 0
    page = domain_hugepage_kib(root)
    memnodes = {
        memnode.get("cellid"): _single_node(memnode.get("nodeset")) for memnode in root.findall("numatune/memnode")
    }
    default = root.find("numatune/memory")
    default_node = _single_node(default.get("nodeset")) if default is not None else None
    parts: list[tuple[int | None, int]] = []
    cells = root.findall("cpu/numa/cell")
    for cell in cells:
        kib = cell_memory_kib(cell) or 0
        parts.append((memnodes.get(cell.get("id")) if cell.get("id") in memnodes else default_node, kib))
    if not cells:
        parts.append((default_node, total))
    return _holding(vm_id, frozenset(cpus), parts, page)


def _holding(vm_id: int | None, cpus: frozenset[int], parts: list[tuple[int | None, int]], page: int | None) -> Holding:
    memory: dict[int, int] = {}
    pages: dict[tuple[int, int], int] = {}
    unbound = 0
    for node, kib in parts:
        if page and node is not None:
            pages[(node, page)] = pages.get((node, page), 0) + kib // page
        elif node is not None:
            memory[node] = memory.get(node, 0) + kib
        elif not page:  # hugepages bound to no node come out of some pool: not attributable
            unbound += kib
    return Holding(vm_id, cpus, tuple(sorted(memory.items())),
                   tuple((node, size, count) for (node, size), count in sorted(pages.items())), unbound)


def _vm_document_holding(data: bytes, name: str) -> Holding:
    """oned's NUMA allocation: each ``NUMA_NODE``'s CPUS and MEMORY (KiB) on MEMORY_NODE_ID; a VM
    without one holds its MEMORY (MiB) on no particular node."""
    from aifactory_core.one.vm import parse_vm

    request = parse_vm(data, name)
    page = request.hugepage_size * 1024 if request.hugepage_size else None
    cpus: set[int] = set()
    parts: list[tuple[int | None, int]] = []
    for node in request.numa_nodes:
        cpus |= set(node.cpus)
        parts.append((node.memory_node_id, node.memory_kib or 0))
    if not parts and request.memory_mib:
        parts.append((None, request.memory_mib * 1024))
    return _holding(request.vm_id, frozenset(cpus), parts, page)

