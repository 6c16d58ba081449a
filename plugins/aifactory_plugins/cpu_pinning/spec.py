"""Build a :class:`~aifactory_plugins.cpu_pinning.planner.VmSpec` from what OpenNebula hands over:
the VM document (``TEMPLATE/TOPOLOGY``, ``NUMA_NODE``, ``PCI``) or, at deploy, the domain oned
generated (``<vcpu>``, ``<memory>``, ``<cputune>``/``<numatune>``/``<cpu><numa>``, hostdevs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from aifactory_core.cpulist import parse_cpulist
from aifactory_core.errors import DocumentError, UsageError
from aifactory_core.model import PCI_CLASS_NETWORK
from aifactory_plugins.cpu_pinning.planner import (
    EMULATOR_POLICIES,
    THREAD_POLICIES,
    EmulatorPolicy,
    OnedCell,
    ThreadPolicy,
    VmSpec,
)

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_core.one.vm import VmRequest

THREAD_ATTRIBUTE = "AIFACTORY_THREAD_POLICY"
EMULATOR_ATTRIBUTE = "AIFACTORY_EMULATOR_POLICY"
_UNITS = {
    "b": 1 / 1024,
    "bytes": 1 / 1024,
    "k": 1,
    "kib": 1,
    "kb": 1000 / 1024,
    "m": 1024,
    "mib": 1024,
    "mb": 1000**2 / 1024,
    "g": 1024**2,
    "gib": 1024**2,
    "gb": 1000**3 / 1024,
    "t": 1024**3,
    "tib": 1024**3,
}


@dataclass(frozen=True)
class Policies:
    """The plugin's defaults (config ``[plugin.cpu_pinning]``)."""

    thread: ThreadPolicy = "prefer"
    emulator: EmulatorPolicy = "share"
    conflict: str = "warn"


def _policy(value: str | None, allowed: tuple[str, ...], default: str, what: str) -> str:
    if value is None or not value.strip():
        return default
    value = value.strip().lower()
    if value not in allowed:
        raise DocumentError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return value


def _split_devices(
    addresses: list[str], inventory_classes: Mapping[str, int]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    gpus = tuple(sorted(a for a in addresses if inventory_classes.get(a, 0) >> 16 != PCI_CLASS_NETWORK))
    nics = tuple(sorted(a for a in addresses if inventory_classes.get(a, 0) >> 16 == PCI_CLASS_NETWORK))
    return gpus, nics


def spec_from_request(request: VmRequest, classes: Mapping[str, int], policies: Policies) -> VmSpec:
    """From the VM document; oned's ``NUMA_NODE`` cells are kept when ``TOPOLOGY`` pins."""
    topology = request.topology
    vcpus = request.vcpu
    if vcpus is None and topology is not None and topology.cores:
        vcpus = (topology.sockets or 1) * topology.cores * (topology.threads or 1)
    if vcpus is None:
        vcpus = 1
    if request.memory_mib is None:
        raise DocumentError(f"VM {request.vm_id}: TEMPLATE/MEMORY is missing")
    page_mib = (topology.hugepage_size if topology else None) or request.hugepage_size
    thread = _policy(request.user_template.get(THREAD_ATTRIBUTE), THREAD_POLICIES, policies.thread, THREAD_ATTRIBUTE)
    emulator = _policy(
        request.user_template.get(EMULATOR_ATTRIBUTE), EMULATOR_POLICIES, policies.emulator, EMULATOR_ATTRIBUTE
    )
    cells: tuple[OnedCell, ...] = ()
    shared = False
    if topology is not None and topology.pinned and request.numa_nodes:
        if topology.pin_policy == "CORE" and thread == "prefer":
            thread = "isolate"
        shared = topology.pin_policy == "SHARED"
        built = []
        for index, node in enumerate(request.numa_nodes):
            if node.memory_node_id is None or not node.cpus:
                raise DocumentError(f"VM {request.vm_id}: TEMPLATE/NUMA_NODE[{index}] lacks CPUS or MEMORY_NODE_ID")
            built.append(OnedCell(frozenset(node.cpus), node.memory_node_id, node.memory_kib))
        cells = tuple(built)
    addresses = [item.address for item in request.pci if item.address]
    gpus, nics = _split_devices(addresses, classes)
    return VmSpec(
        vm_id=request.vm_id,
        vcpus=vcpus,
        memory_kib=request.memory_mib * 1024,
        hugepage_kib=page_mib * 1024 if page_mib else None,
        thread_policy=cast(ThreadPolicy, thread),
        emulator_policy=cast(EmulatorPolicy, emulator),
        gpus=gpus,
        nics=nics,
        oned_cells=cells,
        shared_cpus=shared,
    )


def _kib(element: etree._Element, what: str, default_unit: str = "KiB") -> int:
    text = (element.text or "").strip()
    unit = element.get("unit", default_unit).lower()
    if not text.isdigit() or unit not in _UNITS:
        raise DocumentError(f"domain {what} {text!r} {unit!r} is not a memory size")
    return int(int(text) * _UNITS[unit])


def _domain_int(domain: etree._Element, tag: str) -> int:
    text = (domain.findtext(tag) or "").strip()
    if not text.isdigit() or int(text) < 1:
        raise DocumentError(f"domain <{tag}> {text!r} is not a positive number")
    return int(text)


def _cpuset(value: str | None, what: str) -> frozenset[int]:
    try:
        return parse_cpulist(value, what)
    except UsageError as error:
        raise DocumentError(f"domain {error.message}") from None


def oned_cells_from_domain(domain: etree._Element, vcpus: int) -> tuple[tuple[OnedCell, ...], bool]:
    """oned's pinning as it wrote it: ``vcpupin`` per vCPU, ``memnode`` per guest cell."""
    pins = {}
    for pin in domain.findall("cputune/vcpupin"):
        vcpu = pin.get("vcpu", "")
        if not vcpu.isdigit():
            raise DocumentError(f"domain <vcpupin vcpu={vcpu!r}> is not a number")
        pins[int(vcpu)] = _cpuset(pin.get("cpuset"), "vcpupin cpuset")
    if not pins:
        return (), False
    memnodes = {}
    for memnode in domain.findall("numatune/memnode"):
        nodes = _cpuset(memnode.get("nodeset"), "memnode nodeset")
        if memnode.get("cellid", "").isdigit() and len(nodes) == 1:
            memnodes[int(memnode.get("cellid", ""))] = min(nodes)
    default_nodes = _cpuset(
        domain.find("numatune/memory").get("nodeset") if domain.find("numatune/memory") is not None else None,
        "numatune nodeset",
    )
    cells_xml = domain.findall("cpu/numa/cell")
    groups: list[tuple[frozenset[int], int | None, int | None]] = []
    if cells_xml:
        for index, cell in enumerate(cells_xml):
            cell_id = int(cell.get("id", str(index))) if cell.get("id", str(index)).isdigit() else index
            memory = _kib_attr(cell)
            groups.append((_cpuset(cell.get("cpus"), "cell cpus"), memnodes.get(cell_id), memory))
    else:
        groups.append((frozenset(range(vcpus)), None, None))
    cells = []
    shared = any(len(cpus) > 1 for cpus in pins.values())
    for guest_cpus, node, memory in groups:
        host = frozenset(cpu for vcpu in guest_cpus for cpu in pins.get(vcpu, frozenset()))
        if node is None:
            node = min(default_nodes) if len(default_nodes) == 1 else None
        if node is None or not host:
            return (), False  # pinned CPUs without a memory node: not oned's NUMA pinning
        cells.append(OnedCell(host, node, memory))
    return tuple(cells), shared


def _kib_attr(cell: etree._Element) -> int | None:
    memory = cell.get("memory")
    if memory is None or not memory.isdigit():
        return None
    unit = cell.get("unit", "KiB").lower()
    return int(int(memory) * _UNITS.get(unit, 1))


def domain_memory_kib(domain: etree._Element) -> int:
    """The domain's ``<memory>`` in KiB."""
    memory_element = domain.find("memory")
    if memory_element is None:
        raise DocumentError("domain has no <memory>")
    return _kib(memory_element, "<memory>")


def domain_hugepage_kib(domain: etree._Element) -> int | None:
    """The hugepage size the domain's memory is backed by (KiB; 2 MiB when no size is given)."""
    page = domain.find("memoryBacking/hugepages/page")
    if page is not None:
        size = page.get("size", "")
        if not size.isdigit():
            raise DocumentError(f"domain hugepage size {size!r} is not a number")
        return int(int(size) * _UNITS.get(page.get("unit", "KiB").lower(), 1))
    if domain.find("memoryBacking/hugepages") is not None:
        return 2048
    return None


def cell_memory_kib(cell: etree._Element) -> int | None:
    """A ``<cpu><numa><cell>``'s memory in KiB."""
    return _kib_attr(cell)


def spec_from_domain(
    domain: etree._Element, vm_id: int, addresses: list[str], classes: Mapping[str, int], policies: Policies
) -> VmSpec:
    """From the deployment file oned generated (the truth at deploy time on the host)."""
    vcpus = _domain_int(domain, "vcpu")
    memory = domain_memory_kib(domain)
    page_kib = domain_hugepage_kib(domain)
    cells, shared = oned_cells_from_domain(domain, vcpus)
    gpus, nics = _split_devices(addresses, classes)
    thread: ThreadPolicy = policies.thread
    return VmSpec(vm_id, vcpus, memory, page_kib, thread, policies.emulator, gpus, nics, cells, shared)
