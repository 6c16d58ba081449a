"""The ``<VM>`` document OpenNebula hands to hooks and drivers, as small frozen dataclasses.

``vm_from_element`` reads the shape of ``VirtualMachine::to_xml_extended`` (hooks' ``$TEMPLATE``,
state-hook messages, ``VMM_DRIVER_ACTION_DATA/VM``) and the reduced VM the VMM driver passes to
VNM drivers (only ID, DEPLOY_ID, TEMPLATE/{NIC,PCI,CONTEXT}, USER_TEMPLATE and HISTORY): only
``ID`` is required, every other field is ``None``/empty when the document lacks it.

Every number is validated; a malformed value raises :class:`DocumentError` naming the element
(``VM/TEMPLATE/PCI[1]/VENDOR``). PCI addresses are canonicalised to ``dddd:bb:ss.f`` with
:func:`aifactory_core.validate.pci_address` (OpenNebula writes ``ADDRESS`` as ``0000:17:00:0``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from aifactory_core import validate
from aifactory_core.errors import DocumentError, UsageError
from aifactory_core.model import PCI_CLASS_NETWORK

if TYPE_CHECKING:
    from lxml import etree

T = TypeVar("T")

VM_STATES: dict[int, str] = {
    0: "INIT", 1: "PENDING", 2: "HOLD", 3: "ACTIVE", 4: "STOPPED", 5: "SUSPENDED", 6: "DONE",
    7: "FAILED", 8: "POWEROFF", 9: "UNDEPLOYED", 10: "CLONING", 11: "CLONING_FAILURE",
}  # fmt: skip

LCM_STATES: dict[int, str] = dict(
    enumerate(
        (
            "LCM_INIT PROLOG BOOT RUNNING MIGRATE SAVE_STOP SAVE_SUSPEND SAVE_MIGRATE PROLOG_MIGRATE "
            "PROLOG_RESUME EPILOG_STOP EPILOG SHUTDOWN CANCEL FAILURE CLEANUP_RESUBMIT UNKNOWN HOTPLUG "
            "SHUTDOWN_POWEROFF BOOT_UNKNOWN BOOT_POWEROFF BOOT_SUSPENDED BOOT_STOPPED CLEANUP_DELETE "
            "HOTPLUG_SNAPSHOT HOTPLUG_NIC HOTPLUG_SAVEAS HOTPLUG_SAVEAS_POWEROFF HOTPLUG_SAVEAS_SUSPENDED "
            "SHUTDOWN_UNDEPLOY EPILOG_UNDEPLOY PROLOG_UNDEPLOY BOOT_UNDEPLOY HOTPLUG_PROLOG_POWEROFF "
            "HOTPLUG_EPILOG_POWEROFF BOOT_MIGRATE BOOT_FAILURE BOOT_MIGRATE_FAILURE PROLOG_MIGRATE_FAILURE "
            "PROLOG_FAILURE EPILOG_FAILURE EPILOG_STOP_FAILURE EPILOG_UNDEPLOY_FAILURE "
            "PROLOG_MIGRATE_POWEROFF PROLOG_MIGRATE_POWEROFF_FAILURE PROLOG_MIGRATE_SUSPEND "
            "PROLOG_MIGRATE_SUSPEND_FAILURE BOOT_UNDEPLOY_FAILURE BOOT_STOPPED_FAILURE "
            "PROLOG_RESUME_FAILURE PROLOG_UNDEPLOY_FAILURE DISK_SNAPSHOT_POWEROFF "
            "DISK_SNAPSHOT_REVERT_POWEROFF DISK_SNAPSHOT_DELETE_POWEROFF DISK_SNAPSHOT_SUSPENDED "
            "DISK_SNAPSHOT_REVERT_SUSPENDED DISK_SNAPSHOT_DELETE_SUSPENDED DISK_SNAPSHOT "
            "DISK_SNAPSHOT_REVERT DISK_SNAPSHOT_DELETE PROLOG_MIGRATE_UNKNOWN "
            "PROLOG_MIGRATE_UNKNOWN_FAILURE DISK_RESIZE DISK_RESIZE_POWEROFF DISK_RESIZE_UNDEPLOYED "
            "HOTPLUG_NIC_POWEROFF HOTPLUG_RESIZE HOTPLUG_SAVEAS_UNDEPLOYED HOTPLUG_SAVEAS_STOPPED "
            "BACKUP BACKUP_POWEROFF RESTORE"
        ).split()
    )
)  # include/VirtualMachine.h (7.0.2); 13, 14, 55, 58 are retired values kept for numbering

PIN_POLICIES = frozenset({"NONE", "CORE", "THREAD", "SHARED"})
MEMORY_ACCESS = frozenset({"shared", "private"})
MAX_ID = 2**31 - 1
MAX_VNI = 2**24 - 1  # VLAN_ID doubles as the VXLAN VNI
_SAFE_TOKEN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,254}\Z")
_CPU_LIST = re.compile(r"\A\d{1,5}(,\d{1,5})*\Z")
_ATTR_NAME = re.compile(r"\A[A-Za-z0-9_]+\Z")


# --------------------------------------------------------------------------------------------
# Reading helpers: each names the element it complains about.


class _Node:
    """An element plus the path used in error messages."""

    __slots__ = ("element", "path")

    def __init__(self, element: etree._Element, path: str) -> None:
        self.element = element
        self.path = path

    def child(self, tag: str) -> _Node | None:
        found = self.element.find(tag)
        return None if found is None else _Node(found, f"{self.path}/{tag}")

    def children(self, tag: str) -> list[_Node]:
        found = self.element.findall(tag)
        if len(found) == 1:
            return [_Node(found[0], f"{self.path}/{tag}")]
        return [_Node(item, f"{self.path}/{tag}[{index}]") for index, item in enumerate(found)]

    def text(self, tag: str) -> str | None:
        """Text of a child element; None when absent or empty."""
        found = self.element.find(tag)
        if found is None:
            return None
        if len(found):
            raise DocumentError(f"{self.path}/{tag} must be a simple value, not a structure")
        text = found.text
        return text if text else None

    def convert(self, tag: str, parse: Callable[[str], T], expected: str) -> T | None:
        raw = self.text(tag)
        if raw is None or not raw.strip():
            return None
        try:
            return parse(raw.strip())
        except (ValueError, UsageError) as error:
            detail = str(error) if isinstance(error, UsageError) else expected
            raise DocumentError(f"{self.path}/{tag} {_show(raw)}: {detail}") from None

    def integer(self, tag: str, low: int = 0, high: int = MAX_ID, *, none: tuple[str, ...] = ()) -> int | None:
        raw = self.text(tag)
        if raw is not None and raw.strip() in none:
            return None

        def parse(text: str) -> int:
            if not re.fullmatch(r"-?[0-9]{1,12}", text):
                raise ValueError
            number = int(text)
            if not low <= number <= high:
                raise UsageError(f"outside {low}..{high}")
            return number

        return self.convert(tag, parse, "not an integer")

    def required_integer(self, tag: str, low: int = 0, high: int = MAX_ID) -> int:
        number = self.integer(tag, low, high)
        if number is None:
            raise DocumentError(f"{self.path}/{tag} is missing")
        return number

    def number(self, tag: str) -> float | None:
        def parse(text: str) -> float:
            if not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,12})?", text):
                raise ValueError
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value

        return self.convert(tag, parse, "not a non-negative number")

    def hex_id(self, tag: str) -> int | None:
        return self.convert(tag, lambda text: validate.hex_id(text, tag.lower()), "not a hex id")

    def pci(self, tag: str) -> str | None:
        return self.convert(tag, validate.pci_address, "not a PCI address")

    def mac(self, tag: str) -> str | None:
        return self.convert(tag, validate.mac_address, "not a MAC address")

    def ifname(self, tag: str) -> str | None:
        return self.convert(tag, validate.ifname, "not an interface name")

    def token(self, tag: str) -> str | None:
        """A value that may reach argv or a path: no blanks, no '/', printable ASCII."""

        def parse(text: str) -> str:
            if not _SAFE_TOKEN.match(text):
                raise UsageError("unexpected characters")
            return text

        return self.convert(tag, parse, "unexpected characters")

    def leaves(self) -> Mapping[str, str]:
        """Simple children as a read-only mapping (first occurrence of a name wins)."""
        result: dict[str, str] = {}
        for child in self.element:
            tag = child.tag
            if isinstance(tag, str) and len(child) == 0 and tag not in result:
                result[tag] = child.text or ""
        return MappingProxyType(result)


def _show(raw: str) -> str:
    text = raw if len(raw) <= 40 else raw[:37] + "..."
    return repr(text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


class _Record:
    """``to_dict()`` for the dataclasses below (JSON-ready: mappings become dicts, tuples lists)."""

    def to_dict(self) -> dict[str, Any]:
        return {item.name: _jsonable(getattr(self, item.name)) for item in fields(self)}  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# The request objects.


@dataclass(frozen=True)
class PciRequest(_Record):
    """One ``TEMPLATE/PCI``: a passthrough device, or with ``TYPE = "NIC"`` an SR-IOV/PCI NIC.

    Before dispatch only the user's selectors (vendor/device/class or short_address) are set;
    after allocation oned adds the host ``address``, ``numa_node`` and the guest ``vm_*`` fields
    and copies the host device's VENDOR/DEVICE/CLASS over the selectors (HostSharePCI::pci_attribute).
    oned picks the device by those selectors (or by SHORT_ADDRESS alone) whatever the TYPE: what a
    request gets is told by :attr:`network_function`, never by :attr:`is_nic`.
    """

    pci_id: int | None
    type: str | None
    address: str | None
    short_address: str | None
    vendor: int | None
    device: int | None
    device_class: int | None
    numa_node: int | None
    nic_id: int | None
    network: str | None
    network_id: int | None
    vlan_id: int | None
    mac: str | None
    phydev: str | None
    vn_mad: str | None
    vm_address: str | None
    vm_bus: int | None
    vm_bus_index: int | None
    uuid: str | None
    profile: str | None
    mdev_mode: str | None
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @property
    def is_nic(self) -> bool:
        """oned's own test (``vector_value("TYPE") == "NIC"``, case and all): the request gets a
        network (NETWORK, VLAN, VN_MAD) and the VNM drivers configure it; any other TYPE is a plain
        passthrough device to oned."""
        return self.type == "NIC"

    @property
    def network_function(self) -> bool:
        """True when every device oned may give for this request is a network function (PCI base
        class 0x02): its CLASS says so (oned matches CLASS exactly, and copies the host device's
        class in once allocated). Without a CLASS the request may get any device of its vendor."""
        return self.device_class is not None and self.device_class >> 8 == PCI_CLASS_NETWORK

    @property
    def selects_by_address(self) -> bool:
        """oned allocates this request by SHORT_ADDRESS alone (HostSharePCI::test: no VENDOR,
        DEVICE or CLASS named) and it has no host address yet: what it gets is the device there."""
        return (self.address is None and self.short_address is not None
                and self.vendor is None and self.device is None and self.device_class is None)

    @property
    def allocated(self) -> bool:
        """True once oned has picked a host device (ADDRESS set)."""
        return self.address is not None


@dataclass(frozen=True)
class NicRequest(_Record):
    """One ``TEMPLATE/NIC`` (or ``NIC_ALIAS``) of the VM."""

    nic_id: int | None
    name: str | None
    network: str | None
    network_id: int | None
    mac: str | None
    ip: str | None
    vlan_id: int | None
    bridge: str | None
    phydev: str | None
    vn_mad: str | None
    model: str | None
    target: str | None
    security_groups: tuple[int, ...]
    alias: bool = False
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)


@dataclass(frozen=True)
class TopologyRequest(_Record):
    """``TEMPLATE/TOPOLOGY``: pinning policy and virtual CPU topology."""

    pin_policy: str
    sockets: int | None
    cores: int | None
    threads: int | None
    hugepage_size: int | None  # MiB
    memory_access: str | None
    node_affinity: int | None

    @property
    def pinned(self) -> bool:
        return self.pin_policy != "NONE"


@dataclass(frozen=True)
class NumaNodeAllocation(_Record):
    """One ``TEMPLATE/NUMA_NODE``: guest node ``node_id`` placed on host CPUs and memory node."""

    node_id: int | None
    cpus: tuple[int, ...]
    memory_kib: int | None
    memory_node_id: int | None
    total_cpus: int | None


@dataclass(frozen=True)
class VmRequest(_Record):
    """What aifactory needs to know about one VM, read from OpenNebula's ``<VM>`` document."""

    vm_id: int
    name: str | None
    uid: int | None
    gid: int | None
    uname: str | None
    gname: str | None
    state: int | None
    lcm_state: int | None
    deploy_id: str | None
    host: str | None
    host_id: int | None
    cluster_id: int | None
    pci: tuple[PciRequest, ...]
    nics: tuple[NicRequest, ...]
    topology: TopologyRequest | None
    numa_nodes: tuple[NumaNodeAllocation, ...]
    vcpu: int | None
    cpu: float | None
    memory_mib: int | None
    hugepage_size: int | None
    template_id: int | None
    user_template: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @property
    def state_name(self) -> str | None:
        return None if self.state is None else VM_STATES.get(self.state, str(self.state))

    @property
    def lcm_state_name(self) -> str | None:
        return None if self.lcm_state is None else LCM_STATES.get(self.lcm_state, str(self.lcm_state))

    @property
    def gpus(self) -> tuple[PciRequest, ...]:
        """PCI requests that may get a device other than a network function (GPUs and other
        passthrough devices), whatever their TYPE."""
        return tuple(item for item in self.pci if not item.network_function)

    @property
    def pci_nics(self) -> tuple[PciRequest, ...]:
        return tuple(item for item in self.pci if item.is_nic)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["state_name"] = self.state_name
        data["lcm_state_name"] = self.lcm_state_name
        return data


# --------------------------------------------------------------------------------------------
# Parsing.


def _cpu_list(text: str) -> tuple[int, ...]:
    if not _CPU_LIST.match(text):
        raise ValueError
    return tuple(int(part) for part in text.split(","))


def _id_list(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(re.fullmatch(r"[0-9]{1,10}", part) for part in parts):
        raise ValueError
    return tuple(int(part) for part in parts)


def _vm_bus(text: str) -> int:
    if not re.fullmatch(r"(0x)?[0-9a-fA-F]{1,2}", text):
        raise ValueError
    return int(text, 16)


def _check_pair(node: _Node, address: str | None, short: str | None) -> None:
    if address and short and address[5:] != short[5:]:
        raise DocumentError(
            f"{node.path}: ADDRESS {address} and SHORT_ADDRESS {short[5:]} name different devices"
        )


def _pci(node: _Node) -> PciRequest:
    address = node.pci("ADDRESS")
    if address is None:
        parts = [node.text(tag) for tag in ("DOMAIN", "BUS", "SLOT", "FUNCTION")]
        if all(parts):
            joined = "{}:{}:{}.{}".format(*(part.strip() for part in parts if part))
            try:
                address = validate.pci_address(joined)
            except UsageError as error:
                raise DocumentError(f"{node.path}/DOMAIN..FUNCTION: {error}") from None
    short_full = node.pci("SHORT_ADDRESS")
    _check_pair(node, address, short_full)
    vm_address = node.pci("VM_ADDRESS")
    pci_type = node.text("TYPE")  # kept as written: oned compares it to "NIC" exactly
    if pci_type is not None and not _ATTR_NAME.match(pci_type):
        raise DocumentError(f"{node.path}/TYPE {_show(pci_type)}: unexpected characters")
    return PciRequest(
        pci_id=node.integer("PCI_ID"),
        type=pci_type,
        address=address,
        short_address=None if short_full is None else short_full[5:],
        vendor=node.hex_id("VENDOR"),
        device=node.hex_id("DEVICE"),
        device_class=node.hex_id("CLASS"),
        numa_node=node.integer("NUMA_NODE", -1, 4095, none=("-", "-1")),
        nic_id=node.integer("NIC_ID"),
        network=node.text("NETWORK"),
        network_id=node.integer("NETWORK_ID"),
        vlan_id=node.integer("VLAN_ID", 0, MAX_VNI),
        mac=node.mac("MAC"),
        phydev=node.ifname("PHYDEV"),
        vn_mad=node.token("VN_MAD"),
        vm_address=vm_address,
        vm_bus=node.convert("VM_BUS", _vm_bus, "not a hex bus number"),
        vm_bus_index=node.integer("VM_BUS_INDEX"),
        uuid=node.token("UUID"),
        profile=node.text("PROFILE"),
        mdev_mode=node.token("MDEV_MODE"),
        attributes=node.leaves(),
    )


def _nic(node: _Node, alias: bool) -> NicRequest:
    return NicRequest(
        nic_id=node.integer("NIC_ID"),
        name=node.text("NAME"),
        network=node.text("NETWORK"),
        network_id=node.integer("NETWORK_ID"),
        mac=node.mac("MAC"),
        ip=node.text("IP"),
        vlan_id=node.integer("VLAN_ID", 0, MAX_VNI),
        bridge=node.ifname("BRIDGE"),
        phydev=node.ifname("PHYDEV"),
        vn_mad=node.token("VN_MAD"),
        model=node.token("MODEL"),
        target=node.ifname("TARGET"),
        security_groups=node.convert("SECURITY_GROUPS", _id_list, "not a list of ids") or (),
        alias=alias,
        attributes=node.leaves(),
    )


def _topology(node: _Node) -> TopologyRequest:
    policy = (node.text("PIN_POLICY") or "NONE").strip().upper()
    if policy not in PIN_POLICIES:
        raise DocumentError(
            f"{node.path}/PIN_POLICY {_show(policy)}: expected one of {', '.join(sorted(PIN_POLICIES))}"
        )
    access = node.text("MEMORY_ACCESS")
    if access is not None:
        access = access.strip().lower()
        if access not in MEMORY_ACCESS:
            raise DocumentError(f"{node.path}/MEMORY_ACCESS {_show(access)}: expected shared or private")
    return TopologyRequest(
        pin_policy=policy,
        sockets=node.integer("SOCKETS", 1, 4096),
        cores=node.integer("CORES", 1, 4096),
        threads=node.integer("THREADS", 1, 64),
        hugepage_size=node.integer("HUGEPAGE_SIZE", 0, 2**40),
        memory_access=access,
        node_affinity=node.integer("NODE_AFFINITY", 0, 4095),
    )


def _numa(node: _Node) -> NumaNodeAllocation:
    return NumaNodeAllocation(
        node_id=node.integer("NODE_ID", 0, 4095),
        cpus=node.convert("CPUS", _cpu_list, "not a comma-separated CPU list") or (),
        memory_kib=node.integer("MEMORY", 0, 2**50),
        memory_node_id=node.integer("MEMORY_NODE_ID", 0, 4095),
        total_cpus=node.integer("TOTAL_CPUS", 0, 65536),
    )


def _flatten_user_template(node: _Node | None) -> Mapping[str, str]:
    if node is None:
        return MappingProxyType({})
    result: dict[str, str] = {}
    for child in node.element:
        tag = child.tag
        if not isinstance(tag, str):
            continue
        if len(child) == 0:
            result.setdefault(tag, child.text or "")
            continue
        for grandchild in child:
            sub = grandchild.tag
            if isinstance(sub, str) and len(grandchild) == 0:
                result.setdefault(f"{tag}/{sub}", grandchild.text or "")
    return MappingProxyType(result)


def vm_from_element(element: etree._Element, path: str = "VM") -> VmRequest:
    """Build a :class:`VmRequest` from a parsed ``<VM>`` element."""
    if element.tag != "VM":
        raise DocumentError(f"expected a <VM> document, found <{element.tag}>")
    vm = _Node(element, path)
    template = vm.child("TEMPLATE") or _Node(_empty_element(), f"{path}/TEMPLATE")
    histories = vm.children("HISTORY_RECORDS/HISTORY") or vm.children("HISTORY")
    last = histories[-1] if histories else None
    topology_node = template.child("TOPOLOGY")
    topology = None if topology_node is None else _topology(topology_node)
    nics = [_nic(item, False) for item in template.children("NIC")]
    nics += [_nic(item, True) for item in template.children("NIC_ALIAS")]
    deploy_id = vm.token("DEPLOY_ID")
    return VmRequest(
        vm_id=vm.required_integer("ID"),
        name=vm.text("NAME"),
        uid=vm.integer("UID", -1),
        gid=vm.integer("GID", -1),
        uname=vm.text("UNAME"),
        gname=vm.text("GNAME"),
        state=vm.integer("STATE", 0, 255),
        lcm_state=vm.integer("LCM_STATE", 0, 255),
        deploy_id=deploy_id,
        host=None if last is None else last.token("HOSTNAME"),
        host_id=None if last is None else last.integer("HID", -1),
        cluster_id=None if last is None else last.integer("CID", -1),
        pci=tuple(_pci(item) for item in template.children("PCI")),
        nics=tuple(nics),
        topology=topology,
        numa_nodes=tuple(_numa(item) for item in template.children("NUMA_NODE")),
        vcpu=template.integer("VCPU", 1, 65536),
        cpu=template.number("CPU"),
        memory_mib=template.integer("MEMORY", 0, 2**40),
        hugepage_size=None if topology is None else topology.hugepage_size,
        template_id=template.integer("TEMPLATE_ID", -1),
        user_template=_flatten_user_template(vm.child("USER_TEMPLATE")),
    )


def _empty_element() -> etree._Element:
    from lxml import etree

    return etree.Element("TEMPLATE")


def parse_vm(data: bytes | str, what: str = "VM document") -> VmRequest:
    """Parse the XML of a ``<VM>`` document (plain XML, not base64)."""
    from aifactory_core.one.xmlsafe import parse_xml

    return vm_from_element(parse_xml(data, what))
