"""VXLAN networks on switchdev VFs: planning against the switchdev host shapes of
``fixtures/nics/cx7.py`` and the recorded ConnectX-6 ``devlink port`` listing, the grant deciding
the VNI, the validation of every value that becomes an ``ovs-vsctl`` argument, and the choice of
the host-local tag from a bridge's ports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aifactory_plugins import bluefield
from aifactory_plugins.bluefield.ovs import PortRow, parse_ports
from aifactory_plugins.bluefield.vxlan import VxlanSegment, _decode, segment_tag, tunnel_name
from fixtures.nics import cx7
from hypothesis import given
from hypothesis import strategies as st

from aifactory_core.config import parse_config
from aifactory_core.errors import ConfigError, HostError, PolicyRefused, UsageError
from aifactory_core.host.inventory import HostInventory
from aifactory_core.lifecycle.executor import plan_writes
from aifactory_core.model import Action
from aifactory_core.one.vm import PciRequest
from aifactory_core.validate import MAX_VNI, ip_address, vni
from aifactory_core.vnm.grant import TenantNetworkGrant

GRANT = TenantNetworkGrant("llm", vlans=((1000, 1009),), vnis=((5000, 5099),))
SECTION = {"bridge": "br-llm", "ovs_vsctl": ["ovs-vsctl"], "vxlan_remote_ip": "192.0.2.10"}


class Request:
    vm_id = 42


def nic(address: str, vn_mad: str = "vxlan", vlan_id: int | None = 5001, **attributes: str) -> PciRequest:
    values: dict[str, Any] = {name: None for name in PciRequest.__dataclass_fields__}
    values.update(type="NIC", address=address, mac="02:00:c0:a8:c9:0a", vlan_id=vlan_id, nic_id=1, network_id=7,
                  vn_mad=vn_mad, attributes=attributes)
    return PciRequest(**values)


def plan(host: Any, request_nic: PciRequest, section: dict[str, Any] = SECTION,
         grant: TenantNetworkGrant = GRANT) -> list[Action]:
    config = parse_config({"plugin": {"bluefield": section}})
    return list(bluefield.aifactory_network_setup(HostInventory(host), Request(), request_nic, config, grant) or [])


def test_vxlan_vf_gets_an_untagged_vf_and_a_segment_port(tmp_path: Path) -> None:
    host = cx7.build(tmp_path)
    actions = plan(host, nic("0000:18:00.4", MTU="8950"))
    assert [a.kind for a in actions] == ["vf_config", "ovs_vxlan_port"]
    settings = json.loads(actions[0].value)["settings"]
    assert (actions[0].target, settings["vlan"], settings["qos"]) == ("ens1f0np0/2", 0, 0)
    data = json.loads(actions[1].value)
    assert actions[1].target == "eth12"
    assert (data["vni"], data["remote_ip"], data["local_ip"], data["local_tags"], data["mtu"]) == (
        5001, "192.0.2.10", None, [4000, 4094], 8950)
    writes = plan_writes(host, actions)
    assert [(w.path, w.value) for w in writes[1:]] == [
        ("ovs:br-llm/vxlan5001", "vxlan key=5001 remote_ip=192.0.2.10"), ("ovs:br-llm/eth12", "vni=5001")]


def test_recorded_cx6_representor_joins_the_segment(tmp_path: Path) -> None:
    """Recording: ``devlink-port-cx6.txt`` (see ``test_bluefield_recorded``): representor enp7s0f0_0
    (``pf0vf0``) of uplink enp7s0f0; VF 0's PCI address is filled in."""
    from test_bluefield_recorded import host_from_devlink

    host, _ports = host_from_devlink(tmp_path, "devlink-port-cx6.txt", {0: "0000:07:00.2"})
    actions = plan(host, nic("0000:07:00.2", vn_mad="ovswitch_vxlan", vlan_id=None, OUTER_VLAN_ID="5099",
                             VXLAN_MODE="evpn", VXLAN_TEP="local"),
                   {**SECTION, "vxlan_local_ip": "192.0.2.1", "vxlan_local_tags": "3000-3099"})
    assert [a.kind for a in actions] == ["vf_config", "ovs_vxlan_port"]
    data = json.loads(actions[1].value)
    assert (actions[1].target, data["vni"], data["local_ip"], data["local_tags"]) == (
        "enp7s0f0_0", 5099, "192.0.2.1", [3000, 3099])


def test_the_grant_decides_the_vni(tmp_path: Path) -> None:
    host = cx7.build(tmp_path)
    with pytest.raises(PolicyRefused, match="VNI 6000 is outside tenant llm's vnis 5000-5099"):
        plan(host, nic("0000:18:00.2", vlan_id=6000))
    with pytest.raises(PolicyRefused, match="VNI 5001 is outside tenant web's vnis none"):
        plan(host, nic("0000:18:00.2"), grant=TenantNetworkGrant("web", vlans=((5001, 5001),)))
    with pytest.raises(PolicyRefused, match="VNI 4999"):  # ovswitch_vxlan: the VNI is OUTER_VLAN_ID
        plan(host, nic("0000:18:00.2", vn_mad="ovswitch_vxlan", vlan_id=None, OUTER_VLAN_ID="4999"))
    with pytest.raises(PolicyRefused, match="trusted"):  # the VF's own switches are still the grant's
        plan(host, nic("0000:18:00.2", TRUST="YES"))


@pytest.mark.parametrize(("request_nic", "section", "error", "match"), [
    (nic("0000:18:00.2", vlan_id=None), SECTION, UsageError, "without VLAN_ID"),
    (nic("0000:18:00.2", vn_mad="ovswitch_vxlan", vlan_id=None), SECTION, UsageError, "without OUTER_VLAN_ID"),
    (nic("0000:18:00.2", vn_mad="ovswitch_vxlan", vlan_id=1001, OUTER_VLAN_ID="5001"), SECTION, UsageError,
     "VLAN_ID 1001 inside VXLAN 5001"),
    (nic("0000:18:00.2", VXLAN_MODE="multicast"), SECTION, UsageError, "multicast"),
    (nic("0000:18:00.2", VXLAN_TEP="eth0"), SECTION, UsageError, "VXLAN_TEP"),
    (nic("0000:18:00.2", VXLAN_TEP="local"), SECTION, ConfigError, "vxlan_local_ip"),
    (nic("0000:18:00.2", MTU="9217"), SECTION, UsageError, "MTU 9217"),
    (nic("0000:18:00.2"), {"bridge": "br-llm"}, ConfigError, "vxlan_remote_ip is needed"),
    (nic("0000:18:00.2"), {**SECTION, "vxlan_remote_ip": "239.1.1.1"}, ConfigError, "not a unicast"),
    (nic("0000:18:00.2"), {**SECTION, "vxlan_remote_ip": "10.0.0.1,remote_ip=flow"}, ConfigError, "invalid"),
    (nic("0000:18:00.2"), {**SECTION, "vxlan_local_tags": "4094-4000"}, ConfigError, "empty range"),
    (nic("0000:18:00.2"), {**SECTION, "vxlan_local_tags": "0-10"}, ConfigError, "VLAN tag 0"),
])
def test_refusals_name_the_offending_value(tmp_path: Path, request_nic: PciRequest, section: dict[str, Any],
                                           error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plan(cx7.build(tmp_path), request_nic, section)


def test_configure_checks_the_vxlan_settings() -> None:
    config = parse_config({})
    bluefield.aifactory_configure(config, "bluefield", {**SECTION, "vxlan_local_ip": "2001:db8::1"})
    for key, value, match in (("vxlan_local_ip", "fe80::1%eth0", "vxlan_local_ip"),
                              ("vxlan_remote_ip", "::", "not a unicast"),
                              ("vxlan_local_tags", "4000-5000", "VLAN tag 5000"),
                              ("vxlan_peers", [], "vxlan_peers")):
        with pytest.raises(ConfigError, match=match):
            bluefield.aifactory_configure(config, "bluefield", {**SECTION, key: value})


@given(st.integers(min_value=1, max_value=MAX_VNI))
def test_every_24_bit_vni_is_accepted(number: int) -> None:
    assert vni(number) == number == vni(str(number))
    assert tunnel_name(number) == f"vxlan{number}" and len(tunnel_name(number)) <= 15


@given(st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_VNI + 1), st.booleans(),
                 st.text().filter(lambda text: not text.strip().isdigit()), st.floats()))
def test_anything_else_is_no_vni(value: object) -> None:
    with pytest.raises(UsageError):
        vni(value)


@pytest.mark.parametrize("value", ["", "1.2.3", "1.2.3.4/24", "224.0.0.1", "0.0.0.0", "::", "-1.2.3.4",
                                   "1.2.3.4 --x", "fe80::1%eth0", "1.2.3.4,5.6.7.8", 3232235777])
def test_tunnel_endpoints_are_plain_unicast_addresses(value: object) -> None:
    with pytest.raises(UsageError):
        ip_address(value)


def test_a_tampered_journal_entry_is_refused_before_any_argv() -> None:
    segment = VxlanSegment(5001, "192.0.2.10", None, (4000, 4094))
    good = bluefield.vxlan_action("eth12", "br-llm", segment, 42)
    assert _decode(good)[2] == segment
    for key, bad in (("vni", 0), ("vni", MAX_VNI + 1), ("remote_ip", "192.0.2.10 -- del-br br-llm"),
                     ("bridge", "br-llm -- x"), ("local_tags", [0, 5]), ("vm", -1), ("mtu", 10**6)):
        value = json.loads(good.value)
        value[key] = bad
        with pytest.raises((UsageError, ConfigError)):
            _decode(Action(good.kind, good.target, json.dumps(value), None, good.reason))
    with pytest.raises(UsageError):
        _decode(Action(good.kind, "eth12 --", good.value, None, good.reason))


def row(name: str, tag: int | None = None, trunks: tuple[int, ...] = (), **ids: str) -> PortRow:
    return PortRow(name, tag, frozenset(trunks), {key.replace("_", "-"): value for key, value in ids.items()})


SEGMENT = VxlanSegment(5001, "192.0.2.10", None, (4000, 4003))


def test_a_new_segment_takes_the_lowest_tag_nobody_uses_or_trunks() -> None:
    ports = {p.name: p for p in (row("br-llm"), row("eth10", 4000), row("p0", trunks=(1000, 4001)),
                                 row("vxlan5002", 4002, aifactory_vxlan="5002"))}
    assert segment_tag(ports, "br-llm", SEGMENT) == (4003, False)  # br-llm (internal, trunks all) aside


def test_an_existing_segment_keeps_its_tag() -> None:
    ports = {p.name: p for p in (row("br-llm"), row("vxlan5001", 4002, aifactory_vxlan="5001"))}
    assert segment_tag(ports, "br-llm", SEGMENT) == (4002, True)
    with pytest.raises(HostError, match="not the tunnel of VXLAN 5001"):
        segment_tag({"vxlan5001": row("vxlan5001", 4002)}, "br-llm", SEGMENT)


def test_an_uplink_trunking_every_vlan_leaves_no_safe_tag() -> None:
    ports = {p.name: p for p in (row("br-llm"), row("p0"))}
    with pytest.raises(HostError, match="port p0 trunks every VLAN"):
        segment_tag(ports, "br-llm", SEGMENT)
    full = {f"eth{t}": row(f"eth{t}", t) for t in range(4000, 4004)}
    with pytest.raises(HostError, match="no free VXLAN local tag in 4000-4003 on br-llm$"):
        segment_tag(full, "br-llm", SEGMENT)


def test_parse_ports_reads_the_ovsdb_json_shapes() -> None:
    """The shapes ``ovs-vsctl --format=json`` prints for optional and set columns (an empty set is
    ``["set", []]``, one value is the bare atom, a map is ``["map", [[k, v]...]]``); the same parser
    runs against a real ``ovs-vsctl`` in ``test_bluefield_ovs``."""
    text = json.dumps({"headings": ["name", "tag", "trunks", "external_ids"], "data": [
        ["br-llm", ["set", []], ["set", []], ["map", []]],
        ["p0", ["set", []], ["set", [1000, 1001]], ["map", []]],
        ["eth12", 4000, ["set", []], ["map", [["aifactory-vm", "42"], ["aifactory-vni", "5001"]]]],
    ]})
    rows = parse_ports(text)
    assert rows["eth12"] == row("eth12", 4000, aifactory_vm="42", aifactory_vni="5001")
    assert rows["p0"].trunks == {1000, 1001} and rows["br-llm"].tag is None
    with pytest.raises(HostError, match="unexpected output"):
        parse_ports("{}")


def test_ovs_vsctl_goes_through_sudo_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenNebula's drivers run as oneadmin; its sudoers grants oneadmin ovs-vsctl (ONE_OVS)."""
    import subprocess

    from aifactory_plugins.bluefield import ovs

    seen: list[list[str]] = []

    def runner(argv: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(ovs, "_runner", runner)
    monkeypatch.setattr(ovs.os, "geteuid", lambda: 1000)
    ovs.run_vsctl(["ovs-vsctl", "--timeout=10", "list-br"])
    ovs.run_vsctl(["sudo", "-n", "ovs-vsctl", "list-br"])
    monkeypatch.setattr(ovs.os, "geteuid", lambda: 0)
    ovs.run_vsctl(["ovs-vsctl", "list-br"])
    assert seen == [["sudo", "-n", "ovs-vsctl", "--timeout=10", "list-br"], ["sudo", "-n", "ovs-vsctl", "list-br"],
                    ["ovs-vsctl", "list-br"]]
