"""The functions the host itself uses, judged from root-owned inputs alone: the one rule the root
helper, root's own device changes and the vfio plugin share.

A function is the host's when ``[host] host_devices`` of the root-owned config lists it, when a
block device it serves is mounted, active swap or held (:mod:`.blockuse`), when a virtio-9p or
virtiofs share it exports is mounted (:mod:`.sharedfs`), or when a network
interface it serves carries an address or the default route (:mod:`.netuse`). Moving any function of
an IOMMU group moves the whole group's DMA isolation, so a function whose group holds one of the
host's is refused too. VF settings are further confined to the PFs ``[host] vf_pools`` names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aifactory_core.config import HostConfig
from aifactory_core.errors import HostError
from aifactory_core.host.pcipath import pci_function_of
from aifactory_core.host.sysfs import link_name, list_dir, read_int
from aifactory_core.hostroot import HostRoot
from aifactory_core.validate import ifname, pci_address

LISTED = "listed in [host] host_devices"


@dataclass(frozen=True)
class HostUse:
    """One function the host uses, and why."""

    address: str
    why: str


def iommu_group_members(host: HostRoot, address: str) -> list[str]:
    """``address`` first, then the other functions of its IOMMU group (none without a group)."""
    members = list_dir(host.pci_devices / address / "iommu_group" / "devices")
    return [address, *(member for member in members if member != address)]


@dataclass(frozen=True)
class HostEvidence:
    """What the host uses, read once: PCI address -> why."""

    uses: Mapping[str, str]

    @classmethod
    def read(cls, host: HostRoot, host_devices: Iterable[str] = ()) -> HostEvidence:
        from aifactory_core.host.blockuse import block_uses
        from aifactory_core.host.netuse import net_uses
        from aifactory_core.host.sharedfs import shared_fs_uses

        uses = {pci_address(address): LISTED for address in host_devices}
        for found in (block_uses(host), shared_fs_uses(host), net_uses(host)):
            for address, why in found.items():
                uses.setdefault(address, why)
        return cls(uses)

    def group_use(self, host: HostRoot, address: str) -> HostUse | None:
        """The first function of ``address``'s IOMMU group (itself first) the host uses."""
        for member in iommu_group_members(host, address):
            if member in self.uses:
                return HostUse(member, self.uses[member])
        return None


def refusal(host: HostRoot, address: str, host_devices: Iterable[str]) -> str | None:
    """Why ``address`` must not change hands (one line), or None."""
    address = pci_address(address)
    use = HostEvidence.read(host, host_devices).group_use(host, address)
    if use is None:
        return None
    if use.address == address:
        return f"refusing {address}: the host uses it ({use.why})"
    group = link_name(host.pci_devices / address / "iommu_group")
    return (f"refusing {address}: it shares IOMMU group {group} with {use.address}, which the host uses "
            f"({use.why})")


def check_function(host: HostRoot, address: str, host_devices: Iterable[str]) -> None:
    """Raise HostError when ``address`` or a function of its IOMMU group is the host's."""
    reason = refusal(host, address, host_devices)
    if reason is not None:
        raise HostError(reason)


def check_vf(host: HostRoot, pf: str, vf: int, config: HostConfig) -> None:
    """Raise HostError unless VF ``vf`` of the PF with netdev ``pf`` belongs to a configured pool and
    neither the VF nor its IOMMU group is the host's."""
    pf = ifname(pf)
    device = host.path(f"/sys/class/net/{pf}/device")
    address = pci_function_of(device) if device.exists() else None
    if address is None or address not in config.vf_pools:
        raise HostError(f"refusing VF {vf} of {pf}: {address or 'its device'} is not in [host] vf_pools")
    size = read_int(host.pci_devices / address / "sriov_numvfs")
    if size is None or not 0 <= vf < size:
        raise HostError(f"refusing VF {vf} of {pf}: the pool of {address} has {size or 0} VFs")
    if link_name(host.pci_devices / address / f"virtfn{vf}") is None:
        raise HostError(f"refusing VF {vf} of {pf}: no virtfn{vf} under {address}")
    check_vf_function(host, pf, vf, config.host_devices)


def check_vf_function(host: HostRoot, pf: str, vf: int, host_devices: Iterable[str]) -> None:
    """Raise HostError when the PCI function of VF ``vf`` of ``pf`` (a VF without one, such as
    netdevsim's, has nothing to judge) or a function of its IOMMU group is the host's."""
    address = link_name(host.path(f"/sys/class/net/{ifname(pf)}/device/virtfn{vf}"))
    if address is not None:
        check_function(host, address, host_devices)
