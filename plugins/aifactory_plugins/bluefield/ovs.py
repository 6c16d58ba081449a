"""Open vSwitch access for the tenant bridge: ``ovs-vsctl`` argv, the per-bridge lock, the bridge's
ports as OVSDB reports them, and the ``ovs_port`` action (a representor as a VLAN access port).

Every change to a tenant bridge is made under one host-local lock per bridge (a ``flock`` in the
state dir), so a VM plugging a port and another VM releasing one never interleave their
read-decide-write sequences.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aifactory_core.errors import ConfigError, HostError, UsageError
from aifactory_core.hostroot import HostRoot
from aifactory_core.model import Action
from aifactory_core.validate import ifname, int_in_range, vm_id

OVS_KIND = "ovs_port"
DEFAULT_BRIDGE = "br-tenant"
DEFAULT_VSCTL = ("ovs-vsctl", "--timeout=10")
VM_KEY = "aifactory-vm"
VNI_KEY = "aifactory-vni"
"""``Port`` external id of a representor in a VXLAN segment (its VNI)."""
TUNNEL_KEY = "aifactory-vxlan"
"""``Port`` external id of the VXLAN tunnel port a segment's representors share (its VNI)."""
_BRIDGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_runner: Any = subprocess.run
_vsctl: tuple[str, ...] = DEFAULT_VSCTL


def bridge_name(value: object) -> str:
    if not isinstance(value, str) or not _BRIDGE.fullmatch(value):
        raise ConfigError(f"[plugin.bluefield] bridge {value!r}: not a bridge name")
    return value


def vsctl_argv(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(a, str) for a in value):
        raise ConfigError("[plugin.bluefield] ovs_vsctl must be a non-empty list of strings (argv)")
    return tuple(value)


def configure_vsctl(section: Mapping[str, Any]) -> None:
    """Take ``ovs-vsctl``'s argv from ``[plugin.bluefield] ovs_vsctl`` (the plugin's configure hook).

    The OVS actions run only this command: a journal holds the port, the bridge and the tag, never
    a command, so undoing a journal (at boot, as its owner) runs nothing the journal names."""
    global _vsctl
    _vsctl = vsctl_argv(section.get("ovs_vsctl", list(DEFAULT_VSCTL)))


def configured_vsctl() -> tuple[str, ...]:
    return _vsctl


def run_vsctl(argv: list[str]) -> str:
    """Run ovs-vsctl; not as root (OpenNebula's drivers run as oneadmin, and the OVS database
    socket is root's) through ``sudo -n``, which OpenNebula's own sudoers grants oneadmin for
    ``ovs-vsctl`` (its ONE_OVS alias)."""
    if os.geteuid() != 0 and argv[:1] != ["sudo"]:
        argv = ["sudo", "-n", *argv]
    try:
        result = _runner(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise HostError(f"{argv[0]} could not run: {error}") from None
    if result.returncode != 0:
        raise HostError(f"{' '.join(argv[:1])} failed: {(result.stderr or result.stdout or '').strip()[:200]}")
    return str(result.stdout or "")


@contextmanager
def bridge_lock(host: HostRoot, bridge: str) -> Iterator[None]:
    from aifactory_core.lifecycle.atomic import open_lock

    fd = open_lock(host.state_dir / "ovs" / f"{bridge_name(bridge)}.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class PortRow:
    """One OVSDB ``Port`` row of a bridge: its access tag, its trunks, its external ids."""

    name: str
    tag: int | None
    trunks: frozenset[int]
    external_ids: Mapping[str, str] = field(default_factory=dict)

    def carries(self, tag: int) -> bool:
        """True when frames of VLAN ``tag`` may leave through this port."""
        if self.tag is not None:
            return self.tag == tag
        return not self.trunks or tag in self.trunks


def _atoms(value: Any) -> list[Any]:
    """An OVSDB JSON value as a list: ``["set", [...]]``, a bare atom, or ``["map", ...]`` pairs."""
    if isinstance(value, list) and len(value) == 2 and value[0] in ("set", "map"):
        return list(value[1])
    return [value]


def parse_ports(text: str) -> dict[str, PortRow]:
    """``ovs-vsctl --format=json --columns=name,tag,trunks,external_ids list Port`` as rows by name."""
    try:
        table = json.loads(text)
        headings = table["headings"]
        rows = {}
        for data in table["data"]:
            record = dict(zip(headings, data, strict=True))
            tags = [t for t in _atoms(record["tag"]) if isinstance(t, int)]
            trunks = frozenset(t for t in _atoms(record["trunks"]) if isinstance(t, int))
            ids = {str(k): str(v) for k, v in _atoms(record["external_ids"])}
            name = str(record["name"])
            rows[name] = PortRow(name, tags[0] if tags else None, trunks, ids)
        return rows
    except (ValueError, KeyError, TypeError) as error:
        raise HostError(f"ovs-vsctl list Port: unexpected output ({error})") from None


def bridge_ports(vsctl: Sequence[str], bridge: str) -> dict[str, PortRow] | None:
    """The ports of ``bridge`` (its own internal port included); None when there is no such bridge."""
    try:
        result = _runner([*vsctl, "br-exists", bridge], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise HostError(f"{vsctl[0]} could not run: {error}") from None
    if result.returncode == 2:
        return None
    if result.returncode != 0:
        raise HostError(f"ovs-vsctl br-exists {bridge} failed: {(result.stderr or '').strip()[:200]}")
    names = set(run_vsctl([*vsctl, "list-ports", bridge]).split()) | {bridge}
    rows = parse_ports(run_vsctl([*vsctl, "--format=json", "--columns=name,tag,trunks,external_ids",
                                  "list", "Port"]))
    return {name: row for name, row in rows.items() if name in names}


# ---- a representor as a VLAN access port -----------------------------------------------------

def ovs_action(representor: str, bridge: str, tag: int, vm: int) -> Action:
    value = json.dumps({"bridge": bridge_name(bridge), "tag": int_in_range(tag, 1, 4094, "VLAN tag"),
                        "vm": vm_id(vm)}, sort_keys=True)
    return Action(OVS_KIND, ifname(representor), value, None,
                  f"representor {representor} -> {bridge} tag {tag} for VM {vm}")


def journal_data(action: Action) -> dict[str, Any]:
    """An OVS action's JSON value as a mapping (a journal's ``vsctl``, from before commands left the
    journals, is never read)."""
    try:
        data = json.loads(action.value)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise UsageError(f"malformed {action.kind} action for {action.target[:20]!r}")
    return data


def _decode(action: Action) -> tuple[str, str, int, int]:
    data = journal_data(action)
    try:
        return (ifname(action.target), bridge_name(data["bridge"]),
                int_in_range(data["tag"], 1, 4094, "VLAN tag"), vm_id(data["vm"]))
    except KeyError as error:
        raise UsageError(f"malformed {action.kind} action: no {error}") from None


def _ovs_do(host: HostRoot, action: Action, writer: Any) -> None:
    from aifactory_core.host.pcibind import RecordingWriter, SysfsWrite

    port, bridge, tag, vm = _decode(action)
    if isinstance(writer, RecordingWriter):
        writer.writes.append(SysfsWrite(f"ovs:{bridge}/{port}", f"tag={tag}", action.reason))
        return
    vsctl = configured_vsctl()
    with bridge_lock(host, bridge):
        ports = bridge_ports(vsctl, bridge) or {}
        segment = next((row for row in ports.values() if TUNNEL_KEY in row.external_ids and row.tag == tag), None)
        if segment is not None:
            raise HostError(f"VLAN {tag} on {bridge} is the local tag of VXLAN {segment.external_ids[TUNNEL_KEY]} "
                            f"(port {segment.name}); keep tenant VLANs out of [plugin.bluefield] vxlan_local_tags")
        run_vsctl([*vsctl, "--may-exist", "add-port", bridge, port, f"tag={tag}",
                   "--", "set", "Interface", port, f"external_ids:{VM_KEY}={vm}",
                   "--", "set", "Port", port, f"tag={tag}", "vlan_mode=access"])


def _ovs_undo(host: HostRoot, action: Action, writer: Any) -> None:
    from aifactory_core.host.pcibind import RecordingWriter

    port, bridge, _tag, _vm = _decode(action)
    if isinstance(writer, RecordingWriter):
        return
    with bridge_lock(host, bridge):
        run_vsctl([*configured_vsctl(), "--if-exists", "del-port", bridge, port])
