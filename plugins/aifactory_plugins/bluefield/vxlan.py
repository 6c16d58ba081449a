"""A switchdev VF in a tenant's VXLAN segment: the representor and a per-VNI tunnel port share a
host-local VLAN tag on the tenant bridge.

OpenNebula's ``ovswitch_vxlan`` driver puts one VXLAN link per network (VNI = ``OUTER_VLAN_ID``)
into the network's bridge and tags the VM ports inside it; it removes the link when it is the last
port left. Here every tenant shares one bridge, so each VNI gets

* a tunnel port ``vxlan<VNI>`` (``type=vxlan``, ``options:key=<VNI>``, ``options:remote_ip`` /
  ``options:local_ip``): an access port with a host-local tag drawn from
  ``[plugin.bluefield] vxlan_local_tags``; ``external_ids:aifactory-vxlan=<VNI>``;
* each representor of the segment: an access port with the same tag,
  ``external_ids:aifactory-vni=<VNI>`` and ``aifactory-vm=<VM>``.

The tag maps to that one tunnel only, so the segment's frames reach its own VFs and its own VNI on
the wire, nothing else. The tunnel port is shared: its users are counted from the bridge itself
(the representor ports naming its VNI), under the bridge lock, so the release of one VM never cuts
another VM of the same VNI off, and the last release removes it. Both steps are idempotent.

VNI: ``VLAN_ID`` for ``VN_MAD = vxlan`` (OpenNebula's VXLAN driver), ``OUTER_VLAN_ID`` for
``VN_MAD = ovswitch_vxlan``; always checked against the tenant's ``vnis``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aifactory_core.errors import ConfigError, HostError, UsageError
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import Action
from aifactory_core.validate import ifname, int_in_range, ip_address, vm_id, vni

from .ovs import (
    TUNNEL_KEY,
    VM_KEY,
    VNI_KEY,
    PortRow,
    bridge_lock,
    bridge_name,
    bridge_ports,
    configured_vsctl,
    journal_data,
    run_vsctl,
)

VXLAN_KIND = "ovs_vxlan_port"
DEFAULT_LOCAL_TAGS = (4000, 4094)
MTU_RANGE = (68, 9216)


@dataclass(frozen=True)
class VxlanSegment:
    """Where a representor goes for one VXLAN network: the VNI, the tunnel's endpoints, the range
    its host-local tag is drawn from, and the MTU asked for the representor."""

    vni: int
    remote_ip: str
    local_ip: str | None
    local_tags: tuple[int, int]
    mtu: int | None = None

    @property
    def tunnel(self) -> str:
        return tunnel_name(self.vni)


def tunnel_name(number: int) -> str:
    return f"vxlan{vni(number)}"


def local_tag_range(section: Mapping[str, Any]) -> tuple[int, int]:
    raw = section.get("vxlan_local_tags", f"{DEFAULT_LOCAL_TAGS[0]}-{DEFAULT_LOCAL_TAGS[1]}")
    low, _, high = str(raw).partition("-")
    try:
        first = int_in_range(low, 1, 4094, "VLAN tag")
        last = int_in_range(high or low, 1, 4094, "VLAN tag")
    except UsageError as error:
        raise ConfigError(f"[plugin.bluefield] vxlan_local_tags {raw!r}: {error.message}") from None
    if first > last:
        raise ConfigError(f"[plugin.bluefield] vxlan_local_tags {raw!r}: empty range")
    return first, last


def configured_ip(section: Mapping[str, Any], key: str) -> str | None:
    raw = section.get(key)
    if raw is None:
        return None
    try:
        return ip_address(raw, key)
    except UsageError as error:
        raise ConfigError(f"[plugin.bluefield] {error.message}") from None


def segment_for(nic: Any, grant: Any, section: Mapping[str, Any]) -> VxlanSegment:
    """The segment a VXLAN PCI NIC joins; refuses a VNI outside the tenant's grant."""
    from aifactory_core.vnm.plan import VXLAN_DRIVERS

    driver = (nic.vn_mad or "").lower()
    source = VXLAN_DRIVERS[driver]
    raw = nic.vlan_id if source == "VLAN_ID" else nic.attributes.get(source)
    if raw is None:
        raise UsageError(f"PCI NIC {nic.nic_id}: VN_MAD {driver} without {source} (the VNI)")
    number = vni(raw)
    if driver == "ovswitch_vxlan" and nic.vlan_id:
        raise UsageError(f"PCI NIC {nic.nic_id}: VLAN_ID {nic.vlan_id} inside VXLAN {number} is not supported on "
                         "switchdev VFs (the representor is an access port of the segment)")
    grant.check_vni(number)
    mode = nic.attributes.get("VXLAN_MODE", "").strip().lower()
    if mode not in ("", "evpn"):
        raise UsageError(f"PCI NIC {nic.nic_id}: VXLAN_MODE {mode[:20]!r} is not supported on switchdev VFs "
                         "(OVS tunnels are unicast: use evpn and [plugin.bluefield] vxlan_remote_ip)")
    remote = configured_ip(section, "vxlan_remote_ip")
    if remote is None:
        raise ConfigError("[plugin.bluefield] vxlan_remote_ip is needed for VXLAN networks on switchdev VFs")
    local = configured_ip(section, "vxlan_local_ip")
    tep = nic.attributes.get("VXLAN_TEP", "").strip().lower()
    if tep not in ("", "dev", "local"):
        raise UsageError(f"PCI NIC {nic.nic_id}: VXLAN_TEP {tep[:20]!r}: expected dev or local")
    if tep == "local" and local is None:
        raise ConfigError("[plugin.bluefield] vxlan_local_ip is needed for VXLAN_TEP = local")
    raw_mtu = nic.attributes.get("MTU")
    mtu = None if raw_mtu is None else int_in_range(raw_mtu, *MTU_RANGE, "MTU")
    return VxlanSegment(number, remote, local, local_tag_range(section), mtu)


def vxlan_action(representor: str, bridge: str, segment: VxlanSegment, vm: int) -> Action:
    data = {"bridge": bridge_name(bridge), "vni": vni(segment.vni), "remote_ip": ip_address(segment.remote_ip),
            "local_ip": None if segment.local_ip is None else ip_address(segment.local_ip),
            "local_tags": list(segment.local_tags), "mtu": segment.mtu, "vm": vm_id(vm)}
    return Action(VXLAN_KIND, ifname(representor), json.dumps(data, sort_keys=True), None,
                  f"representor {representor} -> {bridge} VXLAN {segment.vni} for VM {vm}")


def _decode(action: Action) -> tuple[str, str, VxlanSegment, int]:
    data = journal_data(action)
    try:
        tags = data["local_tags"]
        if not isinstance(tags, list) or len(tags) != 2:
            raise UsageError("local_tags must be two VLAN tags")
        low, high = (int_in_range(t, 1, 4094, "VLAN tag") for t in tags)
        local = data.get("local_ip")
        mtu = data.get("mtu")
        segment = VxlanSegment(vni(data["vni"]), ip_address(data["remote_ip"]),
                               None if local is None else ip_address(local), (low, high),
                               None if mtu is None else int_in_range(mtu, *MTU_RANGE, "MTU"))
        return ifname(action.target), bridge_name(data["bridge"]), segment, vm_id(data["vm"])
    except KeyError as error:
        raise UsageError(f"malformed {action.kind} action: no {error}") from None


def segment_tag(ports: Mapping[str, PortRow], bridge: str, segment: VxlanSegment) -> tuple[int, bool]:
    """The host-local tag of ``segment`` on the bridge, and whether its tunnel port is already there.

    A new segment takes the lowest tag of the range that no port of the bridge uses or trunks (the
    bridge's own internal port aside: it is the host's, not a tenant's)."""
    existing = ports.get(segment.tunnel)
    if existing is not None:
        if existing.external_ids.get(TUNNEL_KEY) != str(segment.vni) or existing.tag is None:
            raise HostError(f"port {segment.tunnel} on {bridge} is not the tunnel of VXLAN {segment.vni}")
        return existing.tag, True
    low, high = segment.local_tags
    others = [row for row in ports.values() if row.name != bridge]
    for tag in range(low, high + 1):
        if not any(row.carries(tag) for row in others):
            return tag, False
    trunk_all = next((row.name for row in others if row.tag is None and not row.trunks), None)
    hint = f": port {trunk_all} trunks every VLAN (restrict its trunks)" if trunk_all else ""
    raise HostError(f"no free VXLAN local tag in {low}-{high} on {bridge}{hint}")


def _vxlan_do(host: HostRoot, action: Action, writer: Any) -> None:
    from aifactory_core.host.pcibind import RecordingWriter, SysfsWrite

    port, bridge, segment, vm = _decode(action)
    vsctl = configured_vsctl()
    if isinstance(writer, RecordingWriter):
        endpoints = f"remote_ip={segment.remote_ip}" + (f" local_ip={segment.local_ip}" if segment.local_ip else "")
        writer.writes.append(SysfsWrite(f"ovs:{bridge}/{segment.tunnel}", f"vxlan key={segment.vni} {endpoints}",
                                        action.reason))
        writer.writes.append(SysfsWrite(f"ovs:{bridge}/{port}", f"vni={segment.vni}", action.reason))
        return
    with bridge_lock(host, bridge):
        ports = bridge_ports(vsctl, bridge)
        if ports is None:
            raise HostError(f"no OVS bridge {bridge}")
        tag, shared = segment_tag(ports, bridge, segment)
        argv = [*vsctl]
        if not shared:
            options = [f"options:key={segment.vni}", f"options:remote_ip={segment.remote_ip}"]
            if segment.local_ip is not None:
                options.append(f"options:local_ip={segment.local_ip}")
            argv += ["--", "add-port", bridge, segment.tunnel,
                     "--", "set", "Interface", segment.tunnel, "type=vxlan", *options,
                     "--", "set", "Port", segment.tunnel, f"tag={tag}", "vlan_mode=access",
                     f"external_ids:{TUNNEL_KEY}={segment.vni}"]
        argv += ["--", "--may-exist", "add-port", bridge, port,
                 "--", "set", "Port", port, f"tag={tag}", "vlan_mode=access", "trunks=[]",
                 f"external_ids:{VNI_KEY}={segment.vni}", f"external_ids:{VM_KEY}={vm}",
                 "--", "set", "Interface", port, f"external_ids:{VM_KEY}={vm}"]
        if segment.mtu is not None:
            argv.append(f"mtu_request={segment.mtu}")
        run_vsctl(argv)


def _vxlan_undo(host: HostRoot, action: Action, writer: Any) -> None:
    """Remove the representor's port (when it is still this VM's) and, when no representor of the
    VNI is left on the bridge, the tunnel port."""
    from aifactory_core.host.pcibind import RecordingWriter

    port, bridge, segment, vm = _decode(action)
    if isinstance(writer, RecordingWriter):
        return
    vsctl = configured_vsctl()
    with bridge_lock(host, bridge):
        ports = bridge_ports(vsctl, bridge)
        if ports is None:
            return
        argv = [*vsctl]
        mine = ports.get(port)
        if mine is not None and mine.external_ids.get(VM_KEY, str(vm)) == str(vm):
            argv += ["--", "--if-exists", "del-port", bridge, port]
            ports = {name: row for name, row in ports.items() if name != port}
        users = [row for row in ports.values() if row.external_ids.get(VNI_KEY) == str(segment.vni)]
        tunnel = ports.get(segment.tunnel)
        if not users and tunnel is not None and tunnel.external_ids.get(TUNNEL_KEY) == str(segment.vni):
            argv += ["--", "--if-exists", "del-port", bridge, segment.tunnel]
        if len(argv) > len(vsctl):
            run_vsctl(argv)
