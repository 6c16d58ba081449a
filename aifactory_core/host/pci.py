"""PCI functions from ``/sys/bus/pci/devices`` under the host root."""

from __future__ import annotations

import os
from pathlib import Path

from aifactory_core.cpulist import parse_cpulist, parse_cpumask
from aifactory_core.errors import UsageError
from aifactory_core.host.sysfs import link_name, list_dir, read_hex, read_int, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import PciBar, PciDevice, PciLink
from aifactory_core.validate import pci_address


def _local_cpus(device_dir: Path) -> frozenset[int]:
    try:
        return parse_cpulist(read_str(device_dir / "local_cpulist"))
    except UsageError:
        return frozenset()


def _fallback_local_cpus(device_dir: Path) -> frozenset[int]:
    try:
        return parse_cpumask(read_str(device_dir / "local_cpus"))
    except UsageError:
        return frozenset()


def _bars(device_dir: Path) -> tuple[PciBar, ...]:
    text = read_str(device_dir / "resource")
    if not text:
        return ()
    bars: list[PciBar] = []
    for index, line in enumerate(text.splitlines()[:6]):
        fields = line.split()
        if len(fields) != 3:
            continue
        try:
            start, end, flags = (int(value, 16) for value in fields)
        except ValueError:
            continue
        if end:
            bars.append(PciBar(index, start, end, flags))
    return tuple(bars)


def _virtfns(device_dir: Path) -> tuple[str, ...]:
    names = [name for name in list_dir(device_dir) if name.startswith("virtfn")]
    names.sort(key=lambda name: int(name[6:]) if name[6:].isdigit() else 0)
    return tuple(filter(None, (link_name(device_dir / name) for name in names)))


def _parent(device_dir: Path) -> str | None:
    """The upstream PCI function (bridge/switch port) from the device's real sysfs path."""
    parent = os.path.basename(os.path.dirname(os.path.realpath(device_dir)))
    try:
        return pci_address(parent)
    except UsageError:
        return None


def read_pci_device(host: HostRoot, address: str) -> PciDevice | None:
    """Read one function; ``None`` when it is not on the host."""
    address = pci_address(address)
    device_dir = host.pci_devices / address
    vendor = read_hex(device_dir / "vendor")
    device = read_hex(device_dir / "device")
    class_code = read_hex(device_dir / "class")
    if vendor is None or device is None or class_code is None:
        return None
    numa = read_int(device_dir / "numa_node")
    group = link_name(device_dir / "iommu_group")
    override = read_str(device_dir / "driver_override")
    reset = read_str(device_dir / "reset_method")
    local = _local_cpus(device_dir) or _fallback_local_cpus(device_dir)
    return PciDevice(
        address=address,
        vendor_id=vendor,
        device_id=device,
        class_code=class_code,
        subsystem_vendor_id=read_hex(device_dir / "subsystem_vendor"),
        subsystem_device_id=read_hex(device_dir / "subsystem_device"),
        revision=read_hex(device_dir / "revision"),
        driver=link_name(device_dir / "driver"),
        driver_override=None if override in (None, "", "(null)") else override,
        iommu_group=int(group) if group and group.isdigit() else None,
        numa_node=numa if numa is not None and numa >= 0 else None,
        local_cpus=local,
        reset_methods=tuple(reset.split()) if reset else (),
        sriov_totalvfs=read_int(device_dir / "sriov_totalvfs"),
        sriov_numvfs=read_int(device_dir / "sriov_numvfs"),
        physfn=link_name(device_dir / "physfn"),
        virtfns=_virtfns(device_dir),
        parent=_parent(device_dir),
        sysfs_path=os.path.realpath(device_dir),
        link=PciLink(
            current_speed=read_str(device_dir / "current_link_speed"),
            current_width=read_int(device_dir / "current_link_width"),
            max_speed=read_str(device_dir / "max_link_speed"),
            max_width=read_int(device_dir / "max_link_width"),
        ),
        bars=_bars(device_dir),
        net_interfaces=tuple(list_dir(device_dir / "net")),
    )


def pci_addresses(host: HostRoot) -> list[str]:
    """Every PCI function address on the host, sorted.

    On the live machine pyudev enumerates the bus (the udev view the rest of the system shares);
    under any other host root the directory listing is the enumeration.
    """
    if host.is_live:
        from aifactory_core.host.udev import udev_pci_addresses

        addresses = udev_pci_addresses()
        if addresses is not None:
            return addresses
    result: list[str] = []
    for name in list_dir(host.pci_devices):
        try:
            result.append(pci_address(name))
        except UsageError:
            continue
    return sorted(result)


def read_pci_devices(host: HostRoot) -> tuple[PciDevice, ...]:
    devices = (read_pci_device(host, address) for address in pci_addresses(host))
    return tuple(device for device in devices if device is not None)
