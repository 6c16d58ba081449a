"""SR-IOV Ethernet VFs: tenant VLAN/QoS/MAC/spoof-check/trust/rate/link state on each PCI NIC.

For each ``PCI = [ TYPE = "NIC" ]`` OpenNebula placed on a VF of a legacy-mode (non-switchdev)
Ethernet PF, returns one ``vf_config`` action (see :mod:`aifactory_core.vnm.vf`): made before the
VF is bound to vfio-pci, undone by a scrub verified over netlink. InfiniBand VFs belong to the
``infiniband`` plugin, VFs of a switchdev PF to ``bluefield``.

``[plugin.sriov]``: ``datastores`` (where ``vm.xml``/``deployment.N`` name a VM's owner).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aifactory_core.config import Config, check_plugin_keys
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import Action, Check, DiscoveredDevice

AIFACTORY_API_VERSION = 1
NAME = "sriov"
SETTINGS = {"datastores"}


@hookimpl
def aifactory_configure(config: Config, name: str, section: Mapping[str, Any]) -> None:
    if name != NAME:
        return
    check_plugin_keys(NAME, section, SETTINGS)


def is_switchdev_pf(inventory: HostInventory, pf_netdev: str) -> bool:
    from aifactory_core.host.devlink import switch_id

    return switch_id(inventory.host, pf_netdev) is not None


@hookimpl
def aifactory_network_setup(inventory: HostInventory, request: Any, nic: Any, grant: Any) -> Iterable[Action] | None:
    from aifactory_core.vnm import vf
    from aifactory_core.vnm.plan import locate_nic_vf, vf_settings

    where = locate_nic_vf(inventory.host, nic)
    if where is None:
        return None
    if where.infiniband or is_switchdev_pf(inventory, where.pf_netdev):
        return None
    return [vf.action(where.pf_netdev, where.vf, request.vm_id, vf_settings(nic, grant))]


@hookimpl
def aifactory_domain_xml(inventory: HostInventory, request: Any, domain: Any) -> None:
    """Keep ``<interface type='hostdev'>`` consistent with the VF settings: libvirt applies an
    interface's ``<mac>``/``<vlan>`` to the VF at start, so the MAC is ours and no ``<vlan>``
    (the suite set the tenant's on the PF; a second writer could only disagree)."""
    from aifactory_core.vnm.domain import reconcile_hostdev_interfaces
    from aifactory_core.vnm.hook import vnm_host

    reconcile_hostdev_interfaces(domain, vnm_host(inventory.host), request.vm_id)


@hookimpl
def aifactory_doctor_checks(inventory: HostInventory, devices: Sequence[DiscoveredDevice],
                            config: Config) -> Iterable[Check] | None:
    from aifactory_core.errors import HostError
    from aifactory_core.host.sriov import discover_pfs

    try:
        pfs = discover_pfs(inventory.host)
    except HostError as error:
        return [Check("sriov-pfs", "WARN", error.message)]
    if not pfs:
        return None
    checks = []
    for pf in pfs:
        fix = f"create VFs: echo N > /sys/bus/pci/devices/{pf.address}/sriov_numvfs"
        checks.append(Check("sriov-pool", "PASS" if pf.num_vfs else "WARN",
                            f"{pf.address} ({pf.netdev or 'no netdev'}, {pf.driver or 'no driver'}): "
                            f"{pf.num_vfs}/{pf.total_vfs} VFs, autoprobe {pf.autoprobe}",
                            fix=None if pf.num_vfs else fix,
                            subject=pf.address))
    return checks
