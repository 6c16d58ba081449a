"""BlueField-3 / ConnectX in switchdev mode: tenant isolation in OVS, on the VF's representor.

In switchdev mode the VF's traffic reaches the host's switch through its representor
(``phys_port_name`` ``pfXvfY`` on the PF's ``phys_switch_id``). For each PCI NIC on such a VF this
plugin returns a ``vf_config`` action (MAC, spoof-check, rate; VLAN 0 on the VF: the tag lives in
OVS) and an ``ovs_port`` action plugging the representor into the tenant bridge as an access port
with the tenant's VLAN tag (undone by removing the port).

``[plugin.bluefield]``: ``bridge`` (default ``br-tenant``), ``ovs_vsctl`` (argv prefix, default
``["ovs-vsctl", "--timeout=10"]``), ``switchdev`` (devlink handles such as ``pci/0000:03:00.0``
that must be in switchdev mode; :func:`apply_eswitch_modes` switches them).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aifactory_core.config import Config, check_plugin_keys
from aifactory_core.errors import ConfigError, HostError, UsageError
from aifactory_core.hookspecs import hookimpl
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import Action, Check, DiscoveredDevice
from aifactory_core.validate import ifname, int_in_range, vm_id

AIFACTORY_API_VERSION = 1
NAME = "bluefield"
OVS_KIND = "ovs_port"
SETTINGS = {"bridge", "ovs_vsctl", "switchdev"}
DEFAULT_BRIDGE = "br-tenant"
DEFAULT_VSCTL = ("ovs-vsctl", "--timeout=10")
_BRIDGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_runner: Any = subprocess.run


def _bridge(value: object) -> str:
    if not isinstance(value, str) or not _BRIDGE.fullmatch(value):
        raise ConfigError(f"[plugin.bluefield] bridge {value!r}: not a bridge name")
    return value


def _vsctl(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError("[plugin.bluefield] ovs_vsctl must be a non-empty list of strings (argv)")
    return tuple(value)


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
    _bridge(section.get("bridge", DEFAULT_BRIDGE))
    _vsctl(section.get("ovs_vsctl", list(DEFAULT_VSCTL)))
    switchdev_handles(section)


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


def ovs_action(representor: str, bridge: str, tag: int, vm: int, vsctl: Sequence[str]) -> Action:
    value = json.dumps({"bridge": _bridge(bridge), "tag": int_in_range(tag, 1, 4094, "VLAN tag"), "vm": vm_id(vm),
                        "vsctl": list(_vsctl(vsctl))}, sort_keys=True)
    return Action(OVS_KIND, ifname(representor), value, None,
                  f"representor {representor} -> {bridge} tag {tag} for VM {vm}")


def _decode(action: Action) -> tuple[str, str, int, int, tuple[str, ...]]:
    data = json.loads(action.value)
    return (ifname(action.target), _bridge(data["bridge"]), int_in_range(data["tag"], 1, 4094, "VLAN tag"),
            vm_id(data["vm"]), _vsctl(data["vsctl"]))


def _run(argv: list[str]) -> None:
    result = _runner(argv, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise HostError(f"{' '.join(argv[:1])} failed: {(result.stderr or result.stdout or '').strip()[:200]}")


def _ovs_do(host: HostRoot, action: Action, writer: Any) -> None:
    from aifactory_core.host.pcibind import RecordingWriter, SysfsWrite

    port, bridge, tag, vm, vsctl = _decode(action)
    if isinstance(writer, RecordingWriter):
        writer.writes.append(SysfsWrite(f"ovs:{bridge}/{port}", f"tag={tag}", action.reason))
        return
    _run([*vsctl, "--may-exist", "add-port", bridge, port, f"tag={tag}",
          "--", "set", "Interface", port, f"external_ids:aifactory-vm={vm}",
          "--", "set", "Port", port, f"tag={tag}", "vlan_mode=access"])


def _ovs_undo(host: HostRoot, action: Action, writer: Any) -> None:
    from aifactory_core.host.pcibind import RecordingWriter

    port, bridge, _tag, _vm, vsctl = _decode(action)
    if isinstance(writer, RecordingWriter):
        return
    _run([*vsctl, "--if-exists", "del-port", bridge, port])


def register() -> None:
    from aifactory_core.lifecycle.executor import register_executor

    register_executor(OVS_KIND, _ovs_do, _ovs_undo)


register()


@hookimpl
def aifactory_network_setup(inventory: HostInventory, request: Any, nic: Any, config: Config,
                            grant: Any) -> Iterable[Action] | None:
    from dataclasses import replace

    from aifactory_core.host.devlink import representors, switch_id
    from aifactory_core.vnm import vf
    from aifactory_core.vnm.plan import locate_nic_vf, vf_settings

    where = locate_nic_vf(inventory.host, nic)
    if where is None:
        return None
    if where.infiniband or switch_id(inventory.host, where.pf_netdev) is None:
        return None
    if (nic.vn_mad or "").lower() == "vxlan":
        raise UsageError(f"PCI NIC {nic.nic_id}: VXLAN networks on switchdev VFs are not supported; use a VLAN network")
    representor = representors(inventory.host, where.pf_netdev).get(where.vf)
    if representor is None:
        raise HostError(f"no representor for VF {where.vf} of {where.pf_netdev}")
    wanted = vf_settings(nic, grant)
    if wanted.vlan == 0:
        raise UsageError(f"PCI NIC {nic.nic_id}: a switchdev VF needs the network's VLAN_ID (the OVS tag)")
    section = config.plugin(NAME)
    return [vf.action(where.pf_netdev, where.vf, request.vm_id, replace(wanted, vlan=0, qos=0)),
            ovs_action(representor.netdev, section.get("bridge", DEFAULT_BRIDGE), wanted.vlan, request.vm_id,
                       section.get("ovs_vsctl", list(DEFAULT_VSCTL)))]


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
