"""Write a :class:`~aifactory_plugins.cpu_pinning.planner.Placement` into a libvirt ``<domain>``.

Adds or replaces ``<vcpu cpuset>``, ``<cputune>`` pins (``vcpupin``, ``emulatorpin``,
``iothreadpin``; other children such as ``<shares>`` are kept), ``<numatune>`` (strict memory
nodes and one ``memnode`` per guest cell), ``<cpu><numa>`` guest cells mirroring the host nodes
used, and ``<memoryBacking><hugepages>``. On q35 machines each passthrough device is placed
behind a ``pcie-expander-bus`` whose ``<target><node>`` is the guest cell backing the device's
host node, so the guest sees the host's locality. Everything else in the domain is left as it is.

The PCI tree is read from the domain itself, never from an OpenNebula version's numbering: oned
7.0 puts its expanders at index ``20 + 14 * i`` behind a switch, 7.4 at ``3 + 9 * i`` with eight
root ports each plus one expander per ``ROOT = "dedicated"`` device, and an unpinned VM gets a flat
row of root ports (without indexes on 7.0: libvirt gives each the lowest free index). Both number
a device's port by its *host* node (OpenNebula/one#7408), so it may hang off an expander of another
guest cell or off a controller that does not exist. Each expander is labelled with the guest cell
of the devices found beneath it (walking each hostdev's ``bus`` up through the controllers); one
with none keeps its node when that is a guest cell of the placement, else gets the first cell; a
device not beneath an expander of its own cell gets a new root port on one (added when missing),
with indexes and bus numbers above those the domain uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aifactory_core.cpulist import format_cpulist
from aifactory_core.domain import pci_hostdevs
from aifactory_core.errors import DocumentError

if TYPE_CHECKING:
    from lxml import etree

    from aifactory_plugins.cpu_pinning.planner import Placement


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
    """The PCI controllers by index. One without an index gets what libvirt gives it: in document
    order, the lowest index no other PCI controller holds."""
    result: dict[int, etree._Element] = {}
    unindexed: list[etree._Element] = []
    for controller in devices.findall("controller"):
        if controller.get("type") == "pci":
            index = _int_attr(controller, "index")
            if index is None:
                unindexed.append(controller)
            else:
                result[index] = controller
    for controller in unindexed:
        index = 0
        while index in result:
            index += 1
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


def _hostdev_bus(element: etree._Element) -> int | None:
    address = element.find("address")
    if address is None or address.get("type") != "pci":
        return None
    return _int_attr(address, "bus")


def _guest_slot(element: etree._Element) -> tuple[int | None, int | None, int | None]:
    """A hostdev's guest (bus, slot, function). oned may give two devices the same port (7.4: a
    shared device of a host node without a guest cell lands on a dedicated device's port)."""
    address = element.find("address")
    if address is None or address.get("type") != "pci":
        return (None, None, None)
    return (_int_attr(address, "bus"), _int_attr(address, "slot") or 0, _int_attr(address, "function") or 0)


def _label_expanders(
    controllers: dict[int, etree._Element],
    hostdevs: list[tuple[etree._Element, int]],
    placement: Placement,
) -> None:
    """Each expander's node: the guest cell of the first placed device beneath it; an expander
    with none keeps a node that is a guest cell of the placement, else gets the first cell."""
    beneath: dict[int, int] = {}
    for element, cell in hostdevs:
        bus = _hostdev_bus(element)
        expander = _expander_of_bus(controllers, bus) if bus is not None else None
        if expander is not None:
            beneath.setdefault(id(expander), cell)
    cells = {cell.cell_id for cell in placement.cells}
    for controller in controllers.values():
        if controller.get("model") != "pcie-expander-bus":
            continue
        node = controller.find("target/node")
        if node is None:
            continue
        if id(controller) in beneath:
            node.text = str(beneath[id(controller)])
        elif _expander_node(controller) not in cells:
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


_PORTS = ("pcie-root-port", "pcie-switch-downstream-port")


def _free_port(devices: etree._Element, controllers: dict[int, etree._Element], expander_index: int) -> int | None:
    """A port beneath the expander that nothing is plugged into (oned makes several per expander)."""
    used = {_int_attr(address, "bus") for address in devices.iter("address") if address.get("type") == "pci"}
    expander = controllers[expander_index]
    for index, controller in sorted(controllers.items()):
        if (
            controller.get("model") in _PORTS
            and index not in used
            and _expander_of_bus(controllers, index) is expander
        ):
            return index
    return None


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
    hostdevs: list[tuple[etree._Element, int]] = []
    for element, ref in pci_hostdevs(domain):
        host_node = placement.device_nodes.get(ref.address)
        cell = placement.cell_of_node(host_node) if host_node is not None else None
        if cell is not None:
            hostdevs.append((element, cell))
    _label_expanders(controllers, hostdevs, placement)
    if not hostdevs:
        return notes
    if not (q35 or has_root):
        return ["guest device locality needs a q35 machine; devices left where they are"]
    if not has_root:
        root = etree.Element("controller", type="pci", index="0", model="pcie-root")
        devices.insert(0, root)
        controllers[0] = root
    occupied: set[tuple[int | None, int | None, int | None]] = set()
    for element, cell in hostdevs:
        bus = _hostdev_bus(element)
        expander = _expander_of_bus(controllers, bus) if bus is not None else None
        where = _guest_slot(element)
        if expander is not None and _expander_node(expander) == cell and where not in occupied:
            occupied.add(where)
            continue
        address = element.find("address")
        if address is not None:
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
        port = _free_port(devices, controllers, expander_index)
        if port is None:
            port = _add_root_port(devices, controllers, expander_index)
        etree.SubElement(
            element, "address", type="pci", domain="0x0000", bus=f"0x{port:02x}", slot="0x00", function="0x0"
        )
        occupied.add(_guest_slot(element))
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
