"""Everything the host model sees, read once: the object plugins and commands work from."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

from aifactory_core.host.cpu import read_cpu_topology
from aifactory_core.host.iommu import read_iommu_state
from aifactory_core.host.net import read_net_interfaces
from aifactory_core.host.numa import read_numa_nodes
from aifactory_core.host.pci import read_pci_devices
from aifactory_core.host.sysfs import list_dir, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import CpuTopology, IommuState, NetInterface, NumaNode, PciDevice


@dataclass
class HostInventory:
    """A snapshot of the host; each part is read from the host root on first use."""

    host: HostRoot

    @cached_property
    def pci(self) -> dict[str, PciDevice]:
        devices = read_pci_devices(self.host)
        if self.host.is_live:
            from aifactory_core.host.udev import udev_pci_names

            names = udev_pci_names()
            if names:
                from dataclasses import replace

                devices = tuple(
                    replace(device, vendor_name=names.get(device.address, (None, None))[0],
                            device_name=names.get(device.address, (None, None))[1])
                    for device in devices
                )
        return {device.address: device for device in devices}

    @cached_property
    def numa_nodes(self) -> tuple[NumaNode, ...]:
        return read_numa_nodes(self.host)

    @cached_property
    def cpu(self) -> CpuTopology:
        return read_cpu_topology(self.host, self.numa_nodes)

    @cached_property
    def net(self) -> tuple[NetInterface, ...]:
        return read_net_interfaces(self.host)

    @cached_property
    def iommu(self) -> IommuState:
        return read_iommu_state(self.host)

    @cached_property
    def iommu_groups(self) -> dict[int, tuple[str, ...]]:
        """Group number -> member functions, from the devices' own ``iommu_group`` links."""
        groups: dict[int, list[str]] = defaultdict(list)
        for device in self.pci.values():
            if device.iommu_group is not None:
                groups[device.iommu_group].append(device.address)
        return {group: tuple(sorted(members)) for group, members in sorted(groups.items())}

    @cached_property
    def loaded_modules(self) -> frozenset[str]:
        """Kernel modules loaded (``/proc/modules``) or built in (present under ``/sys/module``)."""
        text = self.host.read_text("/proc/modules", "") or ""
        names = {line.split()[0] for line in text.splitlines() if line.strip()}
        names.update(list_dir(self.host.path("/sys/module")))
        return frozenset(names)

    @cached_property
    def kernel_release(self) -> str | None:
        version = read_str(self.host.path("/proc/version"))
        return version.split()[2] if version and len(version.split()) > 2 else None

    def device_node(self, device: PciDevice) -> int | None:
        """A device's NUMA node; where the kernel says -1, the host's only node, else unknown.

        A device's ``local_cpulist`` cannot stand in for a missing node: the kernel derives it from
        the same bus node, and for a bus without one it lists every online CPU
        (``cpumask_of_pcibus``), which names no single node."""
        if device.numa_node is not None:
            return device.numa_node
        return self.numa_nodes[0].node_id if len(self.numa_nodes) == 1 else None

    def group_of(self, address: str) -> tuple[str, ...]:
        device = self.pci.get(address)
        if device is None or device.iommu_group is None:
            return ()
        return self.iommu_groups.get(device.iommu_group, ())
