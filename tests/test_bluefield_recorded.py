"""Switchdev (ConnectX / BlueField) code paths against host trees built from public recordings of
real machines (``fixtures/nics/recorded/``, each file headed by its source).

The representor trees take their netdev names and ``phys_port_name`` values from recorded
``devlink port`` lines (``phys_port_name`` is what the kernel builds from the port attributes those
lines print) and recorded BlueField-2 netdev listings; the eswitch mode word comes from a recorded
``devlink dev eswitch show``. What no recording shows (the ``phys_switch_id`` value, VF PCI
addresses) is filled in and named in each builder's docstring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aifactory_plugins import bluefield
from fixtures.nics import recorded_trees as rec

from aifactory_core.config import parse_config
from aifactory_core.host.devlink import ESWITCH_MODES, representors
from aifactory_core.host.inventory import HostInventory
from aifactory_core.hostroot import HostRoot
from aifactory_core.one.vm import PciRequest
from aifactory_core.vnm.grant import TenantNetworkGrant

GRANT = TenantNetworkGrant("llm", vlans=((1000, 1009),))
SWITCH_ID = "a1b2c3fffe040506"  # filled in: no recording shows a phys_switch_id value; only equality matters


class Request:
    vm_id = 42


def nic(address: str) -> PciRequest:
    values: dict[str, Any] = {name: None for name in PciRequest.__dataclass_fields__}
    values.update(type="NIC", address=address, mac="02:00:c0:a8:c9:0a", vlan_id=1001, nic_id=1, network_id=7,
                  attributes={})
    return PciRequest(**values)


def host_from_devlink(root: Path, recording: str,
                      vf_addresses: dict[int, str]) -> tuple[HostRoot, list[rec.DevlinkPort]]:
    """Every port of a recorded ``devlink port`` listing as a netdev with the recorded name and the
    ``phys_port_name`` the kernel gives it, all on one switch; the uplink netdev under its recorded PCI
    function, with ``vf_addresses`` (filled in) as its VFs."""
    ports = rec.devlink_ports(recording)
    uplink = next(port for port in ports if port.flavour == "physical")
    pf_dir = rec.pci_function(root, uplink.pci_address, "0x101d")
    rec.write(pf_dir / "sriov_numvfs", str(len(vf_addresses)))
    for vf, address in vf_addresses.items():
        rec.pci_function(root, address, "0x101e", physfn=uplink.pci_address)
        rec.link(pf_dir / f"virtfn{vf}", f"../{address}")
    for index, port in enumerate(ports):
        rec.netdev(root, port.netdev, 10 + index, link_type=1, port_name=port.phys_port_name, switch_id=SWITCH_ID,
                   device=uplink.pci_address if port is uplink else None)
    return HostRoot(root, root / "state"), ports


def test_recorded_cx6_switchdev_representor_is_found_and_plugged(tmp_path: Path) -> None:
    """Recording: ``devlink-port-cx6.txt`` (ovn-org/ovn#169, ConnectX-6 in switchdev: uplink enp7s0f0
    ``flavour physical port 0``, representor enp7s0f0_0 ``flavour pcivf controller 0 pfnum 0 vfnum 0
    external false``). The representor keeps a legacy netdev name, so it is found by
    ``phys_port_name`` ``pf0vf0`` and switch id, not by name. VF 0's PCI address is filled in."""
    host, ports = host_from_devlink(tmp_path, "devlink-port-cx6.txt", {0: "0000:07:00.2"})
    assert [port.phys_port_name for port in ports] == ["p0", "pf0vf0"]
    found = representors(host, "enp7s0f0")
    assert {vf: rep.netdev for vf, rep in found.items()} == {0: "enp7s0f0_0"}
    config = parse_config({"plugin": {"bluefield": {"bridge": "br-llm", "ovs_vsctl": ["ovs-vsctl"]}}})
    actions = list(bluefield.aifactory_network_setup(HostInventory(host), Request(), nic("0000:07:00.2"), config,
                                                     GRANT) or [])
    assert [a.kind for a in actions] == ["vf_config", "ovs_port"]
    assert actions[0].target == "enp7s0f0/0" and json.loads(actions[0].value)["settings"]["vlan"] == 0
    assert actions[1].target == "enp7s0f0_0" and json.loads(actions[1].value)["tag"] == 1001


def test_recorded_eswitch_mode_word_is_the_one_the_plugin_compares() -> None:
    """Recording: ``devlink-eswitch-show.txt`` (sriov-network-device-plugin#395, a Mellanox PF:
    ``pci/0000:03:00.0: mode switchdev inline-mode none encap enable``). The recorded handle parses as a
    ``[plugin.bluefield] switchdev`` entry and a device reporting the recorded mode is left alone."""
    modes = rec.eswitch_modes("devlink-eswitch-show.txt")
    assert modes == {"pci/0000:03:00.0": "switchdev"} and set(modes.values()) <= set(ESWITCH_MODES)

    class RecordedDevlink:
        def __init__(self, mode: str) -> None:
            self.mode, self.sets = mode, []

        def eswitch_mode(self, bus: str, device: str) -> str:
            return self.mode

        def set_eswitch_mode(self, bus: str, device: str, mode: str) -> None:
            self.sets.append((bus, device, mode))

    section = {"switchdev": list(modes)}
    assert bluefield.apply_eswitch_modes(section, RecordedDevlink(modes["pci/0000:03:00.0"])) == []
    legacy = RecordedDevlink("legacy")
    assert bluefield.apply_eswitch_modes(section, legacy) == ["pci/0000:03:00.0"]
    assert legacy.sets == [("pci", "0000:03:00.0", "switchdev")]


def test_recorded_bluefield2_host_pf_and_sf_representors_are_not_vf_representors(tmp_path: Path) -> None:
    """Recording: ``bluefield2-representors.txt`` (MrBr-github/lshca#62, BlueField-2 ARM side: uplink p0
    on 0000:03:00.0, host-PF representor pf0hpf and SF representor en3f0pf0sf0, both mlx5e_rep).
    Their ``phys_port_name`` values (``p0``, ``pf0``, ``pf0sf0``) follow the kernel's devlink naming for
    physical, PCI PF and PCI SF ports; none of them may be taken for a VF's representor."""
    names = [line.strip("- ") for line in rec.lines("bluefield2-representors.txt") if line.startswith("-----")]
    assert names == ["p0", "pf0hpf", "en3f0pf0sf0", "enp3s0f0s0"]
    rec.pci_function(tmp_path, "0000:03:00.0", "0xa2d6")
    rec.netdev(tmp_path, "p0", 5, link_type=1, device="0000:03:00.0", port_name="p0", switch_id=SWITCH_ID)
    rec.netdev(tmp_path, "pf0hpf", 6, link_type=1, port_name="pf0", switch_id=SWITCH_ID)
    rec.netdev(tmp_path, "en3f0pf0sf0", 7, link_type=1, port_name="pf0sf0", switch_id=SWITCH_ID)
    rec.netdev(tmp_path, "enp3s0f0s0", 8, link_type=1)  # the SF's own netdev: not on the switch
    assert representors(HostRoot(tmp_path, tmp_path / "state"), "p0") == {}


def test_external_controller_vf_representor_is_not_taken_for_a_local_vf(tmp_path: Path) -> None:
    """Recordings: ``devlink-port-external-controller.txt`` (Linux commit 66b17082d10a: representor
    ens2f0c1pf0vf1, ``flavour pcivf controller 1 pfnum 0 vfnum 1 external true`` -> phys_port_name
    ``c1pf0vf1``) next to a local VF port shaped like ``devlink-port-cx6.txt`` (``controller 0 ...
    external false`` -> ``pf0vf1``). The local VF 1 must map to the local representor."""
    external = next(p for p in rec.devlink_ports("devlink-port-external-controller.txt") if p.flavour == "pcivf")
    assert external.phys_port_name == "c1pf0vf1"
    local = next(p for p in rec.devlink_ports("devlink-port-cx6.txt") if p.flavour == "pcivf")
    local_vf1 = rec.DevlinkPort(local.handle, "enp7s0f0_1", "pcivf", {**local.attributes, "vfnum": "1"})
    assert local_vf1.phys_port_name == "pf0vf1"
    rec.pci_function(tmp_path, "0000:07:00.0", "0x101d")
    rec.netdev(tmp_path, "enp7s0f0", 5, link_type=1, device="0000:07:00.0", port_name="p0", switch_id=SWITCH_ID)
    for index, port in enumerate((local_vf1, external)):
        rec.netdev(tmp_path, port.netdev, 20 + index, link_type=1, port_name=port.phys_port_name, switch_id=SWITCH_ID)
    found = representors(HostRoot(tmp_path, tmp_path / "state"), "enp7s0f0")
    assert found[1].netdev == "enp7s0f0_1"


def test_probe_reports_the_recorded_switchdev_uplink_without_mlnx_ofed(tmp_path: Path) -> None:
    """Recording: ``devlink-port-cx6.txt`` (ovn-org/ovn#169). An upstream kernel has no
    ``compat/devlink/mode`` (MLNX_OFED only): the probe's ``AIF_SRIOV`` row reads the mode the way
    the network plugins route VFs — VF representors on the uplink's switch mean switchdev — and the
    same PF whose VFs have no representors reads legacy, with or without its own switch id.
    ``sriov_totalvfs`` and ``sriov_numvfs`` are filled in."""
    from aifactory_core.probes.collect import collect
    from aifactory_core.probes.sysfs import Root

    host, ports = host_from_devlink(tmp_path / "root", "devlink-port-cx6.txt", {0: "0000:07:00.2"})
    uplink = next(port for port in ports if port.flavour == "physical")
    rec.write(host.pci_devices / uplink.pci_address / "sriov_totalvfs", "8")

    def mode() -> str:
        rows = collect(Root(str(host.root), str(tmp_path / "cache")), None)["sriov"]
        return str(next(row for row in rows if row["BUS_ID"] == uplink.pci_address)["ESWITCH_MODE"])

    assert mode() == "SWITCHDEV"
    # Legacy mode on an upstream kernel: the uplink keeps its switch id (mlx5 en/devlink.c gives the
    # PF's physical port one in both modes) but the VFs have no representors.
    rec.write(host.pci_devices / uplink.pci_address / "sriov_numvfs", "1")
    for port in ports:
        if port.flavour == "pcivf":
            (host.path(f"/sys/class/net/{port.netdev}") / "phys_switch_id").unlink()
    assert mode() == "LEGACY"
    (host.path(f"/sys/class/net/{uplink.netdev}") / "phys_switch_id").unlink()
    assert mode() == "LEGACY"
