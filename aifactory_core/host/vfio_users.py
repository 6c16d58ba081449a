"""Which processes use a PCI function through VFIO now: the kernel's own answer to "does a VM
still run with this device".

A QEMU that has a function assigned holds its IOMMU group's ``/dev/vfio/<group>`` open (legacy
group interface) or the function's own ``/dev/vfio/devices/vfio<N>`` (the iommufd character
device, ``<function>/vfio-dev/vfio<N>``). The root helper asks this before it takes a function off
vfio-pci or resets it: a request that would pull a device from under a running guest is refused,
whatever the caller's journals or ownership records say (they are ``oneadmin``'s files).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aifactory_core.errors import HostError

if TYPE_CHECKING:
    from aifactory_core.hostroot import HostRoot


def device_nodes(host: HostRoot, address: str) -> set[str]:
    """The ``/dev/vfio`` nodes through which ``address`` can be used (paths as the live host
    names them): its group's node and its own iommufd node, where they exist."""
    from aifactory_core.host.sysfs import link_name

    nodes = set()
    group = link_name(host.pci_devices / address / "iommu_group")
    if group and group.isdigit():
        nodes.add(f"/dev/vfio/{group}")
    try:
        cdevs = os.listdir(host.pci_devices / address / "vfio-dev")
    except OSError:
        cdevs = []
    nodes.update(f"/dev/vfio/devices/{name}" for name in cdevs if name.startswith("vfio") and name[4:].isdigit())
    return nodes


def users(host: HostRoot, address: str) -> list[tuple[int, str]]:
    """``(pid, command name)`` of every process holding one of ``address``'s VFIO nodes open."""
    nodes = device_nodes(host, address)
    if not nodes:
        return []
    found = []
    proc = str(host.path("/proc"))
    try:
        pids = [entry for entry in os.listdir(proc) if entry.isdigit()]
    except FileNotFoundError:
        if host.is_live:
            raise HostError(f"cannot read {proc}: no such directory") from None
        return []  # a host root without processes (a captured or generated tree)
    except OSError as error:
        raise HostError(f"cannot read {proc}: {error.strerror}") from None
    for pid in pids:
        try:
            descriptors = os.listdir(f"{proc}/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        except PermissionError:
            if host.is_live and os.geteuid() == 0:
                raise HostError(f"cannot read the descriptors of process {pid}") from None
            continue  # unprivileged: only the caller's own processes can be seen
        for descriptor in descriptors:
            try:
                target = os.readlink(f"{proc}/{pid}/fd/{descriptor}")
            except OSError:
                continue
            if target in nodes:
                found.append((int(pid), _command(proc, pid)))
                break
    return found


def _command(proc: str, pid: str) -> str:
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read(64).strip()
    except OSError:
        return "?"


def check_unused(host: HostRoot, address: str, what: str) -> None:
    """HostError when a process uses ``address`` through VFIO (``what``: the refused request)."""
    holders = users(host, address)
    if holders:
        pid, command = holders[0]
        raise HostError(f"{address} is in use through VFIO by process {pid} ({command}): refusing to {what}")
