"""SR-IOV networking on the real kernel of the test host (QEMU/TCG guest).

* netdevsim PF: the pool is created by our sysfs code, VFs are configured through the lifecycle
  (journaled ``vf_config`` actions), read back over netlink and cross-checked with ``ip -d link``,
  released to the verified clean state; bad inputs configure nothing.
* NVMe PF: the sysfs pool (autoprobe off), a VF bound to vfio-pci through the lifecycle, a shrink
  refused while it is held, then released.
* Two tenants on 802.1Q sub-interfaces over a VLAN-filtering bridge, in network namespaces: ping
  works within a tenant and fails across, also when a tenant forges the other's tag.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from testhost import ENV_NETDEVSIM
from testhost.guest import driver_of, modprobe, read, sh, wait_for, write

from aifactory_core.errors import HostError, UsageError
from aifactory_core.host import netlink_vf, sriov
from aifactory_core.host.pcibind import SysfsWriter
from aifactory_core.hostroot import HostRoot
from aifactory_core.lifecycle import executor
from aifactory_core.model import Action
from aifactory_core.vnm import vf as vf_actions

pytestmark = pytest.mark.realkernel
VFS = 8


@pytest.fixture
def netdevsim_pf(tmp_path: Path) -> Iterator[tuple[HostRoot, str, int]]:
    """A netdevsim device whose debugfs max_vfs allows VFS; yields (host, PF name, ifindex)."""
    if not Path("/sys/bus/netdevsim").exists():
        modprobe("psample")
        sh("insmod", os.environ[ENV_NETDEVSIM])
    if not Path("/sys/kernel/debug/netdevsim").exists():
        subprocess.run(["mount", "-t", "debugfs", "none", "/sys/kernel/debug"], check=False)
    dev_id = 200 + os.getpid() % 500
    write("/sys/bus/netdevsim/new_device", f"{dev_id} 1")
    dev = Path(f"/sys/bus/netdevsim/devices/netdevsim{dev_id}")
    try:
        net = wait_for(lambda: (dev / "net").exists() and sorted((dev / "net").iterdir()), "netdevsim netdev")
        write(f"/sys/kernel/debug/netdevsim/netdevsim{dev_id}/max_vfs", str(VFS))
        yield HostRoot(Path("/"), tmp_path / "state"), net[0].name, int(read(net[0] / "ifindex"))
    finally:
        write(dev / "sriov_numvfs", "0")
        write("/sys/bus/netdevsim/del_device", str(dev_id))


def _ip_vf_lines(pf: str) -> list[str]:
    return [line.strip() for line in sh("ip", "-d", "link", "show", "dev", pf).splitlines()
            if line.strip().startswith("vf ")]


def test_netdevsim_pool_configure_read_back_release(netdevsim_pf: tuple[HostRoot, str, int]) -> None:
    host, name, index = netdevsim_pf
    pf = sriov.pf_by_netdev(host, name)
    assert pf.total_vfs == VFS and pf.num_vfs == 0
    pf = sriov.set_pool_size(host, pf, VFS, SysfsWriter())
    assert pf.num_vfs == VFS
    ipr = netlink_vf.open_netlink()
    untouched = netlink_vf.read_vfs(ipr, index)
    assert len(untouched) == VFS

    wanted = {vf: netlink_vf.settings(mac=f"02:00:00:00:{vf:02x}:01", vlan=100 + vf, qos=vf % 8, spoofchk=vf % 2 == 0,
                                      trust=vf % 2 == 1, min_tx_rate=0, max_tx_rate=1000 * (vf + 1),
                                      link_state=("auto", "enable", "disable")[vf % 3])
              for vf in range(4)}
    actions = [vf_actions.action(name, vf, 7, settings) for vf, settings in wanted.items()]
    executor.prepare(host, 7, actions)
    state = netlink_vf.read_vfs(ipr, index)
    for vf, settings in wanted.items():
        assert state[vf] == settings, vf
    lines = _ip_vf_lines(name)
    assert "vf 1 " in lines[1] and "vlan 101, qos 1" in lines[1] and "max_tx_rate 2000Mbps" in lines[1], lines[1]
    assert "trust on" in lines[1] and "spoof checking off" in lines[1]
    assert vf_actions.vf_owners(host) == {f"{name}/{vf}": 7 for vf in range(4)}

    with pytest.raises(HostError, match="held by VM 7"):  # a second VM cannot take a held VF
        executor.prepare(host, 8, [vf_actions.action(name, 2, 8, netlink_vf.settings(mac="02:00:00:00:99:01"))])
    assert netlink_vf.read_vfs(ipr, index)[2] == wanted[2]

    with pytest.raises(UsageError, match="in use"):
        sriov.set_pool_size(host, pf, 2, SysfsWriter(), in_use=vf_actions.vf_owners_indices(host, name))

    assert executor.release(host, 7)
    after = netlink_vf.read_vfs(ipr, index)
    assert all(after[vf] == netlink_vf.CLEAN for vf in range(4))  # released VFs: verified clean
    assert all(after[vf] == untouched[vf] for vf in range(4, VFS))  # the others: as the driver made them
    assert vf_actions.vf_owners(host) == {}
    assert not any(" vlan " in line or "trust on" in line for line in _ip_vf_lines(name))


def test_netdevsim_bad_inputs_configure_nothing(netdevsim_pf: tuple[HostRoot, str, int]) -> None:
    host, name, index = netdevsim_pf
    sriov.set_pool_size(host, sriov.pf_by_netdev(host, name), 4, SysfsWriter())
    ipr = netlink_vf.open_netlink()
    before = netlink_vf.read_vfs(ipr, index)
    for bad in ({"vlan": 4095}, {"vlan": -1}, {"mac": "01:00:5e:00:00:01"}):
        with pytest.raises(UsageError):
            netlink_vf.settings(**{"mac": "02:00:00:00:00:01", **bad})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="invalid interface name"):
        vf_actions.action("eth0/../x", 0, 7, netlink_vf.settings(mac="02:00:00:00:00:01"))
    with pytest.raises(UsageError, match="VF index 4 beyond|outside the pool"):
        executor.prepare(host, 9, [vf_actions.action(name, 4, 9, netlink_vf.settings(mac="02:00:00:00:00:01"))])
    assert netlink_vf.read_vfs(ipr, index) == before
    assert vf_actions.vf_owners(host) == {}


def test_nvme_vf_pool_and_vfio_binding(nvme_pf: str, tmp_path: Path) -> None:
    host = HostRoot(Path("/"), tmp_path / "state")
    modprobe("vfio-pci")
    pf = sriov.pf_by_address(host, nvme_pf)
    if pf.num_vfs:
        pf = sriov.set_pool_size(host, pf, 0, SysfsWriter())
    pf = sriov.set_pool_size(host, pf, 1, SysfsWriter(), autoprobe=False)
    try:
        vf = pf.vf_address(0)
        assert vf is not None and driver_of(vf) is None  # autoprobe off: no host driver touched it
        executor.prepare(host, 11, [Action("pci_driver", vf, "vfio-pci", "", "VM NIC")])
        assert driver_of(vf) == "vfio-pci"
        with pytest.raises(UsageError, match=r"VF\(s\) 0 in use"):
            sriov.set_pool_size(host, pf, 0, SysfsWriter())
        assert executor.release(host, 11)
        assert driver_of(vf) is None
    finally:
        write(Path("/sys/bus/pci/devices") / nvme_pf / "sriov_numvfs", "0")
        write(Path("/sys/bus/pci/devices") / nvme_pf / "sriov_drivers_autoprobe", "1")


def _ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60, check=check)


def _ping(ns: str, address: str) -> bool:
    return _ns(ns, "ping", "-c", "1", "-W", "2", address, check=False).returncode == 0


def test_two_tenants_on_8021q_and_a_vlan_filtering_bridge() -> None:
    modprobe("8021q", "bridge", "veth")
    tag = f"t{os.getpid() % 1000}"
    bridge = f"br{tag}"
    members = {"a1": (100, "10.77.0.1"), "a2": (100, "10.77.0.2"), "b1": (200, "10.77.0.3"),
               "b2": (200, "10.77.0.4")}
    sh("ip", "link", "add", bridge, "type", "bridge", "vlan_filtering", "1")
    try:
        sh("ip", "link", "set", bridge, "up")
        for name, (vlan, address) in members.items():
            ns, port = f"{tag}{name}", f"{tag}{name}p"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", port, "master", bridge)
            sh("ip", "link", "set", port, "up")
            sh("bridge", "vlan", "del", "dev", port, "vid", "1")
            sh("bridge", "vlan", "add", "dev", port, "vid", str(vlan))  # tagged: the tenant's VLAN only
            _ns(ns, "ip", "link", "set", "eth0", "up")
            _ns(ns, "ip", "link", "add", "link", "eth0", "name", f"eth0.{vlan}", "type", "vlan", "id", str(vlan))
            _ns(ns, "ip", "addr", "add", f"{address}/24", "dev", f"eth0.{vlan}")
            _ns(ns, "ip", "link", "set", f"eth0.{vlan}", "up")
        vlans = json.loads(sh("bridge", "-j", "vlan", "show"))
        assert {entry["ifname"]: [v["vlan"] for v in entry["vlans"]] for entry in vlans
                if entry["ifname"].startswith(tag)} == {f"{tag}{n}p": [v] for n, (v, _) in members.items()}
        assert _ping(f"{tag}a1", "10.77.0.2") and _ping(f"{tag}b1", "10.77.0.4")  # within a tenant
        assert not _ping(f"{tag}a1", "10.77.0.3") and not _ping(f"{tag}b2", "10.77.0.2")  # across
        # tenant B forges tenant A's tag: the bridge drops it at B's port
        _ns(f"{tag}b1", "ip", "link", "add", "link", "eth0", "name", "eth0.100", "type", "vlan", "id", "100")
        _ns(f"{tag}b1", "ip", "addr", "add", "10.77.0.9/24", "dev", "eth0.100")
        _ns(f"{tag}b1", "ip", "link", "set", "eth0.100", "up")
        _ns(f"{tag}b1", "ip", "link", "set", "eth0.200", "down")
        assert not _ping(f"{tag}b1", "10.77.0.1")
    finally:
        for name in members:
            subprocess.run(["ip", "netns", "del", f"{tag}{name}"], check=False)
        subprocess.run(["ip", "link", "del", bridge], check=False)


def test_netdevsim_eswitch_to_switchdev_over_real_devlink(netdevsim_pf: tuple[HostRoot, str, int],
                                                          tmp_path: Path) -> None:
    """``aifactory eswitch`` over the kernel's devlink (pyroute2): reads the netdevsim device's mode,
    ``--apply`` switches it to switchdev, a second ``--apply`` changes nothing; ``devlink`` agrees."""
    import sys

    _host, pf, _index = netdevsim_pf
    device = Path(f"/sys/class/net/{pf}/device").resolve().name  # netdevsimN
    config = tmp_path / "aifactory.conf"
    config.write_text(f'[plugin.bluefield]\nswitchdev = ["netdevsim/{device}"]\n')
    aifactory = [str(Path(sys.executable).with_name("aifactory")), "--config", str(config), "eswitch"]
    shown = subprocess.run(aifactory, capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and shown.stdout == f"netdevsim/{device}: legacy\n", shown.stderr
    applied = subprocess.run([*aifactory, "--apply"], capture_output=True, text=True, check=False)
    assert applied.returncode == 0 and applied.stdout == f"netdevsim/{device}: switchdev (switched)\n", applied.stderr
    again = subprocess.run([*aifactory, "--apply"], capture_output=True, text=True, check=False)
    assert again.stdout == f"netdevsim/{device}: switchdev\n", again.stderr
    assert "mode switchdev" in sh("devlink", "dev", "eswitch", "show", f"netdevsim/{device}")


def test_netdevsim_eswitch_mode_read_unprivileged_matches_devlink(netdevsim_pf: tuple[HostRoot, str, int]) -> None:
    """The sysfs rule the probes and the network routing share (``host.eswitch.uplink_mode``) on the
    real kernel: in legacy mode the PF already has a ``phys_switch_id`` (so a switch id alone cannot
    mean switchdev) and no VF representors -> legacy; after devlink switches the device to
    switchdev the kernel adds a ``pf0vfN`` representor per VF -> switchdev; ``devlink`` agrees with
    both answers, read through the probes' own ``Root`` reader too. No VFs and no representors ->
    unknown. (netdevsim is not a PCI function, so neither the probe's SR-IOV section, which walks PCI
    PFs, nor ``vnm.plan.vf_mode``, which starts from a VF's PCI address, can be run on it whole; both
    call ``uplink_mode``.)"""
    from aifactory_core.host.eswitch import uplink_mode, vf_representors
    from aifactory_core.probes.sysfs import Root

    host, pf, _index = netdevsim_pf
    device = Path(f"/sys/class/net/{pf}/device").resolve()
    probe_root = Root("/")

    def listing(path: str) -> list[str]:
        return sorted(os.listdir(path))

    def mode() -> str:
        probe_mode = uplink_mode(probe_root.text, probe_root.listdir, pf)
        assert probe_mode == uplink_mode(host.read_text, listing, pf)
        return probe_mode

    assert read(Path(f"/sys/class/net/{pf}/phys_switch_id"))  # present in legacy mode too
    assert "mode legacy" in sh("devlink", "dev", "eswitch", "show", f"netdevsim/{device.name}")
    assert mode() == "unknown"  # no VFs yet
    write(device / "sriov_numvfs", "4")
    assert (mode(), vf_representors(host.read_text, listing, pf)) == ("legacy", {})
    print(f"legacy: phys_switch_id={read(Path(f'/sys/class/net/{pf}/phys_switch_id'))} uplink_mode={mode()}")
    sh("devlink", "dev", "eswitch", "set", f"netdevsim/{device.name}", "mode", "switchdev")
    found = wait_for(lambda: len(vf_representors(host.read_text, listing, pf)) == 4 and
                     vf_representors(host.read_text, listing, pf), "VF representors")
    assert sorted(found) == [0, 1, 2, 3] and mode() == "switchdev"
    print(f"switchdev: representors={found} uplink_mode={mode()}")
    assert "mode switchdev" in sh("devlink", "dev", "eswitch", "show", f"netdevsim/{device.name}")
    sh("devlink", "dev", "eswitch", "set", f"netdevsim/{device.name}", "mode", "legacy")
    wait_for(lambda: not vf_representors(host.read_text, listing, pf), "representors gone")
    assert mode() == "legacy"
