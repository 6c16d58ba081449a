"""SR-IOV physical functions and their VF pools, read and written through the host root.

A PF is found from its netdev (``/sys/class/net/IF/device``) or its PCI address; its pool size is
``sriov_numvfs`` (at most ``sriov_totalvfs``). Changing the pool destroys every VF, so
:func:`set_pool_size` refuses while any VF is in use (held by a VM, bound to vfio-pci, or named in
``in_use``). ``sriov_drivers_autoprobe`` = 0 keeps new VFs off the host's netdev driver, so they go
straight to vfio-pci without ever carrying host traffic.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from aifactory_core.errors import HostError, UsageError
from aifactory_core.host.pcibind import Writer
from aifactory_core.host.sysfs import link_name, list_dir, read_int, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.validate import ifname, int_in_range, pci_address


@dataclass(frozen=True)
class PhysicalFunction:
    """One SR-IOV capable function: its device directory, netdev, driver and pool."""

    device_dir: Path
    address: str
    """PCI address, or the bus device name (``netdevsim7``) for non-PCI PFs."""
    netdev: str | None
    driver: str | None
    total_vfs: int
    num_vfs: int
    operstate: str | None
    autoprobe: bool | None

    @property
    def autoprobe_word(self) -> str:
        """``sriov_drivers_autoprobe`` as operators read it: ``on``, ``off``, or ``unknown`` (unreadable)."""
        return "unknown" if self.autoprobe is None else "on" if self.autoprobe else "off"

    def vf_address(self, vf: int) -> str | None:
        """The PCI address of VF ``vf`` (from ``virtfnN``), ``None`` for non-PCI VFs."""
        name = link_name(self.device_dir / f"virtfn{vf}")
        return pci_address(name) if name else None


def _pf_from_dir(host: HostRoot, device_dir: Path, netdev: str | None) -> PhysicalFunction:
    num = read_int(device_dir / "sriov_numvfs")
    if num is None:
        raise HostError(f"{device_dir.name} is not SR-IOV capable (no sriov_numvfs)")
    name = device_dir.resolve().name
    total = read_int(device_dir / "sriov_totalvfs")
    if total is None:  # netdevsim: the bound lives in debugfs
        total = read_int(host.path(f"/sys/kernel/debug/netdevsim/{name}/max_vfs")) or num
    names = list_dir(device_dir / "net")
    if netdev is None and names:
        netdev = names[0]
    operstate = read_str(host.path(f"/sys/class/net/{netdev}/operstate")) if netdev else None
    autoprobe = read_int(device_dir / "sriov_drivers_autoprobe")
    return PhysicalFunction(
        device_dir=device_dir, address=name, netdev=netdev,
        driver=link_name(device_dir / "driver"), total_vfs=total, num_vfs=num, operstate=operstate,
        autoprobe=None if autoprobe is None else bool(autoprobe),
    )


def pf_by_netdev(host: HostRoot, name: str) -> PhysicalFunction:
    netdev = ifname(name)
    device_dir = host.path(f"/sys/class/net/{netdev}/device")
    if not device_dir.exists():
        raise HostError(f"interface {netdev} has no device (not a PF)")
    return _pf_from_dir(host, device_dir, netdev)


def pf_by_address(host: HostRoot, address: str) -> PhysicalFunction:
    device_dir = host.pci_devices / pci_address(address)
    if not device_dir.exists():
        raise HostError(f"no PCI function {address}")
    return _pf_from_dir(host, device_dir, None)


def discover_pfs(host: HostRoot) -> list[PhysicalFunction]:
    """Every PCI function with ``sriov_totalvfs`` > 0 (the SR-IOV capable PFs)."""
    found = []
    for name in list_dir(host.pci_devices):
        if (read_int(host.pci_devices / name / "sriov_totalvfs") or 0) > 0:
            found.append(_pf_from_dir(host, host.pci_devices / name, None))
    return found


def vfs_in_use(host: HostRoot, pf: PhysicalFunction) -> set[int]:
    """VF indices held by a VM (lifecycle ownership) or bound to vfio-pci."""
    from aifactory_core.lifecycle.ownership import held_devices

    held = held_devices(host)
    used = set()
    for vf in range(pf.num_vfs):
        address = pf.vf_address(vf)
        if address is None:
            continue
        if address in held or link_name(host.pci_devices / address / "driver") == "vfio-pci":
            used.add(vf)
    return used


def set_pool_size(host: HostRoot, pf: PhysicalFunction, count: object, writer: Writer, *,
                  autoprobe: bool | None = None, in_use: Collection[int] = ()) -> PhysicalFunction:
    """Make the pool ``count`` VFs; refuse when that would destroy a VF in use. Returns the new PF."""
    wanted = int_in_range(count, 0, pf.total_vfs, f"VF count for {pf.address}")
    if wanted == pf.num_vfs and autoprobe in (None, pf.autoprobe):
        return pf
    busy = set(in_use) | vfs_in_use(host, pf)
    if wanted != pf.num_vfs and busy:
        raise UsageError(f"refusing to resize the VF pool of {pf.address} from {pf.num_vfs} to {wanted}: "
                         f"VF(s) {','.join(map(str, sorted(busy)))} in use")
    if autoprobe is not None and autoprobe != pf.autoprobe:
        if pf.num_vfs and wanted == pf.num_vfs:
            raise UsageError(f"sriov_drivers_autoprobe of {pf.address} applies to new VFs only: recreate the pool")
        writer.write(pf.device_dir / "sriov_drivers_autoprobe", "1" if autoprobe else "0", "VF autoprobe")
    if wanted != pf.num_vfs:
        if pf.num_vfs:
            writer.write(pf.device_dir / "sriov_numvfs", "0", "the kernel resizes a pool only from 0")
        if wanted:
            writer.write(pf.device_dir / "sriov_numvfs", str(wanted), f"create {wanted} VFs")
    return _pf_from_dir(host, pf.device_dir, pf.netdev)
