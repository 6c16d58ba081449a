"""VF configuration over netlink: set, read back, scrub; bad inputs send nothing.

The netlink peer is ``fixtures/nics/netlink_double.py``: requests and replies go through
pyroute2's own encoder and decoder (the bytes that would cross the socket); the real kernel path
is exercised in ``tests/realkernel/test_sriov.py`` on netdevsim.
"""

from __future__ import annotations

import pytest
from fixtures.nics.netlink_double import NetlinkDouble

from aifactory_core.errors import HostError, UsageError
from aifactory_core.host import netlink_vf

PF = 5


def tenant() -> netlink_vf.VfSettings:
    return netlink_vf.settings(mac="02:00:c0:a8:c9:0a", vlan=1001, qos=3, spoofchk=True, trust=True,
                               min_tx_rate=100, max_tx_rate=2500, link_state="enable")


def test_configure_read_back_and_scrub_to_clean() -> None:
    nl = NetlinkDouble({PF: 4})
    netlink_vf.apply(nl, PF, 2, tenant())
    netlink_vf.verify(nl, PF, 2, tenant())
    assert netlink_vf.read_vfs(nl, PF)[2] == tenant()
    assert netlink_vf.read_vfs(nl, PF)[1] == netlink_vf.CLEAN  # neighbours untouched
    netlink_vf.scrub(nl, PF, 2)
    assert netlink_vf.read_vfs(nl, PF)[2] == netlink_vf.CLEAN


def test_scrub_clears_infiniband_guids() -> None:
    nl = NetlinkDouble({PF: 2}, infiniband=True)
    wanted = netlink_vf.settings(mac="02:00:00:00:00:01", node_guid="0xa1f0000000540200",
                                 port_guid="a1:f0:00:00:00:54:02:01")
    netlink_vf.apply(nl, PF, 1, wanted)
    assert netlink_vf.read_vfs(nl, PF)[1].port_guid == "a1:f0:00:00:00:54:02:01"
    netlink_vf.scrub(nl, PF, 1, infiniband=True)
    assert netlink_vf.read_vfs(nl, PF)[1] == netlink_vf.CLEAN_IB


def test_read_asks_for_vf_info_without_vf_counters() -> None:
    """RTEXT_FILTER_VF (else no VF list) | RTEXT_FILTER_SKIP_STATS (else a PF with many IB VFs
    fails with "message too long": recorded in nics/recorded/ib-netlink-message-too-long.txt)."""
    nl = NetlinkDouble({PF: 2})
    netlink_vf.read_vfs(nl, PF)
    assert nl.calls[-1][1]["ext_mask"] == 1 | 8


def test_verify_catches_a_driver_that_ignores_a_setting() -> None:
    class IgnoresTrust(NetlinkDouble):
        def _set(self, index, spec):  # type: ignore[no-untyped-def]
            spec.pop("trust", None)
            return super()._set(index, spec)

    nl = IgnoresTrust({PF: 2})
    netlink_vf.apply(nl, PF, 0, tenant())
    with pytest.raises(HostError, match="trust: want True, have False"):
        netlink_vf.verify(nl, PF, 0, tenant())


def test_driver_refusal_is_a_host_error() -> None:
    nl = NetlinkDouble({PF: 2}, refuse={"IFLA_VF_TRUST"})
    with pytest.raises(HostError, match="cannot configure VF 0"):
        netlink_vf.apply(nl, PF, 0, tenant())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("vlan", 4095, "VLAN id 4095 outside 0..4094"),
    ("vlan", -1, "VLAN id -1 outside 0..4094"),
    ("mac", "01:00:5e:00:00:01", "is multicast"),
    ("mac", "02:00:00:00:00", "invalid MAC"),
    ("qos", 8, "VLAN QoS 8 outside 0..7"),
    ("max_tx_rate", -5, "max TX rate"),
    ("link_state", "up", "invalid link state"),
    ("trust", "yes", "invalid trust"),
    ("node_guid", "00:11:22", "invalid GUID"),
])
def test_bad_values_are_refused_before_any_netlink(field: str, value: object, message: str) -> None:
    nl = NetlinkDouble({PF: 4})
    arguments: dict[str, object] = {"mac": "02:00:00:00:00:01", "vlan": 10, field: value}
    with pytest.raises(UsageError, match=message):
        netlink_vf.apply(nl, PF, 0, netlink_vf.settings(**arguments))  # type: ignore[arg-type]
    assert nl.calls == []


def test_qos_without_vlan_and_min_above_max_are_refused() -> None:
    with pytest.raises(UsageError, match="QoS needs a VLAN"):
        netlink_vf.settings(qos=2)
    with pytest.raises(UsageError, match="exceeds max"):
        netlink_vf.settings(min_tx_rate=500, max_tx_rate=100)


@pytest.mark.parametrize("vf", [4, 63, -1])
def test_vf_index_beyond_the_pool_configures_nothing(vf: int) -> None:
    nl = NetlinkDouble({PF: 4})
    with pytest.raises(UsageError, match=f"VF index {vf} outside the pool"):
        netlink_vf.apply(nl, PF, vf, tenant())
    assert nl.sets() == 0
    assert all(state == netlink_vf.CLEAN for state in netlink_vf.read_vfs(nl, PF).values())
