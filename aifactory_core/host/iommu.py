"""IOMMU state: ACPI table, kernel command line, IOMMU units, interrupt remapping, groups."""

from __future__ import annotations

from aifactory_core.host.sysfs import list_dir, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import IommuState

# Intel VT-d extended capability register, bit 3: interrupt remapping support.
_ECAP_IR = 1 << 3


def _interrupt_remapping(host: HostRoot, units: tuple[str, ...]) -> bool | None:
    unsafe = read_str(host.path("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"))
    if unsafe in ("Y", "1"):
        return False
    verdicts: list[bool] = []
    for unit in units:
        ecap = read_str(host.path(f"/sys/class/iommu/{unit}/intel-iommu/ecap"))
        if ecap:
            try:
                verdicts.append(bool(int(ecap, 16) & _ECAP_IR))
            except ValueError:
                continue
        elif unit.startswith("ivhd"):
            verdicts.append(True)  # AMD-Vi IOMMUs always remap interrupts when enabled
    if not verdicts:
        return None
    return all(verdicts)


def read_iommu_state(host: HostRoot) -> IommuState:
    tables = host.path("/sys/firmware/acpi/tables")
    table = next((name for name in ("DMAR", "IVRS") if (tables / name).exists()), None)
    units = tuple(list_dir(host.path("/sys/class/iommu")))
    groups = len(list_dir(host.path("/sys/kernel/iommu_groups")))
    return IommuState(
        firmware_table=table,
        kernel_cmdline=host.read_text("/proc/cmdline", "") or "",
        units=units,
        interrupt_remapping=_interrupt_remapping(host, units),
        groups=groups,
    )


def iommu_group_members(host: HostRoot, group: int) -> tuple[str, ...]:
    """The PCI functions in one IOMMU group, from ``/sys/kernel/iommu_groups/N/devices``."""
    return tuple(list_dir(host.path(f"/sys/kernel/iommu_groups/{int(group)}/devices")))
