"""SR-IOV VF configuration and bridge VLAN filtering over real netlink (pyroute2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pyroute2 import IPRoute

pytestmark = pytest.mark.realkernel

RTEXT_FILTER_VF = 1
BRIDGE_VLAN_INFO_PVID = 2
BRIDGE_VLAN_INFO_UNTAGGED = 4


@pytest.fixture
def ipr() -> Iterator[IPRoute]:
    with IPRoute() as ipr:
        yield ipr


def vf_info(ipr: IPRoute, index: int) -> dict[int, dict[str, Any]]:
    """VF number -> {attribute: value} as the kernel reports it."""
    msg = ipr.link("get", index=index, ext_mask=RTEXT_FILTER_VF)[0]
    vfs: dict[int, dict[str, Any]] = {}
    for info in msg.get_attr("IFLA_VFINFO_LIST").get_attrs("IFLA_VF_INFO"):
        n = info.get_attr("IFLA_VF_MAC")["vf"]
        vfs[n] = {
            "mac": info.get_attr("IFLA_VF_MAC")["mac"],
            "vlan": info.get_attr("IFLA_VF_VLAN")["vlan"],
            "qos": info.get_attr("IFLA_VF_VLAN")["qos"],
            "spoofchk": info.get_attr("IFLA_VF_SPOOFCHK")["spoofchk"],
            "trust": info.get_attr("IFLA_VF_TRUST")["trust"],
            "min_tx_rate": info.get_attr("IFLA_VF_RATE")["min_tx_rate"],
            "max_tx_rate": info.get_attr("IFLA_VF_RATE")["max_tx_rate"],
            "link_state": info.get_attr("IFLA_VF_LINK_STATE")["link_state"],
        }
    return vfs


def test_netdevsim_vfs_configured_and_read_back(ipr: IPRoute, netdevsim_pf: int) -> None:
    pf = netdevsim_pf
    assert ipr.link("get", index=pf, ext_mask=RTEXT_FILTER_VF)[0].get_attr("IFLA_NUM_VF") == 4
    ipr.link("set", index=pf, vf={"vf": 0, "mac": "02:00:00:00:00:10", "vlan": {"vlan": 100, "qos": 3}})
    ipr.link("set", index=pf, vf={"vf": 1, "spoofchk": 0, "trust": 1})
    ipr.link("set", index=pf, vf={"vf": 2, "rate": {"min_tx_rate": 100, "max_tx_rate": 1000}})
    ipr.link("set", index=pf, vf={"vf": 3, "link_state": 2})  # 2 = IFLA_VF_LINK_STATE_DISABLE

    vfs = vf_info(ipr, pf)
    assert sorted(vfs) == [0, 1, 2, 3]
    assert (vfs[0]["mac"], vfs[0]["vlan"], vfs[0]["qos"]) == ("02:00:00:00:00:10", 100, 3)
    assert (vfs[1]["spoofchk"], vfs[1]["trust"]) == (0, 1)
    assert (vfs[2]["min_tx_rate"], vfs[2]["max_tx_rate"]) == (100, 1000)
    assert vfs[3]["link_state"] == 2
    assert vfs[3]["vlan"] == 0 and vfs[1]["mac"] != "02:00:00:00:00:10"


def test_vlan_filtering_bridge_port_vlans_read_back(ipr: IPRoute) -> None:
    names = ("rkbr0", "rkp0", "rkp0-peer")
    try:
        ipr.link("add", ifname="rkbr0", kind="bridge", br_vlan_filtering=1)
        ipr.link("add", ifname="rkp0", kind="veth", peer="rkp0-peer")
        br, port = (ipr.link_lookup(ifname=n)[0] for n in ("rkbr0", "rkp0"))
        ipr.link("set", index=port, master=br, state="up")
        ipr.vlan_filter(
            "add", index=port, vlan_info={"vid": 100, "flags": BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED}
        )
        ipr.vlan_filter("add", index=port, vlan_info={"vid": 200})
        ipr.vlan_filter("del", index=port, vlan_info={"vid": 1})

        linkinfo = ipr.link("get", index=br)[0].get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
        assert linkinfo.get_attr("IFLA_BR_VLAN_FILTERING") == 1
        vlans = {}
        for msg in ipr.get_vlans():
            if msg["index"] != port:
                continue
            for info in msg.get_attr("IFLA_AF_SPEC").get_attrs("IFLA_BRIDGE_VLAN_INFO"):
                vlans[info["vid"]] = info["flags"]
        assert set(vlans) == {100, 200}
        assert vlans[100] & BRIDGE_VLAN_INFO_PVID and vlans[100] & BRIDGE_VLAN_INFO_UNTAGGED
        assert not vlans[200] & (BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED)
    finally:
        for name in names[:2]:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
    assert not any(ipr.link_lookup(ifname=n) for n in names)
