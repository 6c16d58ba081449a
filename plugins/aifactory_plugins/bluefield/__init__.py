"""BlueField-3 / ConnectX in switchdev mode: tenant isolation in OVS, on the VF's representor.

In switchdev mode the VF's traffic reaches the host's switch through its representor
(``phys_port_name`` ``pfXvfY`` on the PF's ``phys_switch_id``). For each PCI NIC on such a VF this
plugin returns a ``vf_config`` action (MAC, spoof-check, rate; VLAN 0 on the VF: isolation lives in
OVS) and one OVS action for the representor:

* a VLAN network: ``ovs_port`` (:mod:`.ovs`), an access port with the tenant's VLAN tag;
* a VXLAN network (``VN_MAD`` ``vxlan`` or ``ovswitch_vxlan``): ``ovs_vxlan_port`` (:mod:`.vxlan`),
  an access port sharing a host-local tag with the VNI's tunnel port.

Both are undone by removing the port (and, for the last VM of a VNI, its tunnel port).

``[plugin.bluefield]``: ``bridge`` (default ``br-tenant``), ``ovs_vsctl`` (argv prefix, default
``["ovs-vsctl", "--timeout=10"]``; taken from the configuration when an action runs, never from a
journal), ``switchdev`` (devlink handles such as ``pci/0000:03:00.0``
that must be in switchdev mode; :func:`apply_eswitch_modes`, run by ``aifactory eswitch --apply``,
switches them), ``vxlan_remote_ip``
(the unicast VTEP the tunnels lead to), ``vxlan_local_ip`` (the tunnels' source address),
``vxlan_local_tags`` (``"4000-4094"``: host-local tags for VXLAN segments; keep them out of the
tenants' VLANs and of the uplink's trunks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aifactory_core.config import Config, check_plugin_keys
from aifactory_core.errors import ConfigError, HostError, UsageError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.model import Action, Check, DiscoveredDevice

from .ovs import DEFAULT_BRIDGE, OVS_KIND, bridge_name, configure_vsctl, ovs_action
from .vxlan import VXLAN_KIND, configured_ip, local_tag_range, segment_for, vxlan_action

__all__ = ["OVS_KIND", "VXLAN_KIND", "apply_eswitch_modes", "ovs_action", "switchdev_handles", "vxlan_action"]

AIFACTORY_API_VERSION = 1
NAME = "bluefield"
SETTINGS = {"bridge", "ovs_vsctl", "switchdev", "vxlan_remote_ip", "vxlan_local_ip", "vxlan_local_tags"}


def switchdev_handles(section: Mapping[str, Any]) -> list[tuple[str, str]]:
    from aifactory_core.host.devlink import devlink_handle

    handles = section.get("switchdev", [])
    if not isinstance(handles, list):
        raise ConfigError("[plugin.bluefield] switchdev must be a list of devlink handles (pci/0000:03:00.0)")
    parsed = []
    for text in handles:
        bus, _, device = str(text).partition("/")
        try:
            parsed.append(devlink_handle(bus, device))
        except UsageError as error:
            raise ConfigError(f"[plugin.bluefield] switchdev: {error.message}") from None
    return parsed


@hookimpl
def aifactory_configure(config: Config, name: str, section: Mapping[str, Any]) -> None:
    if name != NAME:
        return
    check_plugin_keys(NAME, section, SETTINGS)
    bridge_name(section.get("bridge", DEFAULT_BRIDGE))
    configure_vsctl(section)
    switchdev_handles(section)
    configured_ip(section, "vxlan_remote_ip")
    configured_ip(section, "vxlan_local_ip")
    local_tag_range(section)


def apply_eswitch_modes(section: Mapping[str, Any], devlink: Any) -> list[str]:
    """Switch every configured device to switchdev; returns the handles it changed.

    Switching destroys and recreates the VF netdevs: do it before any VM uses them.
    """
    changed = []
    for bus, device in switchdev_handles(section):
        if devlink.eswitch_mode(bus, device) != "switchdev":
            devlink.set_eswitch_mode(bus, device, "switchdev")
            changed.append(f"{bus}/{device}")
    return changed


def register() -> None:
    from aifactory_core.lifecycle.executor import register_executor

    from . import ovs, vxlan

    register_executor(OVS_KIND, ovs._ovs_do, ovs._ovs_undo)
    register_executor(VXLAN_KIND, vxlan._vxlan_do, vxlan._vxlan_undo)


register()


@hookimpl
def aifactory_network_setup(inventory: HostInventory, request: Any, nic: Any, config: Config,
                            grant: Any) -> Iterable[Action] | None:
    from dataclasses import replace

    from aifactory_core.host.devlink import representor_of
    from aifactory_core.vnm import vf
    from aifactory_core.vnm.plan import is_vxlan, nic_vf_in_mode, vf_settings

    where = nic_vf_in_mode(inventory.host, nic, "switchdev")
    if where is None:
        return None
    section = config.plugin(NAME)
    bridge = section.get("bridge", DEFAULT_BRIDGE)
    if is_vxlan(nic):
        segment = segment_for(nic, grant, section)
        # The VF itself carries no tag: the segment's isolation is the representor's port in OVS.
        wanted = vf_settings(replace(nic, vlan_id=None), replace(grant, allow_untagged=True))
    else:
        wanted = vf_settings(nic, grant)
        if wanted.vlan == 0:
            raise UsageError(f"PCI NIC {nic.nic_id}: a switchdev VF needs the network's VLAN_ID (the OVS tag)")
        low, high = local_tag_range(section)
        if low <= wanted.vlan <= high:
            raise UsageError(f"PCI NIC {nic.nic_id}: VLAN {wanted.vlan} is reserved for VXLAN segments "
                             f"([plugin.bluefield] vxlan_local_tags {low}-{high})")
    representor = representor_of(inventory.host, where.pf_netdev, where.vf)
    vf_action = vf.action(where.pf_netdev, where.vf, request.vm_id, replace(wanted, vlan=0, qos=0))
    if is_vxlan(nic):
        return [vf_action, vxlan_action(representor.netdev, bridge, segment, request.vm_id)]
    return [vf_action, ovs_action(representor.netdev, bridge, wanted.vlan, request.vm_id)]


@hookimpl
def aifactory_doctor_checks(inventory: HostInventory, devices: Sequence[DiscoveredDevice],
                            config: Config) -> Iterable[Check] | None:
    handles = switchdev_handles(config.plugin(NAME))
    if not handles:
        return None
    from aifactory_core.host.devlink import PyrouteDevlink

    devlink = PyrouteDevlink()
    try:
        checks = []
        for bus, device in handles:
            try:
                mode = devlink.eswitch_mode(bus, device)
            except HostError as error:
                checks.append(Check("eswitch-mode", "FAIL", error.message, subject=f"{bus}/{device}"))
                continue
            fix = f"devlink dev eswitch set {bus}/{device} mode switchdev"
            checks.append(Check("eswitch-mode", "PASS" if mode == "switchdev" else "FAIL",
                                f"{bus}/{device} eswitch mode {mode}",
                                fix=None if mode == "switchdev" else fix,
                                subject=f"{bus}/{device}"))
        return checks
    finally:
        devlink.close()
