"""From a VM's PCI NIC to the VF settings it gets: the template asks, the tenant grant decides.

Template attributes read from a ``PCI = [ TYPE = "NIC", ... ]`` element (besides the ``MAC`` and
``VLAN_ID`` oned fills in from the network): ``SPOOFCHK`` / ``TRUST`` (``YES``/``NO``),
``VF_QOS`` (0-7), ``VF_MIN_TX_RATE`` / ``VF_MAX_TX_RATE`` (Mb/s), ``VF_LINK_STATE``
(``auto``/``enable``/``disable``). Turning spoof-check off, trust on, or leaving the VF
untagged needs the tenant's grant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aifactory_core.errors import HostError, PolicyRefused, UsageError
from aifactory_core.host import netlink_vf
from aifactory_core.host.eswitch import uplink_mode
from aifactory_core.host.sysfs import link_name, list_dir, read_int
from aifactory_core.hostroot import HostRoot
from aifactory_core.validate import ifname, pci_address
from aifactory_core.vnm.grant import VXLAN_DRIVERS, TenantNetworkGrant

if TYPE_CHECKING:
    from aifactory_core.one.vm import PciRequest

ARPHRD_INFINIBAND = 32
VfMode = Literal["infiniband", "switchdev", "legacy"]


@dataclass(frozen=True)
class VfLocation:
    """Where a VF's PCI function sits: its PF's netdev, its index in the pool, its NUMA node."""

    vf_address: str
    pf_address: str
    pf_netdev: str
    vf: int
    numa_node: int | None
    infiniband: bool


def locate_nic_vf(host: HostRoot, nic: object) -> VfLocation | None:
    """The VF behind a VM's PCI NIC request (``PCI = [ TYPE = "NIC", ... ]``); None for anything else."""
    from aifactory_core.one.vm import PciRequest

    if not isinstance(nic, PciRequest) or not nic.is_nic or nic.address is None:
        return None
    return locate_vf(host, nic.address)


def vf_mode(host: HostRoot, where: VfLocation) -> VfMode:
    """How a VF's PF runs, which decides the one network plugin that configures the VF:
    ``infiniband`` (an IPoIB PF), else its uplink's eswitch mode by the rule the probes report
    (:func:`aifactory_core.host.eswitch.uplink_mode`): ``switchdev`` or ``legacy``."""
    if where.infiniband:
        return "infiniband"
    mode = uplink_mode(host.read_text, lambda path: list_dir(host.path(path)), ifname(where.pf_netdev))
    return "switchdev" if mode == "switchdev" else "legacy"  # a PF with this VF has VFs: never unknown


def nic_vf_in_mode(host: HostRoot, nic: object, mode: VfMode) -> VfLocation | None:
    """The VF behind a PCI NIC request when its PF runs in ``mode`` (the calling plugin's to
    configure); None for any other request or mode."""
    where = locate_nic_vf(host, nic)
    return where if where is not None and vf_mode(host, where) == mode else None


def locate_vf(host: HostRoot, vf_address: str) -> VfLocation:
    address = pci_address(vf_address)
    pf = link_name(host.pci_devices / address / "physfn")
    if pf is None:
        raise HostError(f"{address} is not a VF (no physfn)")
    pf_dir = host.pci_devices / pci_address(pf)
    index = next((int(name[6:]) for name in list_dir(pf_dir) if name.startswith("virtfn")
                  and link_name(pf_dir / name) == address), None)
    if index is None:
        raise HostError(f"{address} is not among the VFs of {pf}")
    netdevs = list_dir(pf_dir / "net")
    if not netdevs:
        raise HostError(f"PF {pf} of {address} has no netdev")
    numa = read_int(host.pci_devices / address / "numa_node")
    link_type = read_int(pf_dir / "net" / netdevs[0] / "type")
    return VfLocation(address, pci_address(pf), netdevs[0], index, None if numa is None or numa < 0 else numa,
                      link_type == ARPHRD_INFINIBAND)


def _flag(attributes: dict[str, str], name: str, default: bool) -> bool:
    raw = attributes.get(name)
    if raw is None:
        return default
    text = raw.strip().upper()
    if text in ("YES", "ON", "TRUE", "1"):
        return True
    if text in ("NO", "OFF", "FALSE", "0"):
        return False
    raise UsageError(f"{name} = {raw[:20]!r}: expected YES or NO")


def vf_settings(pci: PciRequest, grant: TenantNetworkGrant, *, node_guid: str | None = None,
                port_guid: str | None = None) -> netlink_vf.VfSettings:
    """The validated settings for a PCI NIC's VF; refuses what the tenant's grant does not cover.

    An InfiniBand VF (GUIDs given) takes only its GUIDs and link state: the IPoIB PF sets nothing
    else (isolation is the pkey, enforced by the Subnet Manager)."""
    attributes = dict(pci.attributes)
    link_state = attributes.get("VF_LINK_STATE", "auto").strip().lower()
    if node_guid is not None or port_guid is not None:
        return netlink_vf.settings(link_state=link_state, node_guid=node_guid, port_guid=port_guid)
    if pci.mac is None:
        raise UsageError(f"PCI NIC {pci.nic_id}: no MAC (oned assigns one from the network)")
    spoofchk = _flag(attributes, "SPOOFCHK", True)
    trust = _flag(attributes, "TRUST", False)
    if not spoofchk and not grant.allow_spoofchk_off:
        raise PolicyRefused(f"tenant {grant.tenant} may not turn spoof-check off")
    if trust and not grant.allow_trust:
        raise PolicyRefused(f"tenant {grant.tenant} may not have trusted VFs")
    wanted = netlink_vf.settings(
        mac=pci.mac, vlan=pci.vlan_id or 0, qos=attributes.get("VF_QOS", 0), spoofchk=spoofchk, trust=trust,
        min_tx_rate=attributes.get("VF_MIN_TX_RATE", 0), max_tx_rate=attributes.get("VF_MAX_TX_RATE", 0),
        link_state=link_state,
    )
    grant.check_vlan(wanted.vlan)
    return wanted


def is_vxlan(nic: PciRequest) -> bool:
    """Whether a PCI NIC's network is a VXLAN one (by its ``VN_MAD``, any case)."""
    return (nic.vn_mad or "").lower() in VXLAN_DRIVERS


def network_nics(pcis: tuple[PciRequest, ...]) -> list[PciRequest]:
    """The PCI NICs OpenNebula allocated a host function for (in template order)."""
    return [pci for pci in pcis if pci.is_nic and pci.address is not None]
