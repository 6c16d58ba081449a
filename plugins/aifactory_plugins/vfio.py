"""VFIO passthrough readiness: IOMMU on in firmware and kernel, interrupt remapping, vfio
modules, and the IOMMU-group isolation of every device a VM could be given."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from aifactory_core.config import Config
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import PCI_CLASS_STORAGE, Check, DiscoveredDevice

AIFACTORY_API_VERSION = 1
NAME = "vfio"
PASSTHROUGH_KINDS = ("gpu", "nic", "dpu", "accelerator")
_IOMMU_CMDLINE = re.compile(r"(?:^|\s)(intel_iommu=on|amd_iommu=on|iommu=pt|amd_iommu=force_isolation)")


def _iommu_checks(inventory: HostInventory) -> list[Check]:
    state = inventory.iommu
    checks = []
    if state.firmware_table:
        checks.append(Check("iommu-firmware", "PASS", f"ACPI {state.firmware_table} table present"))
    else:
        checks.append(Check("iommu-firmware", "FAIL", "no ACPI DMAR/IVRS table: the IOMMU is off in firmware",
                            fix="enable VT-d (Intel) or AMD-Vi/IOMMU in the BIOS/UEFI setup"))
    if state.groups:
        checks.append(Check("iommu-kernel", "PASS", f"IOMMU active: {len(state.units)} units, {state.groups} groups"))
    else:
        hint = "" if _IOMMU_CMDLINE.search(state.kernel_cmdline) else " (kernel command line lacks intel_iommu=on)"
        checks.append(Check("iommu-kernel", "FAIL", f"no IOMMU groups: the kernel IOMMU is not active{hint}",
                            fix="add 'intel_iommu=on iommu=pt' (Intel) or 'iommu=pt' (AMD) to "
                                "GRUB_CMDLINE_LINUX, update-grub, reboot"))
    if state.interrupt_remapping is True:
        checks.append(Check("interrupt-remapping", "PASS", "IOMMU interrupt remapping supported"))
    elif state.interrupt_remapping is False:
        checks.append(Check("interrupt-remapping", "FAIL",
                            "interrupt remapping unsupported or vfio allow_unsafe_interrupts=Y",
                            fix="enable x2APIC/interrupt remapping in firmware; do not set allow_unsafe_interrupts"))
    elif state.groups:
        checks.append(Check("interrupt-remapping", "WARN", "could not tell whether interrupts are remapped",
                            fix="check 'dmesg | grep -i remapping'"))
    return checks


def _module_check(inventory: HostInventory) -> Check:
    modules = inventory.loaded_modules
    missing = [name for name in ("vfio", "vfio_pci", "vfio_iommu_type1") if name not in modules]
    if not missing:
        return Check("vfio-modules", "PASS", "vfio, vfio_pci and vfio_iommu_type1 loaded")
    return Check("vfio-modules", "FAIL", f"kernel modules not loaded: {', '.join(missing)}",
                 fix="modprobe vfio-pci; echo vfio-pci > /etc/modules-load.d/vfio.conf")


def _isolation_checks(inventory: HostInventory, devices: Sequence[DiscoveredDevice],
                      config: Config) -> list[Check]:
    checks = []
    host_devices = set(config.host.host_devices)
    for device in devices:
        if device.kind not in PASSTHROUGH_KINDS:
            continue
        pci = inventory.pci[device.address]
        if pci.iommu_group is None:
            if inventory.iommu.groups:
                checks.append(Check("iommu-group", "FAIL", "device has no IOMMU group", subject=device.address,
                                    fix="check the IOMMU covers this root port (BIOS, ACS)"))
            continue
        own = {device.address, *device.companions}
        others = [
            inventory.pci[member] for member in inventory.iommu_groups.get(pci.iommu_group, ())
            if member not in own and not inventory.pci[member].is_bridge
        ]
        if not others:
            checks.append(Check("iommu-group", "PASS", f"group {pci.iommu_group} holds only this device",
                                subject=device.address))
            continue
        names = ", ".join(f"{other.address} ({other.driver or 'no driver'})" for other in others)
        host_used = [other for other in others if other.address in host_devices
                     or other.base_class == PCI_CLASS_STORAGE and other.driver not in (None, "vfio-pci")]
        checks.append(Check(
            "iommu-group", "FAIL" if host_used else "WARN",
            f"group {pci.iommu_group} also holds {names}; all must go to vfio-pci together",
            fix="move the card to a slot behind an ACS-capable port, or pass the whole group",
            subject=device.address))
    return checks


@hookimpl
def aifactory_doctor_checks(
    inventory: HostInventory, devices: Sequence[DiscoveredDevice], config: Config
) -> Iterable[Check]:
    return [*_iommu_checks(inventory), _module_check(inventory), *_isolation_checks(inventory, devices, config)]
