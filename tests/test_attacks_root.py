"""Attacks on root from ``oneadmin`` and the tenants (issue 16, "The privilege boundary").

Each test is one attack a reviewer reproduced against the code before the fix; each fails on that
code and passes now. 40 distinct attacks (more in ``test_attacks_oneadmin.py``,
``realkernel/test_helper_refusals.py``; the other findings: ``test_lifecycle_faults.py``,
``test_sudoers_doc.py``, ``test_config.py`` for ``[host] state_dir``):

* the root helper touching the host's own functions (14): a function listed in ``[host]
  host_devices``; an NVMe with a mounted partition; one whose partition is active swap; one whose
  partition is held by device-mapper; one exporting the virtio-9p share mounted as ``/``; one
  exporting a mounted virtiofs share; a NIC carrying a global IPv6 address; one carrying an IPv4
  address; one carrying the IPv4 default route; one carrying the IPv6 default route; one enslaved
  to a bond that carries an address; a function sharing its IOMMU group with a NIC the host uses;
  ``reset`` of a mounted NVMe; ``set-driver none`` of the NIC carrying the default route;
* the root helper's VF verbs outside the configured pools (4): ``vf-set`` on a PF outside
  ``[host] vf_pools``, ``vf-scrub`` on one, a VF index beyond the pool, a VF the host uses itself;
* the root helper's configuration (5): a config ``oneadmin`` owns, one writable by others, one
  writable by ``oneadmin``'s group, one in a directory ``oneadmin`` owns, one that is
  ``oneadmin``'s link to a root-owned file;
* root's files in the state directory (8): a link planted as a device lock, a VF owner token's
  lock, a VF owner token (over a root file), an OVS bridge lock, and in place of the owners,
  quarantine and journal directories (root writes, or removes, outside) and of a reset record
  (root copies a root-only file into oneadmin's directory);
* the ownership hand-back after a root repair (1): a state subdirectory swapped for a link between
  the walk and the reopen by name;
* journals replayed by ``aifactory repair --boot`` (8): an OVS port's and a VXLAN port's
  ``ovs-vsctl`` argv, the OpenSM reload command and the partitions file path, a UFM URL and token
  file (root's secret sent out), a device step unbinding the NIC that carries the default route, a
  step taking an idle GPU for vfio-pci, and one forcing a driver onto a GPU the driver does not
  match.

The host is the generated DGX tree (``tests/hostroots.py``) with the kernel's evidence of use added
where the kernel keeps it: ``/sys/class/block`` (partitions, ``dev``, ``holders``),
``/proc/self/mountinfo``, ``/proc/swaps``, ``/proc/net/if_inet6``, ``/proc/net/route``,
``/proc/net/ipv6_route`` and the ``upper_*`` links of stacked interfaces. The attacker is a real
unprivileged ``oneadmin`` (looked up; ``nobody`` where the machine has no ``oneadmin``) where it
writes something root then reads (``setpriv``). Each attack is marked ``root_attack`` and counted
in the session's summary line (:mod:`rootattacks`); the controls are not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import needs
import pytest
from fixtures.nics.netlink_double import NetlinkDouble

from aifactory_core import roothelper
from aifactory_core.host import netlink_vf
from aifactory_core.hostroot import HostRoot


def _attacker() -> int:
    """oneadmin's uid (its primary group has the same number where OpenNebula's packages made it)."""
    import pwd

    for name in ("oneadmin", "nobody"):
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    return 65534


ATTACKER = _attacker()
attack = pytest.mark.root_attack
NVME = "0000:08:00.0"
NIC = "0000:01:00.0"
NIC_NAME = "enp1s0f0"
NIC_SIBLING = "0000:01:00.1"
GPU = "0000:1b:00.0"
POOL_PF = "0000:aa:00.0"
POOL_PF_NAME = "enp170s0f0np0"
POOL_PF_IFINDEX = 11
POOL_VF0 = "0000:aa:00.2"


# ---- the host -------------------------------------------------------------------------------------


@pytest.fixture
def host(dgx_root: Path, tmp_path: Path) -> HostRoot:
    """A private copy of the generated DGX host."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(dgx_root), str(root)], check=True)  # copytree takes seconds here
    return HostRoot(root, tmp_path / "state")


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _link(root: Path, relative: str, target: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def add_nvme_namespace(host: HostRoot, address: str = NVME) -> str:
    """``nvme0n1`` with partitions 1-3 under ``address``, laid out as the kernel does: the device in
    ``/sys/devices/.../<address>/nvme/nvme0/nvme0n1``, each entry linked from ``/sys/class/block``.
    Returns the real directory of the disk, relative to the root."""
    device = os.path.relpath(os.path.realpath(host.pci_devices / address), host.root)
    disk = f"{device}/nvme/nvme0/nvme0n1"
    _write(host.root, f"{disk}/dev", "259:0\n")
    _link(host.root, "sys/class/block/nvme0n1", f"../../../{disk}")
    for number in (1, 2, 3):
        part = f"{disk}/nvme0n1p{number}"
        _write(host.root, f"{part}/dev", f"259:{number}\n")
        (host.root / part / "holders").mkdir()
        _link(host.root, f"sys/class/block/nvme0n1p{number}", f"../../../{part}")
    return disk


def mounted(host: HostRoot) -> None:
    add_nvme_namespace(host)
    _write(host.root, "proc/self/mountinfo",
           "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n"
           "29 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro\n")


def swapping(host: HostRoot) -> None:
    add_nvme_namespace(host)
    _write(host.root, "proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
                                    "/dev/nvme0n1p3                          partition\t8388604\t\t0\t\t-2\n")


def held_by_device_mapper(host: HostRoot) -> None:
    disk = add_nvme_namespace(host)
    _write(host.root, "sys/devices/virtual/block/dm-0/dev", "253:0\n")
    _link(host.root, "sys/class/block/dm-0", "../../devices/virtual/block/dm-0")
    _link(host.root, f"{disk}/nvme0n1p3/holders/dm-0", "../../../../../../../../virtual/block/dm-0")


def root_on_virtio_9p(host: HostRoot) -> None:
    """``/`` is a virtio-9p share (as in the real-kernel test host): no block device under it."""
    device = os.path.relpath(os.path.realpath(host.pci_devices / NVME), host.root)
    _write(host.root, f"{device}/virtio3/mount_tag", "hostroot\n")
    _link(host.root, "sys/bus/virtio/devices/virtio3", f"../../../../{device}/virtio3")
    _write(host.root, "proc/self/mountinfo", "20 1 0:19 / / ro,relatime - 9p hostroot ro,trans=virtio\n")


def virtiofs_share(host: HostRoot) -> None:
    device = os.path.relpath(os.path.realpath(host.pci_devices / NVME), host.root)
    _write(host.root, f"{device}/virtio4/.keep", "")
    _write(host.root, "sys/fs/virtiofs/0/tag", "data\n")
    _link(host.root, "sys/fs/virtiofs/0/device", f"../../../../{device}/virtio4")
    _write(host.root, "proc/self/mountinfo", "21 1 0:20 / /srv/data rw - virtiofs data rw\n")


def ipv6_address(host: HostRoot) -> None:
    _write(host.root, "proc/net/if_inet6",
           "00000000000000000000000000000001 01 80 10 80       lo\n"
           f"fe8000000000000002000000000000a1 02 40 20 80 {NIC_NAME}\n"
           f"20010db8000000000000000000000005 02 40 00 80 {NIC_NAME}\n")


def ipv4_address(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    """IPv4 addresses come over netlink: its answer for this host."""
    from aifactory_core.host import netuse

    monkeypatch.setattr(netuse, "_ipv4_addresses", lambda _host: {NIC_NAME: ["192.0.2.5"]})


def ipv4_default_route(host: HostRoot) -> None:
    _write(host.root, "proc/net/route",
           "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
           f"{NIC_NAME}\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
           f"{NIC_NAME}\t000200C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n")


def ipv6_default_route(host: HostRoot) -> None:
    _write(host.root, "proc/net/ipv6_route",
           "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
           f"20010db8000000000000000000000001 00000400 00000001 00000000 00000003 {NIC_NAME}\n"
           "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
           "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n")


def bonded(host: HostRoot) -> None:
    _write(host.root, "sys/devices/virtual/net/bond0/ifindex", "40\n")
    _link(host.root, "sys/class/net/bond0", "../../devices/virtual/net/bond0")
    nic = os.path.relpath(os.path.realpath(host.path(f"/sys/class/net/{NIC_NAME}")), host.root)
    _link(host.root, f"{nic}/upper_bond0", "../../../../../virtual/net/bond0")
    _write(host.root, "proc/net/if_inet6", "20010db8000000000000000000000007 28 40 00 80    bond0\n")


WRITABLE = ("driver_override", "reset", "reset_method", "remove", "rescan", "sriov_numvfs",
            "sriov_drivers_autoprobe")


def snapshot(root: Path) -> dict[str, str]:
    """Every sysfs file a change of driver, a reset or a pool change writes, by content hash."""
    pci = root / "sys/bus/pci"
    paths = [pci / "drivers_probe", pci / "rescan"]
    paths += [pci / "drivers" / driver / name for driver in os.listdir(pci / "drivers")
              for name in ("bind", "unbind", "new_id", "remove_id")]
    paths += [pci / "devices" / device / name for device in os.listdir(pci / "devices") for name in WRITABLE]
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in paths if path.is_file()}


# ---- the helper -----------------------------------------------------------------------------------


Helper = Callable[..., int]


@pytest.fixture
def helper(host: HostRoot, open_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Helper:
    """The root helper's ``main`` on the generated host, its root config at ``open_tmp/etc``."""
    from aifactory_core import rootconfig

    monkeypatch.setattr(roothelper, "HOST_ROOT", str(host.root))
    monkeypatch.setattr(rootconfig, "ROOT_CONFIG_PATH", str(open_tmp / "etc" / "aifactory.conf"))
    return lambda *argv: roothelper.main(list(argv))


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A root-owned 0755 directory under ``/tmp`` the attacker can reach (``tmp_path`` is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="aifactory-attack-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def root_config(where: Path, text: str) -> Path:
    """The root-owned config the helper reads (root: 0644 in a root-owned 0755 directory)."""
    needs.root("the helper trusts only a config root owns")
    directory = where / "etc"
    directory.mkdir(exist_ok=True)
    path = directory / "aifactory.conf"
    path.write_text(text)
    path.chmod(0o644)
    return path


HOST_USE = [
    pytest.param(["set-driver", NVME, "vfio-pci"], mounted, "nvme0n1p2 is mounted on /", id="mounted-partition"),
    pytest.param(["set-driver", NVME, "vfio-pci"], swapping, "nvme0n1p3 is active swap", id="active-swap"),
    pytest.param(["set-driver", NVME, "vfio-pci"], held_by_device_mapper, "nvme0n1p3 is held by dm-0",
                 id="device-mapper-holder"),
    pytest.param(["set-driver", NVME, "vfio-pci"], root_on_virtio_9p, "its 9p share hostroot is mounted on /",
                 id="root-on-a-virtio-9p-share"),
    pytest.param(["reset", NVME], virtiofs_share, "its virtiofs share data is mounted on /srv/data",
                 id="mounted-virtiofs-share"),
    pytest.param(["set-driver", NIC, "vfio-pci"], ipv6_address, f"{NIC_NAME} carries 2001:db8::5",
                 id="global-ipv6-address"),
    pytest.param(["set-driver", NIC, "vfio-pci"], ipv4_default_route, f"{NIC_NAME} carries the default route",
                 id="ipv4-default-route"),
    pytest.param(["set-driver", NIC, "vfio-pci"], ipv6_default_route, f"{NIC_NAME} carries the default route",
                 id="ipv6-default-route"),
    pytest.param(["set-driver", NIC, "vfio-pci"], bonded, f"{NIC_NAME} carries 2001:db8::7 (through bond0)",
                 id="bond-member"),
    pytest.param(["set-driver", NIC_SIBLING, "vfio-pci"], ipv4_default_route,
                 f"shares IOMMU group 1 with {NIC}, which the host uses", id="iommu-group-of-a-host-nic"),
    pytest.param(["reset", NVME], mounted, "nvme0n1p2 is mounted on /", id="reset-of-a-mounted-nvme"),
    pytest.param(["set-driver", NIC, "none"], ipv4_default_route, f"{NIC_NAME} carries the default route",
                 id="unbind-of-the-uplink"),
]


@attack
@pytest.mark.parametrize(("argv", "evidence", "named"), HOST_USE)
def test_helper_refuses_a_function_the_host_uses(host: HostRoot, helper: Helper,
                                                  capsys: pytest.CaptureFixture[str], argv: list[str],
                                                  evidence: Callable[[HostRoot], None], named: str) -> None:
    evidence(host)
    before = snapshot(host.root)
    status = helper(*argv)
    error = capsys.readouterr().err
    assert status != 0 and len(error.splitlines()) == 1, error
    assert error.startswith(f"aifactory-root-helper: refusing {argv[1]}") and named in error, error
    assert snapshot(host.root) == before


@attack
def test_helper_refuses_a_nic_carrying_an_ipv4_address(host: HostRoot, helper: Helper,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ipv4_address(host, monkeypatch)
    before = snapshot(host.root)
    status = helper("set-driver", NIC, "vfio-pci")
    error = capsys.readouterr().err
    assert status != 0 and f"refusing {NIC}: the host uses it ({NIC_NAME} carries 192.0.2.5)" in error, error
    assert snapshot(host.root) == before


@attack
def test_helper_refuses_a_function_listed_in_host_devices(host: HostRoot, helper: Helper,
                                                         open_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root_config(open_tmp, f'[host]\nhost_devices = ["{GPU}"]\n')
    before = snapshot(host.root)
    status = helper("reset", GPU)
    error = capsys.readouterr().err
    assert status != 0 and "listed in [host] host_devices" in error, error
    assert snapshot(host.root) == before


def test_the_same_helper_resets_a_function_the_host_does_not_use(host: HostRoot,
                                                                 helper: Helper,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The control: every refusal above is the judgement, not a helper that cannot act on this host."""
    mounted(host)
    ipv4_default_route(host)
    status = helper("reset", GPU)
    assert status == 0, capsys.readouterr().err
    assert capsys.readouterr().out == "flr\n\n"
    assert (host.pci_devices / GPU / "reset").read_text() == "1"


# ---- the helper's VF verbs ------------------------------------------------------------------------


@pytest.fixture
def netlink(monkeypatch: pytest.MonkeyPatch) -> NetlinkDouble:
    peer = NetlinkDouble({POOL_PF_IFINDEX: 4})
    monkeypatch.setattr(netlink_vf, "open_netlink", lambda: peer)
    return peer


VF_ATTACKS = [
    pytest.param("", ["vf-set", POOL_PF_NAME, "0", "vlan=5"], f"{POOL_PF} is not in [host] vf_pools",
                 id="vf-set-outside-the-pools"),
    pytest.param("", ["vf-scrub", POOL_PF_NAME, "1", "eth"], f"{POOL_PF} is not in [host] vf_pools",
                 id="vf-scrub-outside-the-pools"),
    pytest.param(f'vf_pools = ["{POOL_PF}"]\n', ["vf-set", POOL_PF_NAME, "4", "vlan=5"],
                 f"the pool of {POOL_PF} has 4 VFs", id="vf-index-beyond-the-pool"),
    pytest.param(f'vf_pools = ["{POOL_PF}"]\nhost_devices = ["{POOL_VF0}"]\n',
                 ["vf-set", POOL_PF_NAME, "0", "vlan=5"], f"refusing {POOL_VF0}: the host uses it",
                 id="vf-the-host-uses"),
]


@attack
@pytest.mark.parametrize(("pools", "argv", "named"), VF_ATTACKS)
def test_helper_refuses_a_vf_outside_the_configured_pools(host: HostRoot, helper: Helper,
                                                          netlink: NetlinkDouble, open_tmp: Path,
                                                          capsys: pytest.CaptureFixture[str], pools: str,
                                                          argv: list[str], named: str) -> None:
    root_config(open_tmp, f"[host]\n{pools}")
    status = helper(*argv)
    error = capsys.readouterr().err
    assert status != 0 and len(error.splitlines()) == 1 and named in error, error
    assert netlink.sets() == 0


def test_the_same_helper_sets_a_vf_of_a_configured_pool(host: HostRoot, helper: Helper,
                                                        netlink: NetlinkDouble, open_tmp: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    root_config(open_tmp, f'[host]\nvf_pools = ["{POOL_PF}"]\n')
    status = helper("vf-set", POOL_PF_NAME, "0", "vlan=5")
    assert status == 0, capsys.readouterr().err
    assert netlink_vf.read_vfs(netlink, POOL_PF_IFINDEX)[0].vlan == 5


# ---- the helper's configuration -------------------------------------------------------------------


def as_attacker(*argv: str) -> None:
    """Run ``argv`` as the unprivileged attacker (its uid and gid, no other groups)."""
    needs.root("switches to an unprivileged user")
    setpriv = needs.tool("setpriv", hint="util-linux")
    subprocess.run([setpriv, f"--reuid={ATTACKER}", f"--regid={ATTACKER}", "--clear-groups", *argv],
                   check=True, capture_output=True, timeout=60)


def attacker_writes(path: Path, text: str) -> None:
    as_attacker(sys.executable, "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])",
                str(path), text)


def _config_oneadmin_owns(etc: Path, outside: Path) -> None:
    os.chown(etc, ATTACKER, ATTACKER)
    attacker_writes(etc / "aifactory.conf", "[host]\n")
    os.chown(etc, 0, 0)


def _config_writable_by_others(etc: Path, outside: Path) -> None:
    (etc / "aifactory.conf").write_text("[host]\n")
    (etc / "aifactory.conf").chmod(0o666)


def _config_in_a_directory_oneadmin_owns(etc: Path, outside: Path) -> None:
    (etc / "aifactory.conf").write_text("[host]\n")
    os.chown(etc, ATTACKER, ATTACKER)


def _config_through_oneadmins_link(etc: Path, outside: Path) -> None:
    (outside / "benign.conf").write_text("[host]\n")
    os.chown(etc, ATTACKER, ATTACKER)
    as_attacker("ln", "-s", str(outside / "benign.conf"), str(etc / "aifactory.conf"))
    os.chown(etc, 0, 0)


def _config_group_writable(etc: Path, outside: Path) -> None:
    (etc / "aifactory.conf").write_text("[host]\n")
    (etc / "aifactory.conf").chmod(0o664)
    os.chown(etc / "aifactory.conf", 0, ATTACKER)


CONFIG_ATTACKS = [
    pytest.param(_config_oneadmin_owns, f"writable by uid {ATTACKER}", id="config-owned-by-oneadmin"),
    pytest.param(_config_writable_by_others, "writable by uid 0 or others (mode 0666)", id="config-world-writable"),
    pytest.param(_config_in_a_directory_oneadmin_owns, f"is writable by uid {ATTACKER}",
                 id="config-in-oneadmins-directory"),
    pytest.param(_config_through_oneadmins_link, "aifactory.conf is a link: not following it",
                 id="config-through-oneadmins-link"),
    pytest.param(_config_group_writable, "(mode 0664)", id="config-group-writable-by-oneadmin"),
]


@attack
@pytest.mark.parametrize(("plant", "named"), CONFIG_ATTACKS)
def test_helper_refuses_a_config_oneadmin_can_write(host: HostRoot, helper: Helper,
                                                    open_tmp: Path, capsys: pytest.CaptureFixture[str],
                                                    plant: Callable[[Path, Path], None], named: str) -> None:
    """Without ``host_devices`` the GPU would pass; the helper refuses to decide by such a file at all."""
    etc = root_config(open_tmp, f'[host]\nhost_devices = ["{GPU}"]\n').parent
    (etc / "aifactory.conf").unlink()
    outside = open_tmp / "outside"
    outside.mkdir()
    plant(etc, outside)
    before = snapshot(host.root)
    status = helper("reset", GPU)
    error = capsys.readouterr().err
    assert status != 0 and len(error.splitlines()) == 1 and named in error, error
    assert snapshot(host.root) == before


def test_a_config_only_root_can_write_is_read(open_tmp: Path) -> None:
    """The control for the config attacks: a root-owned file in root-owned directories is read."""
    from aifactory_core import rootconfig

    path = root_config(open_tmp, f'[host]\nhost_devices = ["{GPU}"]\nvf_pools = ["{POOL_PF}"]\n')
    config = rootconfig.load_root_config(str(path))
    assert config.host.host_devices == (GPU,) and config.host.vf_pools == (POOL_PF,)
    assert rootconfig.load_root_config(str(open_tmp / "absent.conf")).host.host_devices == ()


# ---- root's files in the state directory ----------------------------------------------------------
#
# The state directory is oneadmin's; root's commands (device bind/release/clear, vf-pool) open files
# in it. The attacker plants a link where root will open, create, read or remove a file.


@pytest.fixture
def state(host: HostRoot, open_tmp: Path) -> HostRoot:
    """``host`` with its state directory in ``open_tmp``, owned by the attacker."""
    directory = open_tmp / "state"
    directory.mkdir()
    os.chown(directory, ATTACKER, ATTACKER)
    return HostRoot(host.root, directory)


def attacker_links(state_dir: Path, relative: str, target: Path) -> None:
    """The attacker makes ``state_dir/relative`` (its directories included) a link to ``target``."""
    link = state_dir / relative
    as_attacker("mkdir", "-p", str(link.parent))
    as_attacker("ln", "-s", str(target), str(link))


def _claim(host: HostRoot) -> None:
    from aifactory_core.lifecycle import ownership

    ownership.claim(host, GPU, 5)


def _vf_config(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_core.vnm import vf as vf_actions

    monkeypatch.setattr(vf_actions, "_netlink", NetlinkDouble({POOL_PF_IFINDEX: 4}))
    vf_actions.do(host, vf_actions.action(POOL_PF_NAME, 0, 42, netlink_vf.settings(vlan=5)), None)


def _ovs_port(host: HostRoot, monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory_plugins.bluefield import ovs

    monkeypatch.setattr(ovs, "_runner", lambda argv, **_: subprocess.CompletedProcess(argv, 2, "", ""))
    ovs.bridge_lock(host, "br-tenant").__enter__()


def _quarantine(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import quarantine

    quarantine(host, GPU, "reset failed")


def _remove_journal(host: HostRoot) -> None:
    from aifactory_core.lifecycle.journal import Journal

    Journal(host, 7).remove()


def _record_reset(host: HostRoot) -> None:
    from aifactory_core.host.sanitize import record_reset

    record_reset(host, GPU, "flr", None)


STATE_ATTACKS = [
    pytest.param(f"locks/{GPU}.lock", "absent", _claim, id="device-lock-link"),
    pytest.param(f"vf-owners/{POOL_PF_NAME}.0.lock", "absent", _vf_config, id="vf-token-lock-link"),
    pytest.param(f"vf-owners/{POOL_PF_NAME}.0", "precious", _vf_config, id="vf-owner-token-link"),
    pytest.param("ovs/br-tenant.lock", "absent", _ovs_port, id="ovs-bridge-lock-link"),
    pytest.param("owners", "directory", _claim, id="owners-directory-link"),
    pytest.param("quarantine", "directory", _quarantine, id="quarantine-directory-link"),
    pytest.param("vms", "directory-with-7.json", _remove_journal, id="journal-directory-link-unlink"),
    pytest.param(f"resets/{GPU}", "secret", _record_reset, id="reset-record-link-read"),
]


@attack
@pytest.mark.parametrize(("planted", "target_kind", "operation"), STATE_ATTACKS)
def test_root_never_follows_a_link_planted_in_the_state_dir(state: HostRoot, open_tmp: Path,
                                                           monkeypatch: pytest.MonkeyPatch, planted: str,
                                                           target_kind: str,
                                                           operation: Callable[..., None]) -> None:
    from aifactory_core.errors import AifactoryError

    outside = open_tmp / "outside"
    outside.mkdir()
    target = outside / "target"
    if target_kind == "precious":
        target.write_text("precious\n")
    elif target_kind == "secret":
        target.write_text("root-only secret line\n")
        target.chmod(0o600)
    elif target_kind.startswith("directory"):
        target.mkdir()
        if target_kind == "directory-with-7.json":
            (target / "7.json").write_text("{}\n")
    before = {str(path): path.read_bytes() for path in outside.rglob("*") if path.is_file()}
    attacker_links(state.state_dir, planted, target)
    arguments = (state, monkeypatch) if operation in (_vf_config, _ovs_port) else (state,)
    try:
        operation(*arguments)
    except AifactoryError as error:
        assert "not following it" in error.message, error.message
    after = {str(path): path.read_bytes() for path in outside.rglob("*") if path.is_file()}
    assert after == before
    leaked = [path for path in state.state_dir.rglob("*")
              if path.is_file() and not path.is_symlink() and b"secret" in path.read_bytes()]
    assert leaked == []


# ---- the ownership hand-back after a root repair --------------------------------------------------

SWAP_DURING_THE_WALK = """
import os, sys
state, outside, root = sys.argv[1:4]  # and the attacker's uid
real_walk = os.walk


def walk(top, *args, **kwargs):
    # oneadmin's move, made deterministic: between the walk listing quarantine/ and the hand-back
    # opening its entries by name, quarantine/ becomes a link to a directory of root's.
    for entry in real_walk(top, *args, **kwargs):
        if entry[0] == os.path.join(state, "quarantine"):
            os.rename(entry[0], entry[0] + ".away")
            os.symlink(outside, entry[0])
            os.lchown(entry[0], int(sys.argv[4]), int(sys.argv[4]))
        yield entry


os.walk = walk
from aifactory_core.cli import main
sys.exit(main(["--host-root", root, "repair", "--boot"]))
"""


@attack
def test_a_directory_swapped_for_a_link_during_the_hand_back_gives_nothing_away(boot: HostRoot,
                                                                               open_tmp: Path) -> None:
    """The hand-back walked the state dir as root and reopened each path by name; a subdirectory
    swapped for a link between the walk and the open handed a root-only file to oneadmin."""
    state = boot
    as_attacker("mkdir", str(state.state_dir / "quarantine"))
    attacker_writes(state.state_dir / "quarantine" / GPU, "reset failed\n")
    outside = open_tmp / "root-only"
    outside.mkdir(mode=0o700)
    (outside / GPU).write_text("root's own file\n")
    result = subprocess.run([sys.executable, "-c", SWAP_DURING_THE_WALK, str(state.state_dir), str(outside),
                             str(state.root), str(ATTACKER)], capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "AIFACTORY_STATE_DIR": str(state.state_dir),
                                 "AIFACTORY_CONFIG": os.devnull})
    assert result.returncode == 0, result.stderr
    info = (outside / GPU).stat()
    assert (info.st_uid, info.st_gid) == (0, 0)
    assert (outside / GPU).read_text() == "root's own file\n"


# ---- journals replayed at boot --------------------------------------------------------------------
#
# ``aifactory repair --boot`` runs as root (aifactory-repair.service) over journals in oneadmin's
# state directory. The attacker writes a journal; the unit's command runs as a real process.

PROOF = "root-ran-this"
RECORDER = "import os, sys; print(os.getuid(), file=open(sys.argv[1], 'a'))"


def runs_as_the_attacker() -> None:
    """A repair started as root runs again as the state dir's owner, in a new process of this
    interpreter: the owner must be able to run it (a virtual environment on ``/usr/bin/python3``,
    as on a host, not one on an interpreter under root's home)."""
    try:
        subprocess.run([sys.executable, "-c", ""], user=ATTACKER, group=ATTACKER, extra_groups=[], check=True,
                       timeout=60)
    except (PermissionError, subprocess.CalledProcessError):
        needs.unavailable(f"uid {ATTACKER} cannot run {sys.executable}")


@pytest.fixture
def boot(dgx_root: Path, open_tmp: Path) -> HostRoot:
    """The DGX tree and an attacker-owned state directory, both where the repair's user can reach."""
    needs.root("the boot repair starts as root")
    runs_as_the_attacker()
    root = open_tmp / "root"
    subprocess.run(["cp", "-a", str(dgx_root), str(root)], check=True)
    state = open_tmp / "state"
    state.mkdir()
    os.chown(state, ATTACKER, ATTACKER)
    (open_tmp / "log").mkdir(mode=0o777)
    (open_tmp / "log").chmod(0o777)
    return HostRoot(root, state)


def forge_journal(host: HostRoot, vm: int, steps: list[dict[str, object]], *, network: bool = False) -> None:
    """The attacker writes ``vms/<vm>.json`` (under ``vnm/`` for a network journal)."""
    import json

    directory = host.state_dir / ("vnm/vms" if network else "vms")
    as_attacker("mkdir", "-p", str(directory))
    document = {"vm_id": vm, "phase": "prepared",
                "steps": [{"reason": "forged", "status": "done", "undo_value": None, **step} for step in steps]}
    attacker_writes(directory / f"{vm}.json", json.dumps(document))


def repair_at_boot(host: HostRoot, open_tmp: Path, config: str = "") -> subprocess.CompletedProcess[str]:
    """What aifactory-repair.service runs, as root, with a root-owned config naming the plugins."""
    path = open_tmp / "aifactory.conf"
    path.write_text('[plugins]\nenabled = ["vfio", "sriov", "infiniband", "bluefield"]\n' + config)
    from hostroots import run_cli

    return run_cli("--host-root", str(host.root), "repair", "--boot",
                   env={"AIFACTORY_STATE_DIR": str(host.state_dir), "AIFACTORY_CONFIG": str(path)})


def shell_proof(open_tmp: Path) -> list[str]:
    return ["/bin/sh", "-c", f"id -u > {open_tmp / 'log' / PROOF}"]


def _ovs_port_runs_the_journals_vsctl(host: HostRoot, open_tmp: Path) -> str:
    import json

    forge_journal(host, 41, [{"kind": "ovs_port", "target": "eth12", "value": json.dumps(
        {"bridge": "br-tenant", "tag": 100, "vm": 41, "vsctl": shell_proof(open_tmp)})}], network=True)
    return ""


def _ovs_vxlan_port_runs_the_journals_vsctl(host: HostRoot, open_tmp: Path) -> str:
    import json

    forge_journal(host, 42, [{"kind": "ovs_vxlan_port", "target": "eth12", "value": json.dumps(
        {"bridge": "br-tenant", "vni": 5001, "remote_ip": "192.0.2.10", "local_ip": None, "local_tags": [4000, 4094],
         "mtu": None, "vm": 42, "vsctl": shell_proof(open_tmp)})}], network=True)
    return ""


GUID = "0xa1f0000000540300"


def _pkey_journal(host: HostRoot, sm: dict[str, object]) -> None:
    import json

    forge_journal(host, 43, [{"kind": "ib_pkey", "target": GUID, "value": json.dumps(
        {"pkey": 16, "membership": "full", "vm": 43, "sm": sm})}], network=True)
    attacker_writes(host.state_dir / "vnm" / "opensm-partitions.json", json.dumps({"0x0010": {GUID: "full"}}))


def _ib_pkey_runs_the_journals_reload(host: HostRoot, open_tmp: Path) -> str:
    _pkey_journal(host, {"opensm_reload": shell_proof(open_tmp), "partitions_file": str(open_tmp / "log" / "p")})
    return f'[plugin.infiniband]\npartitions_file = "{open_tmp}/log/partitions.conf"\n' \
           f'opensm_reload = ["{sys.executable}", "-c", "{RECORDER}", "{open_tmp}/log/reload"]\n'


def _ib_pkey_writes_where_the_journal_says(host: HostRoot, open_tmp: Path) -> str:
    _pkey_journal(host, {"opensm_reload": [], "partitions_file": str(open_tmp / "log" / PROOF)})
    return ""


CLI_JOURNAL_ATTACKS = [
    pytest.param(_ovs_port_runs_the_journals_vsctl, id="ovs-port-vsctl-from-the-journal"),
    pytest.param(_ovs_vxlan_port_runs_the_journals_vsctl, id="ovs-vxlan-port-vsctl-from-the-journal"),
    pytest.param(_ib_pkey_runs_the_journals_reload, id="opensm-reload-from-the-journal"),
    pytest.param(_ib_pkey_writes_where_the_journal_says, id="partitions-file-from-the-journal"),
]


@attack
@pytest.mark.parametrize("forge", CLI_JOURNAL_ATTACKS)
def test_boot_repair_runs_no_command_and_writes_no_path_a_journal_names(
        boot: HostRoot, open_tmp: Path, forge: Callable[[HostRoot, Path], str]) -> None:
    config = forge(boot, open_tmp)
    result = repair_at_boot(boot, open_tmp, config)
    assert not (open_tmp / "log" / PROOF).exists(), result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("rolled back: none\n"), result.stdout + result.stderr  # the repair ran
    reload_log = open_tmp / "log" / "reload"
    if config:  # the configured reload ran, with the state dir owner's rights only
        assert reload_log.exists(), result.stdout + result.stderr
        assert reload_log.read_text().split()[0] == str(ATTACKER), result.stderr


def _unbind_the_uplink(host: HostRoot) -> None:
    ipv4_default_route(host)
    forge_journal(host, 44, [{"kind": "pci_driver", "target": NIC, "value": "vfio-pci", "undo_value": ""}])


def _take_an_idle_gpu(host: HostRoot) -> None:
    forge_journal(host, 45, [{"kind": "pci_driver", "target": GPU, "value": "nvidia", "undo_value": "vfio-pci"}])


def _force_a_foreign_driver(host: HostRoot) -> None:
    """A GPU the administrator keeps on vfio-pci (driverctl), and pci-stub loaded: the journal asks
    root to force pci-stub onto it."""
    device = Path(os.path.realpath(host.pci_devices / GPU))
    (device / "driver").unlink()
    (host.pci_drivers / "pci-stub").mkdir()
    (device / "driver").symlink_to(os.path.relpath(host.pci_drivers / "vfio-pci", device))
    (device / "driver_override").write_text("vfio-pci\n")
    forge_journal(host, 46, [{"kind": "pci_driver", "target": GPU, "value": "vfio-pci", "undo_value": "pci-stub"}])


PCI_JOURNAL_ATTACKS = [
    pytest.param(_unbind_the_uplink, id="journal-unbinds-the-uplink-nic"),
    pytest.param(_take_an_idle_gpu, id="journal-takes-an-idle-gpu-for-vfio"),
    pytest.param(_force_a_foreign_driver, id="journal-forces-a-driver-the-device-does-not-match"),
]


@attack
@pytest.mark.parametrize("forge", PCI_JOURNAL_ATTACKS)
def test_boot_repair_moves_no_device_a_forged_journal_names(boot: HostRoot, open_tmp: Path,
                                                            forge: Callable[[HostRoot], None]) -> None:
    forge(boot)
    before = snapshot(boot.root)
    result = repair_at_boot(boot, open_tmp)
    assert snapshot(boot.root) == before, result.stdout + result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("rolled back: none\n"), result.stdout + result.stderr


@attack
def test_boot_repair_sends_no_root_file_to_a_subnet_manager_a_journal_names(boot: HostRoot,
                                                                           open_tmp: Path) -> None:
    """The journal's ``sm`` named UFM at an address of the attacker's and a root-only file as the
    token: root read the file and sent it in the Authorization header."""
    import http.server
    import threading

    secret = open_tmp / "root-only-token"
    secret.write_text("root-secret-token\n")
    secret.chmod(0o600)
    seen: list[str] = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_DELETE(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(f"{self.path} {self.headers.get('Authorization', '')}")
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _pkey_journal(boot, {"subnet_manager": "ufm", "ufm_url": f"http://127.0.0.1:{server.server_port}/ufmRest",
                             "ufm_token_file": str(secret)})
        result = repair_at_boot(boot, open_tmp, f'[plugin.infiniband]\npartitions_file = "{open_tmp}/log/p.conf"\n')
    finally:
        server.shutdown()
    assert not any("root-secret-token" in line for line in seen), seen
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "rolled back: none\nreleased: 43\n", result.stdout + result.stderr
