"""OpenNebula's deployment files through the cpu_pinning rewrite: the host oned placed them on,
deployment files shaped like 7.0.2's and 7.4.0's, and the checks every rewritten domain must pass.

The dummy IM driver's host (``src/im_mad/remotes/dummy-probes.d/host/system/system.rb``): two NUMA
nodes of 8 cores with 4 threads (core ``c`` of node ``n`` is ``c + 8 n``, its threads
``core + 16 k``), 8 GiB each, an NVIDIA ``10de:0863`` at ``02:00.0`` and an ``1b21:0aa7`` USB
controller at ``00:06.0`` on node 1, an ``1022:0aa9`` at ``00:06.1`` on node 0.

The q35 PCI trees (read from ``src/vmm/LibVirtDriverKVM.cc`` and ``HostSharePCI::set_pci_address``
of each release; :func:`oned_domain` writes them):

- not pinned (no ``NUMA_NODE``): a flat row of root ports and a ``pcie-to-pci-bridge`` (7.0: 16
  root ports without ``index``; 7.4: indexes 1..16, the bridge 17); a device's address is bus
  ``PCI_ID + 1``.
- pinned, 7.0: per guest cell ``i`` an expander at index ``20 + 14 i`` (busNr ``0x20 + 0x20 i``,
  ``<node>i</node>``), four root ports, a switch on the first with eight downstream ports
  (``+6 .. +13``), and an unindexed bridge on bus 22; a device of host node ``n`` takes the first
  free downstream port of ``20 + 14 n`` (by its *host* node, OpenNebula/one#7408).
- pinned, 7.4: a root port at 1 and the bridge at 2; per guest cell ``i`` an expander at
  ``3 + 9 i`` (busNr ``0x20 + 0x10 i``) with eight root ports; per ``ROOT = "dedicated"`` device
  ``d`` an expander at ``3 + 9 cells + 2 d`` (busNr ``0xa0 + 0x08 d``, ``<node>`` = the device's
  host node) and a root port above it. A shared device of host node ``n`` takes the first free
  root port ``3 + 9 n + 1 ...``, a dedicated one its expander's port.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import MappingProxyType
from typing import Any

from aifactory_plugins.cpu_pinning.domain_rewrite import rewrite_domain
from aifactory_plugins.cpu_pinning.planner import HostUsage, Placement, plan
from aifactory_plugins.cpu_pinning.spec import Policies, spec_from_domain
from aifactory_plugins.cpu_pinning.topology import HostNode, HostTopology

from aifactory_core.domain import dump_domain, load_domain, pci_hostdevs

GIB = 1 << 20
DUMMY_DEVICES = {"0000:02:00.0": 1, "0000:00:06.0": 1, "0000:00:06.1": 0}
DUMMY_CLASSES = {"0000:02:00.0": 0x030200, "0000:00:06.0": 0x0C0310, "0000:00:06.1": 0x0C0320}


def dummy_topology() -> HostTopology:
    """The dummy IM driver's host, as the planner sees it."""
    nodes = []
    for node in range(2):
        cores = tuple(tuple(core + 16 * thread for thread in range(4)) for core in range(8 * node, 8 * node + 8))
        nodes.append(HostNode(node, cores, 8 * GIB, MappingProxyType({})))
    return HostTopology(
        nodes=tuple(nodes),
        distances=MappingProxyType({(0, 1): 20, (1, 0): 20}),
        reserved=frozenset(),
        threads_per_core=4,
        device_nodes=MappingProxyType(dict(DUMMY_DEVICES)),
        device_parents=MappingProxyType({}),
    )


# ----------------------------------------------------------------------------------------------
# Deployment files shaped like each version's: the synthesized 7.0.2 sample's disks, NIC, channel
# and metadata, with the vCPU/NUMA part and the PCI tree of the VM kind and version asked for.

SAMPLE = Path(__file__).resolve().parent / "fixtures/opennebula/samples/synthesized/deployment.0.xml"
VERSIONS = ("7.0.2", "7.4.0")
# kind -> (vCPU element, guest cells as (host node, host CPUs), devices in PCI_ID order, dedicated)
KINDS: dict[str, tuple[str, tuple[tuple[int, tuple[int, ...]], ...], tuple[str, ...], frozenset[str]]] = {
    "flat": ("<vcpu>2</vcpu>", (), ("0000:00:06.1",), frozenset()),
    "vcpu-max": ("<vcpu current='2'>4</vcpu>", (), ("0000:02:00.0",), frozenset()),
    # one cell on host node 1 with the GPU of node 1: its port is numbered for node 1 (#7408)
    "pinned": ("<vcpu>4</vcpu>", ((1, (8, 24, 9, 25)),), ("0000:02:00.0",), frozenset()),
    "pinned-2cells": ("<vcpu>4</vcpu>", ((0, (0, 16)), (1, (8, 24))), ("0000:00:06.1", "0000:00:06.0"), frozenset()),
    # guest cell 0 on host node 1, cell 1 on node 0: each device's expander is the other cell's
    "pinned-2cells-crossed": ("<vcpu>4</vcpu>", ((1, (8, 24)), (0, (0, 16))), ("0000:00:06.1", "0000:00:06.0"),
                              frozenset()),
    # 7.4's ROOT = "dedicated": an expander of its own for the GPU
    "dedicated": ("<vcpu>4</vcpu>", ((1, (8, 24, 9, 25)),), ("0000:02:00.0", "0000:00:06.0"),
                  frozenset({"0000:02:00.0"})),
}


def _cpu_part(vcpu: str, cells: tuple[tuple[int, tuple[int, ...]], ...]) -> str:
    """``<vcpu>``, ``<cputune>``, ``<cpu>``, ``<numatune>`` as oned's pin_cpu()/vtopol() write them."""
    if not cells:
        return f"\t{vcpu}\n\t<cputune>\n\t\t<shares>200</shares>\n\t</cputune>\n\t<memory>262144</memory>\n"
    pins, cell_lines, memnodes, vcpu_id = [], [], [], 0
    for cell_id, (node, cpus) in enumerate(cells):
        first = vcpu_id
        for cpu in cpus:
            pins.append(f"\t\t<vcpupin vcpu='{vcpu_id}' cpuset='{cpu}'/>\n")
            vcpu_id += 1
        cell_lines.append(f"\t\t\t<cell id='{cell_id}' memory='{524288 // len(cells)}' "
                          f"cpus='{first}-{vcpu_id - 1}'/>\n")
        memnodes.append(f"\t\t<memnode cellid='{cell_id}' mode='strict' nodeset='{node}'/>\n")
    every = ",".join(str(cpu) for _node, cpus in cells for cpu in cpus)
    nodes = ",".join(str(node) for node, _cpus in cells)
    return (f"\t{vcpu}\n\t<cputune>\n\t\t<shares>400</shares>\n{''.join(pins)}\t\t<emulatorpin cpuset='{every}'/>\n"
            f"\t</cputune>\n\t<memory>524288</memory>\n"
            f"\t<cpu mode='host-passthrough'>\n\t\t<topology sockets='{len(cells)}' "
            f"cores='{vcpu_id // len(cells) // 2}' threads='2'/>\n"
            f"\t\t<numa>\n{''.join(cell_lines)}\t\t</numa>\n\t</cpu>\n"
            f"\t<numatune>\n{''.join(memnodes)}\t\t<memory mode='strict' nodeset='{nodes}'/>\n\t</numatune>\n")


def _tree_7_0(cells: int) -> str:
    lines = ["<controller index='0' type='pci' model='pcie-root'/>"]
    if not cells:
        lines += ["<controller type='pci' model='pcie-root-port'/>"] * 16
        lines.append("<controller type='pci' model='pcie-to-pci-bridge'/>")
        return "\n".join(lines)
    for cell in range(cells):
        bus = 20 + 14 * cell
        lines.append(f"<controller type='pci' index='{bus}' model='pcie-expander-bus'>"
                     f"<target busNr='0x{0x20 + 0x20 * cell:02x}'><node>{cell}</node></target></controller>")
        for function in range(4):
            multifunction = " multifunction='on'" if function == 0 else ""
            lines.append(f"<controller type='pci' index='{bus + 1 + function}' model='pcie-root-port'>"
                         f"<address type='pci' bus='{bus}' slot='0' function='{function}'{multifunction}/>"
                         "</controller>")
        lines.append(f"<controller type='pci' index='{bus + 5}' model='pcie-switch-upstream-port'>"
                     f"<address type='pci' bus='{bus + 1}' slot='0' function='0'/></controller>")
        lines += [f"<controller type='pci' index='{bus + 6 + slot}' model='pcie-switch-downstream-port'>"
                  f"<address type='pci' bus='{bus + 5}' slot='{slot}' function='0'/></controller>"
                  for slot in range(8)]
    lines.append("<controller type='pci' model='pcie-to-pci-bridge'>"
                 "<address type='pci' bus='22' slot='0' function='0'/></controller>")
    return "\n".join(lines)


def _tree_7_4(cells: int, dedicated: list[int]) -> str:
    lines = ["<controller index='0' type='pci' model='pcie-root'/>"]
    if not cells:
        lines += [f"<controller type='pci' index='{index}' model='pcie-root-port'/>" for index in range(1, 17)]
        lines.append("<controller type='pci' index='17' model='pcie-to-pci-bridge'/>")
        return "\n".join(lines)
    lines.append("<controller type='pci' index='1' model='pcie-root-port'/>")
    lines.append("<controller type='pci' index='2' model='pcie-to-pci-bridge'/>")
    for cell in range(cells):
        bus = 3 + 9 * cell
        lines.append(f"<controller type='pci' index='{bus}' model='pcie-expander-bus'>"
                     f"<target busNr='0x{0x20 + 0x10 * cell:02x}'><node>{cell}</node></target></controller>")
        for function in range(8):
            multifunction = " multifunction='on'" if function == 0 else ""
            lines.append(f"<controller type='pci' index='{bus + 1 + function}' model='pcie-root-port'>"
                         f"<address type='pci' bus='{bus}' slot='0' function='{function}'{multifunction}/>"
                         "</controller>")
    bus = 3 + 9 * cells
    for number, host_node in enumerate(dedicated):
        lines.append(f"<controller type='pci' index='{bus}' model='pcie-expander-bus'>"
                     f"<target busNr='0x{0xA0 + 0x08 * number:02x}'><node>{host_node}</node></target></controller>")
        lines.append(f"<controller type='pci' index='{bus + 1}' model='pcie-root-port'>"
                     f"<address type='pci' bus='{bus}' slot='0' function='0x0'/></controller>")
        bus += 2
    return "\n".join(lines)


def _guest_addresses(version: str, cells: int, devices: tuple[str, ...], dedicated: frozenset[str]) -> list[str]:
    """Each hostdev's ``<address>`` as oned writes it (HostSharePCI::set_pci_address)."""
    if not cells:  # flat: bus PCI_ID + 1, as VM_BUS/VM_SLOT print with showbase
        return [f"<address type='pci' domain=\"0x0000\" bus=\"0x{number + 1:02x}\" slot=\"0000\" function=\"0\"/>"
                for number in range(len(devices))]
    taken: set[int] = set()
    result = []
    dedicated_port = 3 + 9 * cells + 1
    for address in devices:
        node = DUMMY_DEVICES[address]
        if version == "7.4.0" and address in dedicated:
            index, dedicated_port = dedicated_port, dedicated_port + 2
        else:
            first = 20 + 14 * node + 6 if version == "7.0.2" else 3 + 9 * node + 1
            index = next(port for port in range(first, first + 8) if port not in taken)
            taken.add(index)
        slot = "slot='0000' function='0'" if version == "7.0.2" else "slot='0x00' function='0x0'"
        result.append(f"<address type='pci' domain='0x0000' {slot}  bus=\"{index}\"/>")
    return result


def oned_domain(version: str, kind: str) -> str:
    """A deployment file of ``kind`` (:data:`KINDS`) as OpenNebula ``version`` writes it."""
    vcpu, cells, devices, dedicated = KINDS[kind]
    text = re.sub(r"<!--.*?-->", "", SAMPLE.read_text(), flags=re.S)
    head, rest = text.split("\t<os>", 1)
    head = head[:head.index("\t<vcpu>")] + _cpu_part(vcpu, cells)
    rest = re.sub(r"\t<cpu mode=.*?</numatune>\n", "", rest, flags=re.S)
    rest = re.sub(r"\t<memoryBacking>.*?</memoryBacking>\n", "", rest, flags=re.S)  # no hugepages here
    rest = re.sub(r"\t\t<hostdev .*?</hostdev>\n", "", rest, flags=re.S)
    rest = re.sub(r"\t\t<controller (?:index='0' )?type='pci'.*?(?:/>|</controller>)\n(?=\t\t<controller|\t</devices>)",
                  "", rest, flags=re.S)
    rest = re.sub(r"\t\t<controller type='pci'.*?\n\t</devices>", "\t</devices>", rest, count=1, flags=re.S)
    hostdevs = "".join(
        f"\t\t<hostdev mode='subsystem' type='pci' managed='yes'>\n\t\t\t<source>\n"
        f"\t\t\t\t<address  domain='0x0000' bus='0x{address[5:7]}' slot='0x{address[8:10]}' "
        f"function='0x{address[11]}'/>\n\t\t\t</source>\n\t\t\t{guest}\n\t\t</hostdev>\n"
        for address, guest in zip(devices, _guest_addresses(version, len(cells), devices, dedicated), strict=True))
    tree = (_tree_7_0(len(cells)) if version == "7.0.2"
            else _tree_7_4(len(cells), [DUMMY_DEVICES[a] for a in devices if a in dedicated]))
    rest = rest.replace("\t</devices>", hostdevs + tree + "\n\t</devices>", 1)
    return head + "\t<os>" + rest


# ----------------------------------------------------------------------------------------------
# What every rewritten domain must be


def _int(value: str | None) -> int | None:
    return None if value is None else int(value, 0)


def effective_indexes(domain: Any) -> dict[int, Any]:
    """PCI controllers by index, unindexed ones numbered as libvirt does (lowest free, in order)."""
    result: dict[int, Any] = {}
    unindexed = []
    for controller in domain.findall("devices/controller[@type='pci']"):
        index = _int(controller.get("index"))
        if index is None:
            unindexed.append(controller)
        else:
            assert index not in result, f"two PCI controllers with index {index}"
            result[index] = controller
    for controller in unindexed:
        index = next(value for value in range(256) if value not in result)
        result[index] = controller
    return result


def dangling_buses(domain: Any) -> list[int]:
    """PCI addresses naming a bus no controller provides."""
    controllers = effective_indexes(domain)
    return sorted({bus for address in domain.iter("address") if address.get("type") == "pci"
                   and (bus := _int(address.get("bus"))) is not None and bus not in controllers})


def shared_guest_addresses(domain: Any) -> list[tuple[int, int, int]]:
    """Guest PCI addresses two hostdevs both take."""
    seen: set[tuple[int, int, int]] = set()
    twice = []
    for element, _ref in pci_hostdevs(domain):
        address = element.find("address")
        if address is None:
            continue
        where = (int(address.get("bus"), 0), int(address.get("slot", "0"), 0), int(address.get("function", "0"), 0))
        if where in seen:
            twice.append(where)
        seen.add(where)
    return twice


def expander_above(domain: Any, bus: int) -> Any:
    controllers = effective_indexes(domain)
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
        current = _int(address.get("bus")) if address is not None else None
    return None


def validate(xml: bytes, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(xml)
    done = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr + done.stdout


def check_rewrite_of_oned_domain(data: bytes, tmp_path: Path, vm_id: int = 7) -> tuple[Any, Placement]:
    """Plan the deployment file on the dummy host, rewrite it, and check the result."""
    domain = load_domain(data)
    addresses = [ref.address for _, ref in pci_hostdevs(domain)]
    spec = spec_from_domain(domain, vm_id, addresses, DUMMY_CLASSES, Policies())
    placement = plan(dummy_topology(), HostUsage(), spec)
    assert isinstance(placement, Placement), placement
    assert rewrite_domain(domain, placement) == []
    xml = dump_domain(domain)
    validate(xml, tmp_path, "rewritten.xml")
    assert dangling_buses(domain) == [] and shared_guest_addresses(domain) == []
    cells = {cell.cell_id for cell in placement.cells}
    for expander in domain.findall("devices/controller[@model='pcie-expander-bus']"):
        assert int(expander.findtext("target/node")) in cells
    for element, ref in pci_hostdevs(domain):
        cell = placement.cell_of_node(DUMMY_DEVICES[ref.address])
        if cell is None:  # not device-local: left where oned put it
            continue
        address = element.find("address")
        expander = expander_above(domain, int(address.get("bus"), 0))
        assert expander is not None, f"{ref.address} is not behind an expander bus"
        assert int(expander.findtext("target/node")) == cell
    vcpu = domain.find("vcpu")
    pins = sorted(int(pin.get("vcpu")) for pin in domain.findall("cputune/vcpupin"))
    assert pins == list(range(int(vcpu.text))), "every possible vCPU is pinned"
    rewrite_domain(domain, placement)
    assert dump_domain(domain) == xml, "rewriting twice gives the same document"
    return domain, placement
