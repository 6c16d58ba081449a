"""SR-IOV Ethernet VFs: tenant VLAN/QoS/MAC/spoof-check/trust/rate/link state on each PCI NIC.

For each ``PCI = [ TYPE = "NIC" ]`` OpenNebula placed on a VF of a legacy-mode (non-switchdev)
Ethernet PF, returns one ``vf_config`` action (see :mod:`aifactory_core.vnm.vf`): made before the
VF is bound to vfio-pci, undone by a scrub verified over netlink. InfiniBand VFs belong to the
``infiniband`` plugin, VFs of a switchdev PF to ``bluefield``.

``[plugin.sriov]``: ``datastores`` (where ``vm.xml``/``deployment.N`` name a VM's owner);
``numa_local`` — what deploy does when OpenNebula gave a VM a VF on another NUMA node than its
GPUs (oned's scheduler takes the first free matching VF, by address, blind to NUMA): ``warn``
(default: a ``WARN`` line in the VM's log), ``require`` (refuse the deploy, naming both nodes) or
``off``. Operators who need locality everywhere give each NUMA node's PF its own network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aifactory_core.config import Config, check_plugin_keys
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import Action, Check, DiscoveredDevice

AIFACTORY_API_VERSION = 1
NAME = "sriov"
SETTINGS = {"datastores", "numa_local"}
NUMA_LOCAL_MODES = ("warn", "require", "off")
log = logging.getLogger("aifactory.sriov")


@hookimpl
def aifactory_configure(config: Config, name: str, section: Mapping[str, Any]) -> None:
    if name != NAME:
        return
    check_plugin_keys(NAME, section, SETTINGS)
    if section.get("numa_local", "warn") not in NUMA_LOCAL_MODES:
        from aifactory_core.errors import ConfigError

        raise ConfigError(f"[plugin.sriov] numa_local = {section['numa_local']!r}: expected warn, require or off")


def remote_vfs(inventory: HostInventory, addresses: Sequence[str]) -> list[str]:
    """One line per VF of ``addresses`` on a NUMA node none of the GPUs among them is on."""
    devices = [inventory.pci[address] for address in addresses if address in inventory.pci]
    gpu_nodes = {device.numa_node for device in devices if device.base_class == 0x03 and device.numa_node is not None}
    if not gpu_nodes:
        return []
    return [f"VF {device.address} is on NUMA node {device.numa_node}, the VM's GPUs on "
            f"{','.join(str(node) for node in sorted(gpu_nodes))}"
            for device in devices
            if device.physfn is not None and device.numa_node is not None and device.numa_node not in gpu_nodes]


@hookimpl
def aifactory_admit(inventory: HostInventory, request: Any, config: Config) -> Iterable[str] | None:
    """At deploy: a VF far from the VM's GPUs is refused (``require``) or logged (``warn``)."""
    from aifactory_core.model import DeployRequest

    mode = config.plugin(NAME).get("numa_local", "warn")
    if not isinstance(request, DeployRequest) or mode == "off":
        return None
    remote = remote_vfs(inventory, request.pci_addresses)
    if mode == "require":
        return [f"[plugin.sriov] numa_local = require: {line}" for line in remote]
    for line in remote:
        log.warning("VM %s: %s (cross-socket traffic; give each node's PF its own network)", request.vm_id, line)
    return None


@hookimpl
def aifactory_network_setup(inventory: HostInventory, request: Any, nic: Any, grant: Any) -> Iterable[Action] | None:
    from aifactory_core.vnm import vf
    from aifactory_core.vnm.plan import is_vxlan, nic_vf_in_mode, vf_settings

    where = nic_vf_in_mode(inventory.host, nic, "legacy")
    if where is None:
        return None
    if is_vxlan(nic):
        from aifactory_core.errors import PolicyRefused

        raise PolicyRefused(f"PCI NIC {nic.nic_id}: VXLAN network ({nic.vn_mad}) on VF {where.vf} of "
                            f"{where.pf_netdev}, a legacy-mode PF: a VF there cannot be held to a VNI; "
                            "use a switchdev PF")
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
        fix = f"create VFs: aifactory vf-pool {pf.address} N [--autoprobe off]"
        checks.append(Check("sriov-pool", "PASS" if pf.num_vfs else "WARN",
                            f"{pf.address} ({pf.netdev or 'no netdev'}, {pf.driver or 'no driver'}): "
                            f"{pf.num_vfs}/{pf.total_vfs} VFs, autoprobe {pf.autoprobe_word}",
                            fix=None if pf.num_vfs else fix,
                            subject=pf.address))
    return checks
