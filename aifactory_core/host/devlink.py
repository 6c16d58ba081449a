"""Embedded-switch mode (devlink, through pyroute2) and VF representor discovery (sysfs).

In ``switchdev`` mode a ConnectX/BlueField NIC gives each VF a *representor* netdev on the host:
traffic from the VF enters the host's switch (OVS) through it. A representor is recognised by its
``phys_switch_id`` (equal to its PF's) and ``phys_port_name`` ``pfXvfY`` (the kernel's
``devlink_port`` naming for PCI VF flavoured ports); the uplink is ``pX``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from aifactory_core.errors import HostError, UsageError
from aifactory_core.host.eswitch import vf_representors
from aifactory_core.host.sysfs import list_dir, read_str
from aifactory_core.hostroot import HostRoot
from aifactory_core.validate import ifname, pci_address

ESWITCH_MODES = {"legacy": 0, "switchdev": 1}
"""DEVLINK_ESWITCH_MODE_LEGACY / _SWITCHDEV."""
_MODE_NAMES = {number: name for name, number in ESWITCH_MODES.items()}
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


@dataclass(frozen=True)
class Representor:
    netdev: str
    pf: int
    vf: int
    switch_id: str


def devlink_handle(bus: str, device: str) -> tuple[str, str]:
    """A validated devlink handle: ``("pci", "0000:03:00.0")`` or ``("netdevsim", "netdevsim7")``."""
    if bus == "pci":
        return bus, pci_address(device)
    if bus in ("netdevsim", "auxiliary") and _DEVICE_NAME.fullmatch(device):
        return bus, device
    raise UsageError(f"invalid devlink handle {bus}/{device}")


def switch_id(host: HostRoot, netdev: str) -> str | None:
    return read_str(host.path(f"/sys/class/net/{ifname(netdev)}/phys_switch_id")) or None


def representors(host: HostRoot, pf_netdev: str) -> dict[int, Representor]:
    """The VF representors on the same switch as ``pf_netdev``: VF number -> representor (the scan
    and its naming rules: :func:`aifactory_core.host.eswitch.vf_representors`)."""
    netdev = ifname(pf_netdev)
    if switch_id(host, netdev) is None:
        raise HostError(f"{netdev} has no phys_switch_id (not in switchdev mode?)")
    found = vf_representors(host.read_text, lambda path: list_dir(host.path(path)), netdev)
    return {vf: Representor(name, pf, vf, switch) for vf, (name, pf, switch) in found.items()}


def representor_of(host: HostRoot, pf_netdev: str, vf: int) -> Representor:
    """The representor of local VF ``vf`` of ``pf_netdev``, or :class:`HostError` when none exists."""
    found = representors(host, pf_netdev).get(vf)
    if found is None:
        raise HostError(f"no representor for VF {vf} of {pf_netdev}")
    return found


class Devlink(Protocol):
    """Eswitch mode get/set (pyroute2 in production; a recorded double in tests)."""

    def eswitch_mode(self, bus: str, device: str) -> str: ...

    def set_eswitch_mode(self, bus: str, device: str, mode: str) -> None: ...


class PyrouteDevlink:
    """Devlink over generic netlink with pyroute2's ``DL`` socket (imported on first use)."""

    def __init__(self) -> None:
        from pyroute2 import DL

        self._socket: Any = DL()

    def close(self) -> None:
        self._socket.close()

    def _request(self, command: str, bus: str, device: str, extra: list[tuple[str, int]], flags: int) -> Any:
        from pyroute2.netlink.devlink import DEVLINK_NAMES, devlinkcmd

        bus, device = devlink_handle(bus, device)
        message = devlinkcmd()
        message["cmd"] = DEVLINK_NAMES[command]
        message["version"] = 1
        message["attrs"] = [("DEVLINK_ATTR_BUS_NAME", bus), ("DEVLINK_ATTR_DEV_NAME", device), *extra]
        try:
            return self._socket.nlm_request(message, msg_type=self._socket.prid, msg_flags=flags)
        except Exception as error:
            raise HostError(f"devlink {command.lower()} on {bus}/{device}: {error}") from None

    def eswitch_mode(self, bus: str, device: str) -> str:
        from pyroute2.netlink import NLM_F_REQUEST

        replies = self._request("DEVLINK_CMD_ESWITCH_GET", bus, device, [], NLM_F_REQUEST)
        number = replies[0].get_attr("DEVLINK_ATTR_ESWITCH_MODE")
        return _MODE_NAMES.get(int(number), f"unknown({number})")

    def set_eswitch_mode(self, bus: str, device: str, mode: str) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

        if mode not in ESWITCH_MODES:
            raise UsageError(f"invalid eswitch mode {mode!r}: expected legacy or switchdev")
        self._request("DEVLINK_CMD_ESWITCH_SET", bus, device, [("DEVLINK_ATTR_ESWITCH_MODE", ESWITCH_MODES[mode])],
                      NLM_F_REQUEST | NLM_F_ACK)
