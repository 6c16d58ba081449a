"""The rule of what the host uses (aifactory_core.host.hostuse): the kernel records it is read from.
The attacks it stops are in ``test_attacks_root.py``."""

from __future__ import annotations

from pathlib import Path

from aifactory_core.host import blockuse, netuse
from aifactory_core.hostroot import HostRoot


def test_ipv4_addresses_come_from_the_live_kernel_over_netlink() -> None:
    """No procfs file maps IPv4 addresses to interfaces: the live machine's come over netlink."""
    live = netuse.interface_addresses(HostRoot(Path("/")))
    assert "127.0.0.1" in live.get("lo", [])


def test_a_host_root_that_is_not_live_has_only_its_own_addresses(tmp_path: Path) -> None:
    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/net/if_inet6").write_text("fe800000000000000000000000000001 02 40 20 80 eth0\n"
                                                "fd000000000000000000000000000002 02 40 00 80 eth0\n")
    assert netuse.interface_addresses(HostRoot(tmp_path)) == {"eth0": ["fd00::2"]}  # link-local left out


def test_mount_points_and_sources_are_unescaped(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "30 1 0:45 / /srv/my\\040data rw - btrfs /dev/nvme0n1p4 rw\n")
    mounts = blockuse.Mounts.read(HostRoot(tmp_path))
    assert mounts.by_number == {"0:45": "/srv/my data"}  # btrfs: an anonymous device number
    assert mounts.by_source == {"/dev/nvme0n1p4": "/srv/my data"}
