"""SR-IOV VF configuration over netlink (pyroute2, imported lazily).

Everything a VF carries for its tenant — MAC, VLAN + QoS, spoof-check, trust, min/max TX rate,
link state, InfiniBand node/port GUIDs — is set on the PF with one ``RTM_SETLINK`` and read back
with ``RTM_GETLINK`` and :data:`EXT_MASK` (``RTEXT_FILTER_VF``: without it the kernel omits
``IFLA_VFINFO_LIST``; ``RTEXT_FILTER_SKIP_STATS``: kernels that honour it for VF info leave out
every VF's counters, without which a PF with many InfiniBand VFs can outgrow the netlink message,
"message too long"; older kernels ignore the flag).
:data:`CLEAN` is the state a released VF must be in; :func:`scrub` sets it
and verifies it by reading it back, so nothing of one tenant reaches the next.

Values are validated when a :class:`VfSettings` is built (:func:`settings`), before any netlink
message is sent: a bad value configures nothing.

An InfiniBand VF (settings with GUIDs) is different: the IPoIB PF implements only the VF's link
state and its node/port GUIDs, and refuses MAC, VLAN, rate, spoof-check or trust with
``EOPNOTSUPP``; it reports the VF with the PF's own address and spoof-check off. For such a VF
only :data:`IB_FIELDS` are sent and compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from aifactory_core.errors import HostError, UsageError
from aifactory_core.validate import int_in_range, mac_address

LINK_STATES = {"auto": 0, "enable": 1, "disable": 2}
"""IFLA_VF_LINK_STATE_AUTO/ENABLE/DISABLE."""
_LINK_STATE_NAMES = {number: name for name, number in LINK_STATES.items()}
ZERO_MAC = "00:00:00:00:00:00"
ZERO_GUID = "00:00:00:00:00:00:00:00"
_GUID = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){7}$")
MAX_RATE_MBPS = 10_000_000  # 10 Tb/s: beyond any NIC, below u32 overflow
EXT_MASK = 1 | 8
"""RTEXT_FILTER_VF | RTEXT_FILTER_SKIP_STATS."""
IB_FIELDS = ("link_state", "node_guid", "port_guid")
"""What an IPoIB PF lets the host set on an InfiniBand VF (ipoib's ndo_set_vf_link_state/_guid)."""


class Netlink(Protocol):
    """The part of pyroute2's ``IPRoute`` used here (a recorded double implements it in tests)."""

    def link(self, command: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class VfSettings:
    """Everything a VF carries for a tenant. ``None`` GUIDs mean "not an InfiniBand VF"."""

    mac: str = ZERO_MAC
    vlan: int = 0
    qos: int = 0
    spoofchk: bool = True
    trust: bool = False
    min_tx_rate: int = 0
    max_tx_rate: int = 0
    link_state: str = "auto"
    node_guid: str | None = None
    port_guid: str | None = None

    @property
    def infiniband(self) -> bool:
        return self.node_guid is not None or self.port_guid is not None

    def differences(self, other: VfSettings) -> list[str]:
        """``field: want X, have Y`` for every field that differs (GUIDs only when set here; for
        an InfiniBand VF only :data:`IB_FIELDS`)."""
        problems = []
        for item in fields(self):
            want, have = getattr(self, item.name), getattr(other, item.name)
            if item.name.endswith("_guid") and want is None:
                continue
            if self.infiniband and item.name not in IB_FIELDS:
                continue
            if want != have:
                problems.append(f"{item.name}: want {want}, have {have}")
        return problems


CLEAN = VfSettings()
CLEAN_IB = replace(CLEAN, node_guid=ZERO_GUID, port_guid=ZERO_GUID)


def guid(value: object) -> str:
    """An InfiniBand GUID in ``xx:xx:xx:xx:xx:xx:xx:xx`` form (also accepts ``0x`` + 16 hex)."""
    if not isinstance(value, str):
        raise UsageError(f"invalid GUID {value!r}")
    text = value.strip().lower()
    if re.fullmatch(r"(0x)?[0-9a-f]{16}", text):
        digits = text.removeprefix("0x")
        text = ":".join(digits[i:i + 2] for i in range(0, 16, 2))
    if not _GUID.fullmatch(text):
        raise UsageError(f"invalid GUID {value!r}: expected 8 colon-separated hex bytes")
    return text


def settings(*, mac: object = ZERO_MAC, vlan: object = 0, qos: object = 0, spoofchk: object = True,
             trust: object = False, min_tx_rate: object = 0, max_tx_rate: object = 0, link_state: object = "auto",
             node_guid: object = None, port_guid: object = None) -> VfSettings:
    """Validated :class:`VfSettings`; raises :class:`UsageError` naming the first bad value."""
    checked_mac = ZERO_MAC if mac == ZERO_MAC else mac_address(mac)
    vlan_id = int_in_range(vlan, 0, 4094, "VLAN id")
    priority = int_in_range(qos, 0, 7, "VLAN QoS")
    if priority and not vlan_id:
        raise UsageError("VLAN QoS needs a VLAN id")
    low = int_in_range(min_tx_rate, 0, MAX_RATE_MBPS, "min TX rate (Mb/s)")
    high = int_in_range(max_tx_rate, 0, MAX_RATE_MBPS, "max TX rate (Mb/s)")
    if high and low > high:
        raise UsageError(f"min TX rate {low} exceeds max TX rate {high}")
    if link_state not in LINK_STATES:
        raise UsageError(f"invalid link state {link_state!r}: expected auto, enable or disable")
    for name, flag in (("spoof-check", spoofchk), ("trust", trust)):
        if not isinstance(flag, bool):
            raise UsageError(f"invalid {name} {flag!r}: expected true or false")
    return VfSettings(
        mac=checked_mac, vlan=vlan_id, qos=priority, spoofchk=bool(spoofchk), trust=bool(trust),
        min_tx_rate=low, max_tx_rate=high, link_state=str(link_state),
        node_guid=None if node_guid is None else guid(node_guid),
        port_guid=None if port_guid is None else guid(port_guid),
    )


def request(vf: int, wanted: VfSettings) -> dict[str, Any]:
    """The pyroute2 ``vf=`` argument that sets ``wanted`` on VF ``vf``."""
    if wanted.infiniband:
        ib: dict[str, Any] = {"vf": vf, "link_state": LINK_STATES[wanted.link_state]}
        if wanted.node_guid is not None:
            ib["ib_node_guid"] = wanted.node_guid
        if wanted.port_guid is not None:
            ib["ib_port_guid"] = wanted.port_guid
        return ib
    spec: dict[str, Any] = {
        "vf": vf,
        "mac": wanted.mac,
        "vlan": {"vlan": wanted.vlan, "qos": wanted.qos},
        "spoofchk": int(wanted.spoofchk),
        "trust": int(wanted.trust),
        "link_state": LINK_STATES[wanted.link_state],
        "rate": {"min_tx_rate": wanted.min_tx_rate, "max_tx_rate": wanted.max_tx_rate},
    }
    return spec


def _decode(info: Any) -> tuple[int, VfSettings]:
    def get(name: str) -> Any:
        return info.get_attr(name)

    mac = get("IFLA_VF_MAC")
    vlan = get("IFLA_VF_VLAN") or {}
    rate = get("IFLA_VF_RATE") or {}
    spoof = get("IFLA_VF_SPOOFCHK")
    trust = get("IFLA_VF_TRUST")
    link = get("IFLA_VF_LINK_STATE")
    node = get("IFLA_VF_IB_NODE_GUID")
    port = get("IFLA_VF_IB_PORT_GUID")
    state = VfSettings(
        mac=mac["mac"], vlan=int(vlan.get("vlan", 0)), qos=int(vlan.get("qos", 0)),
        spoofchk=bool(spoof["spoofchk"]) if spoof is not None else True,
        trust=bool(trust["trust"]) if trust is not None else False,
        min_tx_rate=int(rate.get("min_tx_rate", 0)), max_tx_rate=int(rate.get("max_tx_rate", 0)),
        link_state=_LINK_STATE_NAMES.get(int(link["link_state"]), "auto") if link is not None else "auto",
        node_guid=node["ib_node_guid"] if node is not None else None,
        port_guid=port["ib_port_guid"] if port is not None else None,
    )
    return int(mac["vf"]), state


def read_vfs(ipr: Netlink, pf_index: int) -> dict[int, VfSettings]:
    """Every VF of the PF with ifindex ``pf_index``: VF number -> what the kernel reports."""
    try:
        message = ipr.link("get", index=pf_index, ext_mask=EXT_MASK)[0]
    except Exception as error:  # pyroute2 raises NetlinkError (an OSError subclass) and others
        raise HostError(f"cannot read VFs of ifindex {pf_index}: {error}") from None
    vf_list = message.get_attr("IFLA_VFINFO_LIST")
    if vf_list is None:
        return {}
    return dict(_decode(info) for info in vf_list.get_attrs("IFLA_VF_INFO"))


def vf_count(ipr: Netlink, pf_index: int) -> int:
    message = ipr.link("get", index=pf_index, ext_mask=EXT_MASK)[0]
    return int(message.get_attr("IFLA_NUM_VF") or 0)


def apply(ipr: Netlink, pf_index: int, vf: int, wanted: VfSettings, *, pool_size: int | None = None) -> None:
    """Set ``wanted`` on VF ``vf`` in one netlink request (the VF index is checked against the pool)."""
    size = vf_count(ipr, pf_index) if pool_size is None else pool_size
    if not 0 <= vf < size:
        raise UsageError(f"VF index {vf} outside the pool of ifindex {pf_index} (0..{size - 1})")
    try:
        ipr.link("set", index=pf_index, vf=request(vf, wanted))
    except Exception as error:
        raise HostError(f"cannot configure VF {vf} of ifindex {pf_index}: {error}") from None


def verify(ipr: Netlink, pf_index: int, vf: int, wanted: VfSettings) -> None:
    """Raise :class:`HostError` unless the kernel reports exactly ``wanted`` for the VF."""
    have = read_vfs(ipr, pf_index).get(vf)
    if have is None:
        raise HostError(f"VF {vf} of ifindex {pf_index} is not reported by the kernel")
    problems = wanted.differences(have)
    if problems:
        raise HostError(f"VF {vf} of ifindex {pf_index} reads back wrong: {'; '.join(problems)}")


def scrub(ipr: Netlink, pf_index: int, vf: int, *, infiniband: bool = False, pool_size: int | None = None) -> None:
    """Return the VF to :data:`CLEAN` (GUIDs cleared for InfiniBand) and verify it by reading back."""
    clean = CLEAN_IB if infiniband else CLEAN
    apply(ipr, pf_index, vf, clean, pool_size=pool_size)
    verify(ipr, pf_index, vf, clean)


def open_netlink() -> Any:
    """A pyroute2 ``IPRoute`` (the import costs ~0.1 s; it happens only here)."""
    from pyroute2 import IPRoute

    return IPRoute()
