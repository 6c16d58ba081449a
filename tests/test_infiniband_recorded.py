"""InfiniBand code paths against host trees and netlink state built from public recordings of real
ConnectX-6/7 and mlx5 IPoIB machines (``fixtures/nics/recorded/``, each file headed by its source).

No InfiniBand hardware exists here: the sysfs trees are written from recorded ``ibstatus`` /
``ibv_devinfo`` output (those tools print the sysfs files verbatim), and the netlink side is the
pyroute2-encoding double in its IPoIB profile, itself checked line by line against the recorded
``ip link`` output of an mlx5 IPoIB PF.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from aifactory_plugins import infiniband, sriov
from aifactory_plugins.infiniband.partitions import port_guid
from fixtures.nics import recorded_trees as rec
from fixtures.nics.netlink_double import NetlinkDouble

from aifactory_core.config import parse_config
from aifactory_core.host import netlink_vf
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor
from aifactory_core.one.vm import PciRequest
from aifactory_core.probes.collect import collect
from aifactory_core.probes.sysfs import Root
from aifactory_core.vnm import vf as vf_actions
from aifactory_core.vnm.grant import TenantNetworkGrant

IPOIB = "ipoib-pf-vf-guids.txt"
GRANT = TenantNetworkGrant("hpc", pkeys=((0x10, 0x1F),), full_member_pkeys=((0x10, 0x10),))
PF, VF = "0000:03:00.0", "0000:03:00.1"


class Request:
    vm_id = 42


def nic(address: str, **attributes: str) -> PciRequest:
    values: dict[str, Any] = {name: None for name in PciRequest.__dataclass_fields__}
    values.update(type="NIC", address=address, mac="02:00:c0:a8:c9:0a", nic_id=1, network_id=7,
                  attributes=attributes)
    return PciRequest(**values)


def cx7_ib_host(root: Path) -> HostRoot:
    """The ConnectX-7 in InfiniBand mode of ``recorded/cx7-ib-sriov-state.txt``: PF device 1021, one VF
    (device 101e) at 0000:03:00.1 named ibs5v0, legacy eswitch; the PF's IPoIB netdev of type 32
    (ARPHRD_INFINIBAND, the ``link/infiniband`` of ``recorded/ipoib-pf-vf-guids.txt``) carrying that
    recording's 20-byte address. Filled in: the PF address 0000:03:00.0 and its netdev name ibs5
    (the recording names only the VF, ``ibs5v0`` = PF name + ``v0``), ifindex values, sriov_totalvfs."""
    state = "\n".join(rec.lines("cx7-ib-sriov-state.txt"))
    assert "Device ID:         1021" in state and "Device ID:       101e" in state and f"Pci Address:     {VF}" in state
    pf_dir = rec.pci_function(root, PF, "0x1021")
    rec.pci_function(root, VF, "0x101e", physfn=PF)
    rec.link(pf_dir / "virtfn0", f"../{VF}")
    rec.write(pf_dir / "sriov_numvfs", "1")
    rec.write(pf_dir / "sriov_totalvfs", "16")
    rec.netdev(root, "ibs5", 5, link_type=32, device=PF, address=rec.ipoib_pf_address(IPOIB))
    rec.netdev(root, "ibs5v0", 6, link_type=32, device=VF)
    return HostRoot(root, root / "state")


# ---- sysfs: the probe's IB port rows --------------------------------------------------------------

def test_probe_reports_recorded_cx7_and_roce_ports_as_sysfs_shows_them(tmp_path: Path) -> None:
    """Recordings: ``ibstatus-cx7-down.txt`` (NVIDIA/nccl#1935: unconnected ConnectX-7 IB ports, LID
    0xffff, ``1: DOWN`` / ``3: Disabled``, ``10 Gb/sec (4X SDR)``) and ``ibstatus-roce-active.txt``
    (NVIDIA/nccl#1866: ``4: ACTIVE`` / ``5: LinkUp`` / ``100 Gb/sec (4X EDR)`` on Ethernet). The
    PCI addresses the devices hang off are filled in (ibstatus does not print them)."""
    ports = {**rec.ibstatus_ports("ibstatus-cx7-down.txt"), **rec.ibstatus_ports("ibstatus-roce-active.txt")}
    assert len(ports) == 4
    addresses = {"mlx5_0": "0000:18:00.0", "mlx5_2": "0000:19:00.0", "mlx5_3": "0000:1a:00.0",
                 "mlx5_11": "0000:1b:00.0"}
    for (device, port), files in ports.items():
        rec.infiniband_device(tmp_path, device, addresses[device], {port: files})
    rows = {row["DEVICE_NAME"]: row for row in collect(Root(str(tmp_path), str(tmp_path / "state")),
                                                        nvml_mode="off")["ib"]}
    assert rows["mlx5_11"] == {
        "DEVICE_NAME": "mlx5_11", "PORT": "1", "BUS_ID": "0000:1b:00.0", "STATE": "DOWN", "PHYS_STATE": "Disabled",
        "RATE": "10 Gb/sec (4X SDR)", "LID": "0xffff", "LINK_LAYER": "InfiniBand", "NODE_GUID": "",
        "PORT_GID": "fe80:0000:0000:0000:58a2:e103:0022:ce5c"}
    active = rows["mlx5_0"]
    assert (active["STATE"], active["PHYS_STATE"], active["RATE"], active["LINK_LAYER"], active["LID"]) == (
        "ACTIVE", "LinkUp", "100 Gb/sec (4X EDR)", "Ethernet", "0x0")
    assert {row["STATE"] for row in rows.values()} == {"DOWN", "ACTIVE"}
    assert rows["mlx5_2"]["LINK_LAYER"] == "Ethernet" and rows["mlx5_3"]["PORT_GID"].endswith("58a2:e103:0022:f8f8")


def test_probe_reports_the_recorded_cx7_node_guid_verbatim(tmp_path: Path) -> None:
    """Recording: ``ibv_devinfo-cx7.txt`` (deepseek-ai/DeepEP#60: ConnectX-7, vendor_part_id 4129,
    fw 28.39.2048, board MT_0000000838, node_guid ``58a2:e103:002a:09b8``, the 4x4-digit form sysfs
    uses). The port files come from the same machine's down port: ``ibv_devinfo`` prints state
    ``PORT_DOWN (1)`` and port_lid 65535, which sysfs shows as ``1: DOWN`` and ``0xffff``."""
    device = rec.ibv_devinfo("ibv_devinfo-cx7.txt")["mlx5_0"]
    assert device["vendor_part_id"] == str(0x1021)
    rec.infiniband_device(tmp_path, "mlx5_0", PF, {1: {"state": "1: DOWN", "lid": f"{65535:#x}",
                                                       "link_layer": "InfiniBand"}},
                          {name: device[name] for name in rec.DEVINFO_FILES})
    (row,) = collect(Root(str(tmp_path), str(tmp_path / "state")), nvml_mode="off")["ib"]
    assert (row["NODE_GUID"], row["STATE"], row["LID"], row["BUS_ID"]) == ("58a2:e103:002a:09b8", "DOWN", "0xffff", PF)
    # the subnet-manager form of a recorded GUID is the 0x form ibstat prints (ibstat-cx7-ndr-active.txt)
    assert port_guid(device["node_guid"]) == "0x58a2e103002a09b8"
    assert "Port GUID: " + port_guid("9c63:c003:0055:48ae") in "\n".join(rec.lines("ibstat-cx7-ndr-active.txt"))


def test_cx7_fixture_names_its_ipoib_pf_as_a_dgx_h100_does(tmp_path: Path) -> None:
    """Recording: ``dgx-h100-network-modules.txt`` (NVIDIA DGX H100 User Guide, Table 6: the ConnectX-7
    IPoIB netdevs are ``ibp<PCI bus in decimal>s0``, ``ibp24s0`` <-> ``mlx5_0``). The reconstructed
    ``cx7.py`` tree puts its IB PF at 0000:18:00.0; its netdev must carry the name a DGX gives it."""
    from fixtures.nics import cx7

    names = dict(line.split()[-2:] for line in rec.lines("dgx-h100-network-modules.txt"))
    assert len(names) == 8 and all(name.startswith("ibp") and name.endswith("s0") for name in names)
    host = cx7.build(tmp_path, infiniband=True)
    pf_netdevs = sorted(p.name for p in host.path(f"/sys/bus/pci/devices/{cx7.PF}/net").iterdir())
    assert pf_netdevs == [f"ibp{int(cx7.PF.split(':')[1], 16)}s0"] == ["ibp24s0"]
    assert names["ibp24s0"] == "mlx5_0"


# ---- netlink: the double against the recording --------------------------------------------------

def test_ipoib_double_reads_back_what_the_recorded_ip_link_showed() -> None:
    """Recording: ``ipoib-pf-vf-guids.txt`` (Linux commit 4bbd4923d1f5, mlx5 IPoIB PF ib0, VF 0):
    before any GUID is set the VF shows the PF's own address, spoof checking off, trust off,
    link-state auto and zero GUIDs; ``ip link set ib0 vf 0 node_guid/port_guid`` then reads back
    verbatim. The double is driven with the recording's own GUID strings through pyroute2."""
    recorded = rec.ip_link_vfs(IPOIB)
    address = rec.ipoib_pf_address(IPOIB)
    double = NetlinkDouble.ipoib({5: 1}, address)
    before = recorded["before"][0]
    have = netlink_vf.read_vfs(double, 5)[0]
    assert before.address == address and have.mac == ":".join(address.split(":")[:6])
    assert (have.spoofchk, have.trust, have.link_state) == (before.spoofchk, before.trust, before.link_state)
    assert (have.node_guid, have.port_guid) == (before.node_guid, before.port_guid) == (netlink_vf.ZERO_GUID,) * 2
    after = recorded["after"][0]
    double.link("set", index=5, vf={"vf": 0, "ib_node_guid": after.node_guid})
    double.link("set", index=5, vf={"vf": 0, "ib_port_guid": after.port_guid})
    have = netlink_vf.read_vfs(double, 5)[0]
    assert (have.node_guid, have.port_guid) == ("11:00:af:21:cb:05:11:00", "22:11:af:21:cb:05:11:00")


def test_guid_on_the_wire_is_the_u64_iproute2_sends() -> None:
    """Recording: ``ipoib-pf-vf-guids.txt`` (``ip link set ib0 vf 0 node_guid 11:00:af:21:cb:05:11:00``).
    iproute2's ``get_guid`` turns the text into the u64 0x1100af21cb051100 and sends
    ``struct ifla_vf_guid {__u32 vf; __u64 guid}`` in host order; the request our code builds must
    carry the same bytes, or a VF would get a byte-reversed GUID the SM does not know."""
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.requests.link import LinkIPRouteFilter

    after = rec.ip_link_vfs(IPOIB)["after"][0]
    assert after.node_guid is not None
    spec = netlink_vf.request(0, netlink_vf.settings(node_guid=after.node_guid, port_guid=after.port_guid))
    message = ifinfmsg()
    message["index"] = 5
    message["attrs"] = [("IFLA_VFINFO_LIST", LinkIPRouteFilter("set").get_vf(spec))]
    message.encode()
    wire = bytes(message.data)
    expected = struct.pack("=IxxxxQ", 0, int(after.node_guid.replace(":", ""), 16))
    assert expected in wire


def test_ipoib_double_refuses_what_the_recorded_kernel_refused() -> None:
    """Recording: ``ib-vf-set-unsupported.txt`` (k8snetworkplumbingwg/sriov-cni#208:
    ``ip link set ib0 vf 2 vlan 0`` -> ``RTNETLINK answers: Operation not supported``;
    sriov-network-operator#274: setting the admin MAC of an IB VF -> ``operation not supported``)."""
    from pyroute2.netlink.exceptions import NetlinkError

    double = NetlinkDouble.ipoib({5: 3}, rec.ipoib_pf_address(IPOIB))
    for spec in ({"vf": 2, "vlan": {"vlan": 0, "qos": 0}}, {"vf": 2, "mac": "02:00:c0:a8:c9:0a"}):
        with pytest.raises(NetlinkError) as refused:
            double.link("set", index=5, vf=spec)
        assert refused.value.code == 95  # EOPNOTSUPP
    double.link("set", index=5, vf={"vf": 2, "link_state": 1})
    assert netlink_vf.read_vfs(double, 5)[2].link_state == "enable"


# ---- the infiniband plugin on the recorded ConnectX-7 ---------------------------------------------

def test_infiniband_plugin_claims_the_recorded_cx7_ib_vf(tmp_path: Path) -> None:
    """Recordings: ``cx7-ib-sriov-state.txt`` (sriov-network-operator#1046: ConnectX-7 1021 in IB mode,
    VF 101e at 0000:03:00.1) and ``ipoib-pf-vf-guids.txt`` (the PF's ``link/infiniband`` type): the
    sriov plugin leaves the VF alone, the infiniband plugin plans GUIDs in the ``ip link`` form
    (8 colon-separated bytes, as in the recording) and the pkey membership."""
    host = cx7_ib_host(tmp_path)
    config = parse_config({"plugin": {"infiniband": {"guid_prefix": "a1f0", "partitions_file": str(tmp_path / "p")}}})
    inventory = HostInventory(host)
    assert sriov.aifactory_network_setup(inventory, Request(), nic(VF), GRANT) is None
    actions = list(infiniband.aifactory_network_setup(inventory, Request(), nic(VF, IB_PKEY="0x8010"), config,
                                                      GRANT) or [])
    assert [a.kind for a in actions] == ["vf_config", "ib_pkey"]
    assert actions[0].target == "ibs5/0" and actions[0].undo_value == "clean-ib"
    settings = json.loads(actions[0].value)["settings"]
    recorded_form = rec.ip_link_vfs(IPOIB)["after"][0].node_guid
    assert recorded_form is not None
    for key in ("node_guid", "port_guid"):
        assert [len(part) for part in settings[key].split(":")] == [len(part) for part in recorded_form.split(":")]
    assert actions[1].target == settings["port_guid"]


def test_infiniband_vf_config_applies_on_the_recorded_ipoib_kernel(tmp_path: Path, monkeypatch: Any) -> None:
    """Recordings: ``ib-vf-set-unsupported.txt`` (what the kernel refuses on an IB VF) and
    ``ipoib-pf-vf-guids.txt`` (what it reads back). The plugin's vf_config action is run through the
    executor against the IPoIB double: the GUIDs must be set and read back, and release must scrub
    them to zero, the way ``ip link`` showed on the real PF."""
    host = cx7_ib_host(tmp_path)
    config = parse_config({"plugin": {"infiniband": {"guid_prefix": "a1f0", "partitions_file": str(tmp_path / "p")}}})
    actions = list(infiniband.aifactory_network_setup(HostInventory(host), Request(), nic(VF, IB_PKEY="0x10"), config,
                                                      GRANT) or [])
    double = NetlinkDouble.ipoib({5: 1}, rec.ipoib_pf_address(IPOIB))
    monkeypatch.setattr(vf_actions, "_netlink", double)
    executor.prepare(host, 42, actions[:1])
    settings = json.loads(actions[0].value)["settings"]
    assert double.vfs[5][0]["ib_port_guid"] == settings["port_guid"]
    executor.release(host, 42)
    assert double.vfs[5][0]["ib_port_guid"] == netlink_vf.ZERO_GUID
