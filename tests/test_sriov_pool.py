"""PF discovery and VF pool sizing on a generated sysfs tree (the layout of
``Documentation/ABI/testing/sysfs-bus-pci``: sriov_totalvfs, sriov_numvfs,
sriov_drivers_autoprobe, virtfnN -> VF, VF physfn -> PF)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aifactory_core.errors import HostError, UsageError
from aifactory_core.host import sriov
from aifactory_core.host.pcibind import RecordingWriter
from aifactory_core.hostroot import HostRoot

PF = "0000:18:00.0"


def make_pf(root: Path, *, total: int = 8, num: int = 4, netdev: str = "ens1f0np0", ifindex: int = 5,
            link_type: int = 1, vf_driver: str | None = "mlx5_core") -> HostRoot:
    devices = root / "sys/bus/pci/devices"
    drivers = root / "sys/bus/pci/drivers"
    pf = devices / PF
    (pf / "net" / netdev).mkdir(parents=True)
    (drivers / "mlx5_core").mkdir(parents=True, exist_ok=True)
    (drivers / "vfio-pci").mkdir(parents=True, exist_ok=True)
    os.symlink("../../../bus/pci/drivers/mlx5_core", pf / "driver")
    (pf / "sriov_totalvfs").write_text(f"{total}\n")
    (pf / "sriov_numvfs").write_text(f"{num}\n")
    (pf / "sriov_drivers_autoprobe").write_text("1\n")
    (pf / "numa_node").write_text("1\n")
    for vf in range(num):
        address = f"0000:18:00.{vf + 2}"
        (devices / address).mkdir(parents=True)
        os.symlink(f"../{address}", pf / f"virtfn{vf}")
        os.symlink(f"../{PF}", devices / address / "physfn")
        (devices / address / "numa_node").write_text("1\n")
        if vf_driver:
            os.symlink(f"../../../bus/pci/drivers/{vf_driver}", devices / address / "driver")
    net = root / "sys/class/net" / netdev
    net.mkdir(parents=True)
    (net / "ifindex").write_text(f"{ifindex}\n")
    (net / "type").write_text(f"{link_type}\n")
    (net / "operstate").write_text("up\n")
    os.symlink(f"../../../bus/pci/devices/{PF}", net / "device")
    (pf / "net" / netdev / "type").write_text(f"{link_type}\n")
    return HostRoot(root, root / "state")


def test_discovery_by_netdev_and_address(tmp_path: Path) -> None:
    host = make_pf(tmp_path)
    by_name = sriov.pf_by_netdev(host, "ens1f0np0")
    assert (by_name.address, by_name.driver, by_name.total_vfs, by_name.num_vfs) == (PF, "mlx5_core", 8, 4)
    assert by_name.operstate == "up" and by_name.autoprobe is True
    assert by_name.vf_address(3) == "0000:18:00.5"
    assert [pf.address for pf in sriov.discover_pfs(host)] == [PF]
    assert sriov.pf_by_address(host, "18:00.0").netdev == "ens1f0np0"


def test_pool_resize_goes_through_zero_and_sets_autoprobe(tmp_path: Path) -> None:
    host = make_pf(tmp_path)
    pf = sriov.pf_by_netdev(host, "ens1f0np0")
    writer = RecordingWriter()
    sriov.set_pool_size(host, pf, 0, writer)
    sriov.set_pool_size(host, sriov.PhysicalFunction(**{**pf.__dict__, "num_vfs": 0}), 8, writer, autoprobe=False)
    assert [(Path(w.path).name, w.value) for w in writer.writes] == [
        ("sriov_numvfs", "0"), ("sriov_drivers_autoprobe", "0"), ("sriov_numvfs", "8")]


def test_refuses_to_shrink_a_pool_with_a_vf_on_vfio(tmp_path: Path) -> None:
    host = make_pf(tmp_path, vf_driver=None)
    os.symlink("../../../bus/pci/drivers/vfio-pci", tmp_path / "sys/bus/pci/devices/0000:18:00.4/driver")
    pf = sriov.pf_by_netdev(host, "ens1f0np0")
    writer = RecordingWriter()
    with pytest.raises(UsageError, match=r"VF\(s\) 2 in use"):
        sriov.set_pool_size(host, pf, 2, writer)
    assert writer.writes == []


def test_refuses_a_count_beyond_total_and_a_bad_ifname(tmp_path: Path) -> None:
    host = make_pf(tmp_path)
    pf = sriov.pf_by_netdev(host, "ens1f0np0")
    with pytest.raises(UsageError, match="outside 0..8"):
        sriov.set_pool_size(host, pf, 9, RecordingWriter())
    with pytest.raises(UsageError, match="invalid interface name"):
        sriov.pf_by_netdev(host, "../ens1f0np0")
    with pytest.raises(UsageError, match="invalid interface name"):
        sriov.pf_by_netdev(host, "ens1/f0")


def test_a_function_without_sriov_is_not_a_pf(tmp_path: Path) -> None:
    host = make_pf(tmp_path)
    with pytest.raises(HostError, match="not SR-IOV capable"):
        sriov.pf_by_address(host, "0000:18:00.2")


def test_locate_vf_reads_pf_index_and_numa(tmp_path: Path) -> None:
    from aifactory_core.vnm.plan import locate_vf

    host = make_pf(tmp_path)
    where = locate_vf(host, "0000:18:00.4")
    assert (where.pf_netdev, where.vf, where.numa_node, where.infiniband) == ("ens1f0np0", 2, 1, False)
    with pytest.raises(HostError, match="not a VF"):
        locate_vf(host, PF)


@pytest.mark.parametrize("vn_mad", ["vxlan", "ovswitch_vxlan"])
def test_a_vxlan_network_on_a_legacy_vf_is_refused(tmp_path: Path, vn_mad: str) -> None:
    from types import MappingProxyType

    from aifactory_plugins import sriov as sriov_plugin

    from aifactory_core.errors import PolicyRefused
    from aifactory_core.host.inventory import HostInventory
    from aifactory_core.one.vm import PciRequest
    from aifactory_core.vnm.grant import TenantNetworkGrant

    host = make_pf(tmp_path)
    nic = PciRequest(pci_id=1, type="NIC", address="0000:18:00.2", short_address=None, vendor=None, device=None,
                     device_class=None, numa_node=None, nic_id=1, network=None, network_id=7, vlan_id=5001,
                     mac="02:00:c0:a8:c9:0a", phydev=None, vn_mad=vn_mad, vm_address=None, vm_bus=None,
                     vm_bus_index=None, uuid=None, profile=None, mdev_mode=None, attributes=MappingProxyType({}))

    class Request:
        vm_id = 42

    with pytest.raises(PolicyRefused, match=f"VXLAN network \\({vn_mad}\\) on VF 0 of ens1f0np0, a legacy-mode PF"):
        sriov_plugin.aifactory_network_setup(HostInventory(host), Request(), nic,
                                             TenantNetworkGrant("llm", vnis=((5000, 5099),)))


@pytest.mark.parametrize(("written", "word"), [("1", "on"), ("0", "off"), (None, "unknown")])
def test_doctor_says_autoprobe_in_words(tmp_path: Path, written: str | None, word: str) -> None:
    """``aifactory doctor``'s sriov-pool line, as a real process: on/off, never Python's True/False."""
    from hostroots import run_cli

    make_pf(tmp_path)
    autoprobe = tmp_path / "sys/bus/pci/devices" / PF / "sriov_drivers_autoprobe"
    if written is None:
        autoprobe.unlink()
    else:
        autoprobe.write_text(f"{written}\n")
    result = run_cli("--host-root", str(tmp_path), "doctor", env={"AIFACTORY_STATE_DIR": str(tmp_path / "state")})
    [line] = [line for line in result.stdout.splitlines() if line.startswith("PASS  sriov-pool")]
    assert line.endswith(f": {PF} (ens1f0np0, mlx5_core): 4/8 VFs, autoprobe {word}"), result.stdout + result.stderr
    assert "True" not in result.stdout and "False" not in result.stdout and "None" not in result.stdout


def test_vf_pool_command_shows_resizes_and_refuses_while_a_vm_holds_a_vf(tmp_path: Path) -> None:
    """``aifactory vf-pool`` as a real process on a generated PF: dry run prints the writes, a resize
    makes them, and a VF a VM's network hooks configured (an owner token) blocks a resize."""
    from hostroots import run_cli

    make_pf(tmp_path)
    env = {"AIFACTORY_STATE_DIR": str(tmp_path / "state")}
    shown = run_cli("--host-root", str(tmp_path), "vf-pool", "ens1f0np0", env=env)
    assert shown.returncode == 0 and "4/8 VFs, autoprobe on, in use: none" in shown.stdout, shown.stderr
    dry = run_cli("--host-root", str(tmp_path), "vf-pool", "0000:18:00.0", "6", "--autoprobe", "off", "--dry-run",
                  env=env)
    assert dry.returncode == 0, dry.stderr
    assert [line.split("#")[0].split()[1] for line in dry.stdout.splitlines()] == ["0", "0", "6"]
    assert (tmp_path / "sys/bus/pci/devices/0000:18:00.0/sriov_numvfs").read_text().strip() == "4"
    tokens = tmp_path / "state" / "vnm" / "vf-owners"
    tokens.mkdir(parents=True)
    (tokens / "ens1f0np0.1").write_text("42\n")
    refused = run_cli("--host-root", str(tmp_path), "vf-pool", "ens1f0np0", "2", env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "VF(s) 1 in use" in refused.stderr
    bad = run_cli("--host-root", str(tmp_path), "vf-pool", "ens1f0np0", "many", env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "VF count" in bad.stderr
    (tokens / "ens1f0np0.1").unlink()  # the VM released its VF
    made = run_cli("--host-root", str(tmp_path), "vf-pool", "ens1f0np0", "6", "--autoprobe", "off", env=env)
    assert made.returncode == 0 and made.stdout.strip() == "0000:18:00.0: 4 -> 6 VFs", made.stderr
    pf_dir = tmp_path / "sys/bus/pci/devices/0000:18:00.0"
    assert (pf_dir / "sriov_numvfs").read_text().strip() == "6"
    assert (pf_dir / "sriov_drivers_autoprobe").read_text().strip() == "0"
