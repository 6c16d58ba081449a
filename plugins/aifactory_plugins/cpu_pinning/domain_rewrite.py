"""Write a :class:`~aifactory_plugins.cpu_pinning.planner.Placement` into a libvirt ``<domain>``.

Adds or replaces ``<vcpu cpuset>``, ``<cputune>`` pins (``vcpupin``, ``emulatorpin``,
``iothreadpin``; other children such as ``<shares>`` are kept), ``<numatune>`` (strict memory
nodes and one ``memnode`` per guest cell), ``<cpu><numa>`` guest cells mirroring the host nodes
used, and ``<memoryBacking><hugepages>``. On q35 machines each passthrough device is placed
behind a ``pcie-expander-bus`` whose ``<target><node>`` is the guest cell backing the device's
host node, so the guest sees the host's locality. OpenNebula writes the expander's node as the
host node number (index ``20 + 14 * host node``), which names a guest cell that may not exist;
those nodes are rewritten to the matching guest cell. Everything else in the domain is left as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aifactory_core.cpulist import format_cpulist
from aifactory_core.domain import pci_hostdevs
from aifactory_core.errors import DocumentError

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_plugins.cpu_pinning.planner import Placement

ONED_EXPANDER_BASE = 20
ONED_EXPANDER_STRIDE = 14


def _child(parent: etree._Element, tag: str, before: tuple[str, ...] = ()) -> etree._Element:
    """The first ``tag`` child, created (before the first of ``before`` present) when absent."""
    from lxml import etree

    found = parent.find(tag)
    if found is not None:
        return found
    element = etree.Element(tag)
    for name in before:
        anchor = parent.find(name)
        if anchor is not None:
            anchor.addprevious(element)
            return element
    parent.append(element)
    return element


def _remove_all(parent: etree._Element, tag: str) -> None:
    for element in parent.findall(tag):
        parent.remove(element)


def _set_vcpu(domain: etree._Element, placement: Placement) -> int:
    vcpu = domain.find("vcpu")
    count = len(placement.vcpu_cpus)
    if vcpu is None:
        vcpu = _child(domain, "vcpu", ("memory", "os", "devices"))
        vcpu.text = str(count)
    text = (vcpu.text or "").strip()
    if not text.isdigit() or int(text) != count:
        raise DocumentError(f"domain <vcpu> is {text!r} but the placement has {count} vCPUs")
    vcpu.set("placement", "static")
    vcpu.set("cpuset", format_cpulist(placement.all_vcpu_cpus))
    return count


def _set_cputune(domain: etree._Element, placement: Placement) -> None:
    from lxml import etree

    cputune = _child(domain, "cputune", ("memory", "os", "devices"))
    for tag in ("vcpupin", "emulatorpin", "iothreadpin"):
        _remove_all(cputune, tag)
    for index, cpus in enumerate(placement.vcpu_cpus):
        etree.SubElement(cputune, "vcpupin", vcpu=str(index), cpuset=format_cpulist(cpus))
    etree.SubElement(cputune, "emulatorpin", cpuset=format_cpulist(placement.emulator_cpus))
    iothreads = (domain.findtext("iothreads") or "").strip()
    if iothreads.isdigit():
        for thread in range(1, int(iothreads) + 1):
            etree.SubElement(
                cputune, "iothreadpin", iothread=str(thread), cpuset=format_cpulist(placement.emulator_cpus)
            )


def _set_numatune(domain: etree._Element, placement: Placement) -> None:
    from lxml import etree

    numatune = _child(domain, "numatune", ("os", "devices"))
    for child in list(numatune):
        numatune.remove(child)
    etree.SubElement(numatune, "memory", mode="strict", nodeset=format_cpulist(placement.memory_nodes))
    for cell in placement.cells:
        etree.SubElement(numatune, "memnode", cellid=str(cell.cell_id), mode="strict", nodeset=str(cell.host_node))


def _set_guest_cells(domain: etree._Element, placement: Placement, vcpus: int) -> None:
    from lxml import etree

    cpu = domain.find("cpu")
    if cpu is None:
        cpu = _child(domain, "cpu", ("numatune", "os", "devices"))  # cells only: CPU model untouched
    topology = cpu.find("topology")
    if topology is not None:
        try:
            product = 1
            for key in ("sockets", "dies", "cores", "threads"):
                product *= int(topology.get(key, "1"))
        except ValueError:
            raise DocumentError("domain <cpu><topology> has a non-numeric value") from None
        if product != vcpus:
            raise DocumentError(f"domain <cpu><topology> gives {product} CPUs but the VM has {vcpus} vCPUs")
    numa = cpu.find("numa")
    access: dict[str, str] = {}
    if numa is not None:
        for cell in numa.findall("cell"):
            if cell.get("memAccess"):
                access[cell.get("id", "")] = cell.get("memAccess", "")
        cpu.remove(numa)
    numa = etree.SubElement(cpu, "numa")
    for cell in placement.cells:
        element = etree.SubElement(
            numa, "cell", id=str(cell.cell_id), cpus=format_cpulist(cell.vcpus), memory=str(cell.memory_kib), unit="KiB"
        )
        if str(cell.cell_id) in access:
            element.set("memAccess", access[str(cell.cell_id)])


def _set_hugepages(domain: etree._Element, placement: Placement) -> None:
    from lxml import etree

    backing = domain.find("memoryBacking")
    if not placement.hugepage_kib:
        if backing is not None:
            _remove_all(backing, "hugepages")
            if len(backing) == 0:
                domain.remove(backing)
        return
    backing = _child(domain, "memoryBacking", ("os", "devices"))
    _remove_all(backing, "hugepages")
    hugepages = etree.Element("hugepages")
    backing.insert(0, hugepages)
    etree.SubElement(
        hugepages,
        "page",
        size=str(placement.hugepage_kib),
        unit="KiB",
        nodeset=format_cpulist(c.cell_id for c in placement.cells),
    )


def _int_attr(element: etree._Element, name: str) -> int | None:
    value = element.get(name)
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        raise DocumentError(f"domain <{element.tag}> attribute {name}={value!r} is not a number") from None


def _pci_controllers(devices: etree._Element) -> dict[int, etree._Element]:
    result: dict[int, etree._Element] = {}
    for controller in devices.findall("controller"):
        if controller.get("type") == "pci":
            index = _int_attr(controller, "index")
            if index is not None:
                result[index] = controller
    return result


def _expander_of_bus(controllers: dict[int, etree._Element], bus: int) -> etree._Element | None:
    """Walk up from a controller index to the pcie-expander-bus above it."""
    seen: set[int] = set()
    current: int | None = bus
    while current is not None and current not in seen:
        seen.add(current)
        controller = controllers.get(current)
        if controller is None:
            return None
        if controller.get("model") == "pcie-expander-bus":
            return controller
        address = controller.find("address")
        current = _int_attr(address, "bus") if address is not None else None
    return None


def _expander_node(expander: etree._Element) -> int | None:
    text = expander.findtext("target/node")
    return int(text) if text is not None and text.strip().isdigit() else None


def _fix_oned_expanders(controllers: dict[int, etree._Element], placement: Placement) -> None:
    """OpenNebula numbers expander nodes by host node; make them guest cells of this placement."""
    cells = {cell.host_node: cell.cell_id for cell in placement.cells}
    for index, controller in controllers.items():
        if controller.get("model") != "pcie-expander-bus":
            continue
        node = controller.find("target/node")
        if node is None:
            continue
        offset = index - ONED_EXPANDER_BASE
        host_node = offset // ONED_EXPANDER_STRIDE if offset >= 0 and offset % ONED_EXPANDER_STRIDE == 0 else None
        if host_node is not None and host_node in cells:
            node.text = str(cells[host_node])
        elif _expander_node(controller) not in cells.values():
            node.text = str(placement.cells[0].cell_id)


def _next_bus_nr(controllers: dict[int, etree._Element]) -> int:
    """A guest bus number for a new expander: above those in use, 0x20 apart (as OpenNebula does)."""
    used: list[int] = []
    for controller in controllers.values():
        target = controller.find("target")
        if controller.get("model") == "pcie-expander-bus" and target is not None:
            value = _int_attr(target, "busNr")
            if value is not None:
                used.append(value)
    candidate = max(used, default=0x20) + 0x20 if used else 0x40
    if candidate > 0xE0:
        candidate = next(
            value for value in range(0xF0, 0x10, -0x08) if all(abs(value - other) >= 0x08 for other in used)
        )
    return candidate


def _add_expander(devices: etree._Element, controllers: dict[int, etree._Element], cell_id: int) -> int:
    from lxml import etree

    index = max(controllers, default=0) + 1
    bus_nr = _next_bus_nr(controllers)
    controller = etree.SubElement(devices, "controller", type="pci", index=str(index), model="pcie-expander-bus")
    target = etree.SubElement(controller, "target", busNr=f"0x{bus_nr:02x}")
    etree.SubElement(target, "node").text = str(cell_id)
    controllers[index] = controller
    return index


def _add_root_port(devices: etree._Element, controllers: dict[int, etree._Element], expander_index: int) -> int:
    from lxml import etree

    used: set[tuple[int, int]] = set()
    for controller in controllers.values():
        address = controller.find("address")
        if address is not None and _int_attr(address, "bus") == expander_index:
            used.add((_int_attr(address, "slot") or 0, _int_attr(address, "function") or 0))
    for element in devices:
        address = element.find("address") if element.tag != "controller" else None
        if address is not None and address.get("type") == "pci" and _int_attr(address, "bus") == expander_index:
            used.add((_int_attr(address, "slot") or 0, _int_attr(address, "function") or 0))
    slot = next(value for value in range(32) if all((value, function) not in used for function in range(8)))
    index = max(controllers) + 1
    controller = etree.SubElement(devices, "controller", type="pci", index=str(index), model="pcie-root-port")
    etree.SubElement(
        controller,
        "address",
        type="pci",
        domain="0x0000",
        bus=f"0x{expander_index:02x}",
        slot=f"0x{slot:02x}",
        function="0x0",
    )
    controllers[index] = controller
    return index


def _place_devices(domain: etree._Element, placement: Placement) -> list[str]:
    """Put each placed device behind the expander of its guest cell; notes for what was not."""
    from lxml import etree

    devices = domain.find("devices")
    notes: list[str] = []
    if devices is None:
        return notes
    controllers = _pci_controllers(devices)
    machine = domain.find("os/type")
    q35 = machine is not None and "q35" in (machine.get("machine") or "")
    has_root = any(c.get("model") == "pcie-root" for c in controllers.values())
    _fix_oned_expanders(controllers, placement)
    hostdevs = [(element, ref) for element, ref in pci_hostdevs(domain) if ref.address in placement.device_nodes]
    if not hostdevs:
        return notes
    if not (q35 or has_root):
        return ["guest device locality needs a q35 machine; devices left where they are"]
    if not has_root:
        root = etree.Element("controller", type="pci", index="0", model="pcie-root")
        devices.insert(0, root)
        controllers[0] = root
    for element, ref in hostdevs:
        host_node = placement.device_nodes.get(ref.address)
        cell = placement.cell_of_node(host_node) if host_node is not None else None
        if cell is None:
            continue
        address = element.find("address")
        if address is not None and address.get("type") == "pci":
            bus = _int_attr(address, "bus")
            expander = _expander_of_bus(controllers, bus) if bus is not None else None
            if expander is not None and _expander_node(expander) == cell:
                continue
            element.remove(address)
        expander_index = next(
            (
                index
                for index, c in sorted(controllers.items())
                if c.get("model") == "pcie-expander-bus" and _expander_node(c) == cell
            ),
            None,
        )
        if expander_index is None:
            expander_index = _add_expander(devices, controllers, cell)
        port = _add_root_port(devices, controllers, expander_index)
        etree.SubElement(
            element, "address", type="pci", domain="0x0000", bus=f"0x{port:02x}", slot="0x00", function="0x0"
        )
    return notes


def rewrite_domain(domain: etree._Element, placement: Placement) -> list[str]:
    """Edit ``domain`` in place for ``placement``; returns notes on what could not be done."""
    if domain.tag != "domain":
        raise DocumentError(f"not a libvirt domain (root element <{domain.tag}>)")
    vcpus = _set_vcpu(domain, placement)
    _set_cputune(domain, placement)
    _set_numatune(domain, placement)
    _set_guest_cells(domain, placement, vcpus)
    _set_hugepages(domain, placement)
    return _place_devices(domain, placement)


def minimal_domain(placement: Placement, name: str) -> etree._Element:
    """A small q35 domain around a placement (for ``aifactory plan`` without a deployment file)."""
    from lxml import etree

    memory = sum(cell.memory_kib for cell in placement.cells)
    domain = etree.Element("domain", type="kvm")
    etree.SubElement(domain, "name").text = name
    etree.SubElement(domain, "memory", unit="KiB").text = str(memory)
    etree.SubElement(domain, "vcpu").text = str(len(placement.vcpu_cpus))
    os_element = etree.SubElement(domain, "os")
    etree.SubElement(os_element, "type", arch="x86_64", machine="q35").text = "hvm"
    etree.SubElement(domain, "cpu", mode="host-passthrough")
    devices = etree.SubElement(domain, "devices")
    etree.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
    for address in sorted(placement.device_nodes):
        hostdev = etree.SubElement(devices, "hostdev", mode="subsystem", type="pci", managed="yes")
        source = etree.SubElement(hostdev, "source")
        domain_part, bus, rest = address.split(":")
        slot, function = rest.split(".")
        etree.SubElement(
            source, "address", domain=f"0x{domain_part}", bus=f"0x{bus}", slot=f"0x{slot}", function=f"0x{function}"
        )
    rewrite_domain(domain, placement)
    return domain
