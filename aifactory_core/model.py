"""Small frozen objects that cross the plugin boundary (objects, not dicts).

The host model fills them from sysfs/procfs (``aifactory_core.host``); plugins receive and return
them through the hook specifications in ``aifactory_core.hookspecs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PCI_CLASS_BRIDGE = 0x06
PCI_CLASS_NETWORK = 0x02
PCI_CLASS_DISPLAY = 0x03
PCI_CLASS_STORAGE = 0x01


@dataclass(frozen=True)
class PciBar:
    """One BAR from the device's ``resource`` file."""

    index: int
    start: int
    end: int
    flags: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1 if self.end >= self.start and self.end else 0

    @property
    def is_64bit(self) -> bool:
        return bool(self.flags & 0x4)

    @property
    def prefetchable(self) -> bool:
        return bool(self.flags & 0x2000)


@dataclass(frozen=True)
class PciLink:
    current_speed: str | None = None
    current_width: int | None = None
    max_speed: str | None = None
    max_width: int | None = None

    @property
    def degraded(self) -> bool:
        """True when the link trained below its maximum width or speed."""
        if self.current_width and self.max_width and self.current_width < self.max_width:
            return True
        return bool(self.current_speed and self.max_speed and self.current_speed != self.max_speed)


@dataclass(frozen=True)
class PciDevice:
    """One PCI function as the host sees it."""

    address: str
    vendor_id: int
    device_id: int
    class_code: int
    subsystem_vendor_id: int | None
    subsystem_device_id: int | None
    revision: int | None
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    numa_node: int | None
    local_cpus: frozenset[int]
    reset_methods: tuple[str, ...]
    sriov_totalvfs: int | None
    sriov_numvfs: int | None
    physfn: str | None
    virtfns: tuple[str, ...]
    parent: str | None
    sysfs_path: str
    link: PciLink = field(default_factory=PciLink)
    bars: tuple[PciBar, ...] = ()
    net_interfaces: tuple[str, ...] = ()
    vendor_name: str | None = None
    device_name: str | None = None

    @property
    def base_class(self) -> int:
        return self.class_code >> 16

    @property
    def is_bridge(self) -> bool:
        return self.base_class == PCI_CLASS_BRIDGE

    @property
    def is_vf(self) -> bool:
        return self.physfn is not None

    @property
    def is_sriov_pf(self) -> bool:
        return bool(self.sriov_totalvfs)

    @property
    def slot(self) -> str:
        """``dddd:bb:ss`` — the functions of one physical device share it."""
        return self.address.rsplit(".", 1)[0]

    @property
    def ids(self) -> str:
        """``vvvv:dddd`` as lspci -n prints it."""
        return f"{self.vendor_id:04x}:{self.device_id:04x}"

    @property
    def one_type(self) -> str:
        """OpenNebula's PCI TYPE attribute: ``vendor:device:class`` (class without prog-if)."""
        return f"{self.vendor_id:04x}:{self.device_id:04x}:{self.class_code >> 8:04x}"


@dataclass(frozen=True)
class HugePages:
    size_kib: int
    total: int
    free: int


@dataclass(frozen=True)
class NumaNode:
    node_id: int
    cpus: frozenset[int]
    memory_total_kib: int
    memory_free_kib: int
    distances: tuple[int, ...]
    hugepages: tuple[HugePages, ...]


@dataclass(frozen=True)
class Cpu:
    cpu_id: int
    core_id: int
    package_id: int
    node_id: int | None
    thread_siblings: frozenset[int]
    online: bool = True


@dataclass(frozen=True)
class CpuTopology:
    cpus: tuple[Cpu, ...]
    isolated: frozenset[int]

    def by_id(self) -> dict[int, Cpu]:
        return {cpu.cpu_id: cpu for cpu in self.cpus}

    @property
    def core_count(self) -> int:
        return len({(cpu.package_id, cpu.core_id) for cpu in self.cpus})

    @property
    def threads_per_core(self) -> int:
        return max((len(cpu.thread_siblings) for cpu in self.cpus), default=1)


@dataclass(frozen=True)
class NetInterface:
    name: str
    ifindex: int | None
    address: str | None
    operstate: str | None
    mtu: int | None
    link_type: int | None
    pci_address: str | None
    phys_port_name: str | None = None
    phys_switch_id: str | None = None


@dataclass(frozen=True)
class IommuState:
    """What the host says about its IOMMU, from firmware tables, the kernel and sysfs."""

    firmware_table: str | None
    kernel_cmdline: str
    units: tuple[str, ...]
    interrupt_remapping: bool | None
    groups: int


DeviceKind = Literal["gpu", "nic", "dpu", "nvswitch", "storage", "accelerator", "other"]


@dataclass(frozen=True)
class DiscoveredDevice:
    """A device a plugin claims, with the plugin's classification of it."""

    address: str
    kind: DeviceKind
    vendor: str
    model: str
    plugin: str
    companions: tuple[str, ...] = ()
    details: tuple[tuple[str, str], ...] = ()


CheckStatus = Literal["PASS", "WARN", "FAIL", "INFO"]


@dataclass(frozen=True)
class Check:
    """One readiness check result; ``fix`` tells the operator what to do about WARN/FAIL."""

    name: str
    status: CheckStatus
    message: str
    fix: str | None = None
    subject: str | None = None


@dataclass(frozen=True)
class ProbeAttribute:
    """One attribute for an OpenNebula probe: scalar (str) or vector (tuple of pairs)."""

    name: str
    value: str | tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Action:
    """One change a plugin wants made on the host, with how to undo it.

    Lifecycle journals an action before doing it and undoes done actions in reverse order on
    failure, which gives dry-run, explain, rollback and crash repair from one shape.
    """

    kind: str
    target: str
    value: str
    undo_value: str | None
    reason: str


@dataclass(frozen=True)
class DeployRequest:
    """What the host knows of a VM at deploy time: its id, its owner (from the deployment file's
    ``<one:vm>`` metadata), the PCI functions its domain takes, and where the full ``<VM>``
    document OpenNebula writes beside the deployment file before ``deploy`` (``vm.xml``) is."""

    vm_id: int
    pci_addresses: tuple[str, ...]
    uid: int | None = None
    gid: int | None = None
    uname: str | None = None
    gname: str | None = None
    vm_document: Path | None = None
