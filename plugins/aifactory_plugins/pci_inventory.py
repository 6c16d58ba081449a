"""Network functions (class 0x02): NICs, SR-IOV physical and virtual functions.

Claims every network-class PCI function that no earlier plugin claimed, and reports the host's
SR-IOV capability in ``doctor``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import PCI_CLASS_NETWORK, Check, DiscoveredDevice
from aifactory_plugins.pci_names import model_name, vendor_name

AIFACTORY_API_VERSION = 1
NAME = "pci_inventory"


@hookimpl
def aifactory_discover_devices(inventory: HostInventory) -> Iterable[DiscoveredDevice]:
    devices = []
    for device in inventory.pci.values():
        if device.base_class != PCI_CLASS_NETWORK:
            continue
        details = [("driver", device.driver or "-")]
        if device.is_sriov_pf:
            details += [("sriov_totalvfs", str(device.sriov_totalvfs)), ("sriov_numvfs", str(device.sriov_numvfs or 0))]
        if device.physfn:
            details.append(("physfn", device.physfn))
        if device.net_interfaces:
            details.append(("interfaces", ",".join(device.net_interfaces)))
        devices.append(
            DiscoveredDevice(
                address=device.address,
                kind="nic",
                vendor=device.vendor_name or vendor_name(device.vendor_id),
                model=device.device_name or model_name(device.vendor_id, device.device_id),
                plugin=NAME,
                details=tuple(details),
            )
        )
    return devices


@hookimpl
def aifactory_doctor_checks(
    inventory: HostInventory, devices: Sequence[DiscoveredDevice]
) -> Iterable[Check]:
    nics = [device for device in devices if device.kind in ("nic", "dpu")]
    if not nics:
        return []
    pfs = [inventory.pci[nic.address] for nic in nics if inventory.pci[nic.address].is_sriov_pf]
    if not pfs:
        return [Check("sriov-capable", "WARN", f"none of {len(nics)} NIC functions offers SR-IOV",
                      fix="enable SR-IOV in the NIC firmware (e.g. mlxconfig SRIOV_EN=1 NUM_OF_VFS=N) and BIOS")]
    summary = ", ".join(f"{pf.address} ({pf.sriov_numvfs or 0}/{pf.sriov_totalvfs} VFs)" for pf in pfs)
    return [Check("sriov-capable", "PASS", f"SR-IOV physical functions: {summary}")]
