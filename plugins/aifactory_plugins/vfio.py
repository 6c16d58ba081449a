"""VFIO passthrough readiness: IOMMU on in firmware and kernel, interrupt remapping, vfio
modules, and the IOMMU-group isolation of every device a VM could be given."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from aifactory_core.config import Config
from aifactory_core.errors import HostError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import PCI_CLASS_STORAGE, Action, Check, DeployRequest, DiscoveredDevice, PciDevice

if TYPE_CHECKING:
    from aifactory_core.host.hostuse import HostEvidence

AIFACTORY_API_VERSION = 1
NAME = "vfio"
PASSTHROUGH_KINDS = ("gpu", "nic", "dpu", "accelerator")
VFIO_DRIVER = "vfio-pci"
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


HOST_SETUP_FIX = "sudo /var/tmp/one/aifactory/venv/bin/aifactory host-setup (docs/host-setup.md)"


def _host_setup_check(inventory: HostInventory) -> Check:
    """What an unprivileged driver needs from root on this host: the root-owned helper sudo may
    run, its sudoers snippet, and the unit that repairs interrupted transactions at boot."""
    import os

    from aifactory_core.install.host_setup import ROOT_ENV, SUDOERS_NAME, UNIT_NAME

    host = inventory.host
    helper = host.path(f"{ROOT_ENV}/bin/aifactory-root-helper")
    problems = []
    try:
        mode = os.stat(helper)
        if mode.st_uid != 0 or mode.st_mode & 0o022:
            problems.append(f"{ROOT_ENV}/bin/aifactory-root-helper is not root-owned and closed to others")
    except OSError:
        problems.append(f"no root helper at {ROOT_ENV}/bin/aifactory-root-helper")
    if not host.path(f"/etc/sudoers.d/{SUDOERS_NAME}").is_file():
        problems.append(f"no /etc/sudoers.d/{SUDOERS_NAME}")
    if not host.path(f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}").exists():
        problems.append(f"{UNIT_NAME} is not enabled (no repair at boot)")
    if not problems:
        return Check("host-setup", "PASS", f"root helper, sudoers snippet and {UNIT_NAME} in place")
    return Check("host-setup", "WARN", "; ".join(problems), fix=HOST_SETUP_FIX)


def _host_evidence(inventory: HostInventory, config: Config) -> HostEvidence:
    from aifactory_core.host.hostuse import HostEvidence

    return HostEvidence.read(inventory.host, config.host.host_devices)


def _host_use(evidence: HostEvidence, device: PciDevice) -> str | None:
    """Why the host needs ``device``: the rule the root helper judges by
    (:mod:`aifactory_core.host.hostuse`), or, as a companion dragged along with a requested device,
    storage on a host driver (a disk the host may mount at any time)."""
    why = evidence.uses.get(device.address)
    if why is None and device.base_class == PCI_CLASS_STORAGE and device.driver not in (None, VFIO_DRIVER):
        why = f"storage on {device.driver}"
    return why


def _isolation_checks(inventory: HostInventory, devices: Sequence[DiscoveredDevice],
                      config: Config) -> list[Check]:
    checks = []
    evidence = _host_evidence(inventory, config)
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
        host_used = [other for other in others if _host_use(evidence, other)]
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
    return [*_iommu_checks(inventory), _module_check(inventory), _host_setup_check(inventory),
            *_isolation_checks(inventory, devices, config)]


def group_closure(inventory: HostInventory, address: str, config: Config) -> list[PciDevice]:
    """Every endpoint that must go to vfio-pci with ``address``: its IOMMU group, bridges excepted.

    Refuses when the function is not on the host, has no IOMMU group, is used by the host itself,
    or shares its group with a device the host uses (:func:`_host_use`).
    """
    device = inventory.pci.get(address)
    if device is None:
        raise HostError(f"PCI device {address} is not on this host")
    if device.iommu_group is None:
        raise HostError(f"PCI device {address} has no IOMMU group: enable the IOMMU (aifactory doctor)")
    members = [inventory.pci[member] for member in inventory.iommu_groups.get(device.iommu_group, (address,))]
    endpoints = [member for member in members if not member.is_bridge]
    evidence = _host_evidence(inventory, config)
    own = evidence.uses.get(address)
    if own is not None:
        raise HostError(f"{address} is used by the host ({own}); refusing")
    for member in endpoints:
        why = _host_use(evidence, member) if member.address != address else None
        if why is not None:
            raise HostError(f"{address} shares IOMMU group {device.iommu_group} with {member.address} "
                            f"({member.driver or 'no driver'}), which the host uses ({why}); refusing")
    return endpoints


def bar_bytes_64(devices: list[PciDevice]) -> int:
    return sum(bar.size for device in devices for bar in device.bars if bar.is_64bit)


@hookimpl
def aifactory_prepare(inventory: HostInventory, request: Any, config: Config) -> list[Action] | None:
    if not isinstance(request, DeployRequest) or not request.pci_addresses:
        return None
    import json

    from aifactory_core.host.fingerprint import check_drift

    actions: list[Action] = []
    binds: list[Action] = []
    seen: set[str] = set()
    for address in request.pci_addresses:
        for member in group_closure(inventory, address, config):
            if member.address in seen:
                continue
            seen.add(member.address)
            identity = check_drift(inventory.host, member.address)
            actions.append(Action("fingerprint", member.address, json.dumps(identity, sort_keys=True), None,
                                  "remember what this device is, to notice a swap or a retrained link"))
            why = ("requested by the VM" if member.address == address
                   else f"shares IOMMU group {member.iommu_group} with {address}")
            binds.append(Action("pci_driver", member.address, VFIO_DRIVER, member.driver or "",
                                f"VM {request.vm_id}: {why}"))
    return actions + binds  # fingerprints first; the binds then run as one parallel batch


def _pcihole64_kib(bar_bytes: int) -> int:
    """A 64-bit PCI hole for the BARs: their sum rounded up to a power of two, which also leaves room
    to align the largest BAR naturally; never below QEMU's 32 GiB default."""
    size = 1
    while size < bar_bytes:
        size <<= 1
    return max(size // 1024, 32 * 1024 * 1024)


@hookimpl
def aifactory_domain_xml(inventory: HostInventory, request: Any, domain: Any, config: Config) -> None:
    """The suite prepares whole IOMMU groups itself, so libvirt must not detach/reattach: managed='no'.
    Devices with large 64-bit BARs (an H100's 128 GiB BAR) get a 64-bit PCI hole that holds them."""
    if not isinstance(request, DeployRequest):
        return
    from aifactory_core.domain import pci_hostdevs

    for hostdev, _ref in pci_hostdevs(domain):
        hostdev.set("managed", "no")
    devices = [inventory.pci[address] for address in request.pci_addresses if address in inventory.pci]
    needed = bar_bytes_64(devices)
    if needed < 16 << 30:  # QEMU's default q35 64-bit hole covers smaller BARs
        return
    from lxml import etree

    root = domain.find("devices/controller[@model='pcie-root']")
    if root is None:
        os_type = domain.find("os/type")
        machine = os_type.get("machine", "") if os_type is not None else ""
        if "q35" not in machine:
            raise HostError(f"VM {request.vm_id} needs a {needed >> 30} GiB 64-bit PCI hole for its BARs; "
                            f"use a q35 machine type (has {machine or 'none'})")
        devices_element = domain.find("devices")
        if devices_element is None:
            devices_element = etree.SubElement(domain, "devices")
        root = etree.SubElement(devices_element, "controller", type="pci", index="0", model="pcie-root")
    hole = root.find("pcihole64")
    kib = _pcihole64_kib(needed)
    if hole is None or int(hole.text or "0") < kib:
        if hole is None:
            hole = etree.SubElement(root, "pcihole64")
        hole.set("unit", "KiB")
        hole.text = str(kib)
