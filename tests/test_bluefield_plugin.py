"""BlueField-3 / ConnectX-7 switchdev and InfiniBand code paths against the reconstructed sysfs
shapes in ``fixtures/nics/cx7.py`` (provenance in ``fixtures/nics/README.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aifactory_plugins import bluefield, infiniband, sriov
from fixtures.nics import cx7

from aifactory_core.config import parse_config
from aifactory_core.errors import ConfigError, HostError, PolicyRefused, UsageError
from aifactory_core.host.devlink import representor_of, representors
from aifactory_core.host.inventory import HostInventory
from aifactory_core.host.pcibind import RecordingWriter
from aifactory_core.lifecycle.executor import plan_writes
from aifactory_core.one.vm import PciRequest
from aifactory_core.vnm.grant import TenantNetworkGrant

GRANT = TenantNetworkGrant("llm", vlans=((1000, 1009),), pkeys=((0x10, 0x1F),), full_member_pkeys=((0x10, 0x10),))


class Request:
    vm_id = 42


def nic(address: str, **attributes: str) -> PciRequest:
    values: dict[str, Any] = {name: None for name in PciRequest.__dataclass_fields__}
    values.update(type="NIC", address=address, mac="02:00:c0:a8:c9:0a", vlan_id=1001, nic_id=1, network_id=7,
                  attributes=attributes)
    return PciRequest(**values)


def test_representors_by_switch_id_and_port_name(tmp_path: Path) -> None:
    host = cx7.build(tmp_path)
    found = representors(host, "ens1f0np0")
    assert {vf: rep.netdev for vf, rep in found.items()} == {0: "eth10", 1: "eth11", 2: "eth12", 3: "eth13"}
    assert representor_of(host, "ens1f0np0", 2).switch_id == cx7.SWITCH_ID  # not eth99 (another switch)


def test_bluefield_refuses_a_vf_whose_only_pf0vf0_port_is_on_another_switch(tmp_path: Path) -> None:
    """VF 0's own representor (eth10) gone: eth99, ``pf0vf0`` on another NIC's switch, is not taken."""
    host = cx7.build(tmp_path)
    (tmp_path / "sys/class/net/eth10/phys_port_name").unlink()
    inventory = HostInventory(host)
    config = parse_config({})
    with pytest.raises(HostError, match="no representor for VF 0 of ens1f0np0"):
        bluefield.aifactory_network_setup(inventory, Request(), nic("0000:18:00.2"), config, GRANT)
    actions = list(bluefield.aifactory_network_setup(inventory, Request(), nic("0000:18:00.3"), config, GRANT) or [])
    assert actions[1].target == "eth11"


def test_bluefield_plans_vf_mac_and_an_ovs_access_port(tmp_path: Path) -> None:
    host = cx7.build(tmp_path)
    config = parse_config({"plugin": {"bluefield": {"bridge": "br-llm", "ovs_vsctl": ["ovs-vsctl"]}}})
    inventory = HostInventory(host)
    assert sriov.aifactory_network_setup(inventory, Request(), nic("0000:18:00.4"), GRANT) is None
    actions = list(bluefield.aifactory_network_setup(inventory, Request(), nic("0000:18:00.4"), config, GRANT) or [])
    assert [a.kind for a in actions] == ["vf_config", "ovs_port"]
    settings = json.loads(actions[0].value)["settings"]
    assert (actions[0].target, settings["mac"], settings["vlan"]) == ("ens1f0np0/2", "02:00:c0:a8:c9:0a", 0)
    assert actions[1].target == "eth12" and json.loads(actions[1].value)["tag"] == 1001
    writes = plan_writes(host, actions)
    assert [w.path for w in writes] == ["netlink:ens1f0np0/2", "ovs:br-llm/eth12"]


def test_bluefield_refuses_vlan_outside_grant_and_vlan_in_the_vxlan_tag_range(tmp_path: Path) -> None:
    host = cx7.build(tmp_path)
    config = parse_config({})
    inventory = HostInventory(host)
    outside = nic("0000:18:00.2")
    with pytest.raises(PolicyRefused, match="VLAN 2000"):
        bluefield.aifactory_network_setup(inventory, Request(), PciRequest(**{**outside.__dict__, "vlan_id": 2000}),
                                          config, GRANT)
    reserved = parse_config({"plugin": {"bluefield": {"vxlan_local_tags": "1000-1001"}}})
    with pytest.raises(UsageError, match="VLAN 1001 is reserved for VXLAN"):
        bluefield.aifactory_network_setup(inventory, Request(), outside, reserved, GRANT)


def test_legacy_mode_vf_goes_to_sriov_plugin(tmp_path: Path) -> None:
    host = cx7.build(tmp_path, mode="legacy")
    inventory = HostInventory(host)
    assert bluefield.aifactory_network_setup(inventory, Request(), nic("0000:18:00.2"), parse_config({}), GRANT) is None
    actions = list(sriov.aifactory_network_setup(inventory, Request(), nic("0000:18:00.2", VF_MAX_TX_RATE="25000",
                                                                               VF_QOS="5"), GRANT) or [])
    settings = json.loads(actions[0].value)["settings"]
    assert (settings["vlan"], settings["qos"], settings["max_tx_rate"]) == (1001, 5, 25000)
    with pytest.raises(PolicyRefused, match="trusted"):
        sriov.aifactory_network_setup(inventory, Request(), nic("0000:18:00.2", TRUST="YES"), GRANT)


def test_infiniband_vf_gets_guids_and_pkey_membership(tmp_path: Path) -> None:
    host = cx7.build(tmp_path, infiniband=True)
    config = parse_config({"plugin": {"infiniband": {"guid_prefix": "a1f0", "partitions_file": str(tmp_path / "p")}}})
    inventory = HostInventory(host)
    assert sriov.aifactory_network_setup(inventory, Request(), nic("0000:18:00.3"), GRANT) is None
    full = list(infiniband.aifactory_network_setup(inventory, Request(), nic("0000:18:00.3", IB_PKEY="0x8010"),
                                                   config, GRANT) or [])
    assert [a.kind for a in full] == ["vf_config", "ib_pkey"]
    settings = json.loads(full[0].value)["settings"]
    assert settings["vlan"] == 0 and settings["port_guid"] == "a1:f0:00:00:00:54:03:00"
    assert full[0].undo_value == "clean-ib"
    assert json.loads(full[1].value)["membership"] == "full" and full[1].target == settings["port_guid"]
    again = list(infiniband.aifactory_network_setup(inventory, Request(), nic("0000:18:00.3", IB_PKEY="0x11"),
                                                    config, GRANT) or [])
    assert json.loads(again[1].value)["membership"] == "limited"
    assert json.loads(again[0].value)["settings"]["port_guid"] == settings["port_guid"]  # stable per VM NIC
    with pytest.raises(PolicyRefused, match="pkey 0x0020"):
        infiniband.aifactory_network_setup(inventory, Request(), nic("0000:18:00.3", IB_PKEY="0x20"), config, GRANT)
    with pytest.raises(UsageError, match="pkey"):
        infiniband.aifactory_network_setup(inventory, Request(), nic("0000:18:00.3", IB_PKEY="0x0"), config, GRANT)
    with pytest.raises(UsageError, match="without IB_PKEY"):
        infiniband.aifactory_network_setup(inventory, Request(), nic("0000:18:00.3"), config, GRANT)


def test_ib_pkey_action_joins_and_leaves_the_opensm_partition(tmp_path: Path) -> None:
    from aifactory_core.lifecycle import executor

    host = cx7.build(tmp_path, infiniband=True)
    partitions = tmp_path / "partitions.conf"
    infiniband.configure_subnet_manager({"partitions_file": str(partitions)})  # as the configure hook does
    action = infiniband.pkey_action("a1:f0:00:00:00:54:03:00", 0x10, "full", 42)
    executor.prepare(host, 42, [action], RecordingWriter())  # dry run: the SM is not touched
    assert not partitions.exists()
    executor.prepare(host, 43, [action])
    assert "0xa1f0000000540300=full" in partitions.read_text()
    executor.release(host, 43)
    assert "0xa1f0000000540300" not in partitions.read_text()
    infiniband.configure_subnet_manager({})


class RecordedDevlink:
    """Eswitch get/set replies with the values of include/uapi/linux/devlink.h."""

    def __init__(self, modes: dict[str, str]) -> None:
        self.modes = modes
        self.sets: list[str] = []

    def eswitch_mode(self, bus: str, device: str) -> str:
        return self.modes[f"{bus}/{device}"]

    def set_eswitch_mode(self, bus: str, device: str, mode: str) -> None:
        self.sets.append(f"{bus}/{device}={mode}")
        self.modes[f"{bus}/{device}"] = mode


def test_switchdev_when_configured() -> None:
    devlink = RecordedDevlink({"pci/0000:18:00.0": "legacy", "pci/0000:18:00.1": "switchdev"})
    section = {"switchdev": ["pci/0000:18:00.0", "pci/0000:18:00.1"]}
    assert bluefield.apply_eswitch_modes(section, devlink) == ["pci/0000:18:00.0"]
    assert bluefield.apply_eswitch_modes(section, devlink) == []
    with pytest.raises(ConfigError, match="invalid PCI address"):
        bluefield.switchdev_handles({"switchdev": ["pci/../../x"]})


def test_eswitch_command_refuses_a_config_without_or_with_bad_handles(tmp_path: Path) -> None:
    from hostroots import run_cli

    config = tmp_path / "aifactory.conf"
    config.write_text("[plugin.bluefield]\n")
    empty = run_cli("--config", str(config), "eswitch")
    assert empty.returncode == 2 and "switchdev names no device" in empty.stderr and empty.stderr.count("\n") == 1
    config.write_text('[plugin.bluefield]\nswitchdev = ["pci/../../x"]\n')
    bad = run_cli("--config", str(config), "eswitch", "--apply")
    assert bad.returncode == 2 and "invalid" in bad.stderr and bad.stderr.count("\n") == 1
