"""Network interfaces from ``/sys/class/net`` and the PCI function behind each."""

from __future__ import annotations

import os

from aifactory_core.errors import UsageError
from aifactory_core.host.sysfs import list_dir, read_int, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import NetInterface
from aifactory_core.validate import pci_address


def _pci_of(device_link: str) -> str | None:
    """The nearest PCI function in an interface's real sysfs path."""
    for part in reversed(device_link.split("/")):
        try:
            return pci_address(part)
        except UsageError:
            continue
    return None


def read_net_interfaces(host: HostRoot) -> tuple[NetInterface, ...]:
    base = host.path("/sys/class/net")
    interfaces: list[NetInterface] = []
    for name in list_dir(base):
        directory = base / name
        if not directory.is_dir():
            continue
        try:
            target = os.readlink(directory)
        except OSError:
            target = ""
        interfaces.append(
            NetInterface(
                name=name,
                ifindex=read_int(directory / "ifindex"),
                address=read_str(directory / "address"),
                operstate=read_str(directory / "operstate"),
                mtu=read_int(directory / "mtu"),
                link_type=read_int(directory / "type"),
                pci_address=_pci_of(target) if "/virtual/" not in target else None,
                phys_port_name=read_str(directory / "phys_port_name"),
                phys_switch_id=read_str(directory / "phys_switch_id"),
            )
        )
    return tuple(interfaces)
