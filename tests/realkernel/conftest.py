"""Fixtures for the tests that run inside the test host (``AIFACTORY_IN_TESTHOST=1``).

On the host these never run: the testhost plugin sends realkernel items to the guest.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from testhost import ENV_NETDEVSIM
from testhost.guest import PCI, Virsh, bind, driver_of, find_pci, modprobe, read, sh, wait_for, write

E1000E = ("0x8086", "0x10d3")


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh state directory (journals, ownership, reset records), no config file, vfio-pci loaded."""
    directory = Path(tempfile.mkdtemp(prefix="aif-state-"))
    monkeypatch.setenv("AIFACTORY_STATE_DIR", str(directory))
    monkeypatch.setenv("AIFACTORY_CONFIG", os.devnull)
    modprobe("vfio-pci")
    yield directory


@pytest.fixture(scope="session")
def e1000e_bdf() -> str:
    found = find_pci(*E1000E)
    assert found, "no e1000e (8086:10d3) in the test host"
    return found[0]


@pytest.fixture
def e1000e_on_vfio(e1000e_bdf: str) -> Iterator[str]:
    """The e1000e pre-bound to vfio-pci; given back to e1000e afterwards."""
    bind(e1000e_bdf, "vfio-pci")
    try:
        yield e1000e_bdf
    finally:
        bind(e1000e_bdf, None)
        wait_for(lambda: driver_of(e1000e_bdf) == "e1000e", "e1000e to rebind")


@pytest.fixture(scope="session")
def nvme_pf() -> str:
    """The SR-IOV capable NVMe controller (class 0x0108xx with sriov_totalvfs)."""
    found = [b for b in find_pci("0x1b36", class_prefix="0x0108") if (PCI / b / "sriov_totalvfs").exists()]
    assert found, "no SR-IOV NVMe in the test host"
    modprobe("nvme")
    wait_for(lambda: driver_of(found[0]) == "nvme", f"{found[0]} to bind to nvme")
    return found[0]


@pytest.fixture
def netdevsim_pf() -> Iterator[int]:
    """A fresh netdevsim device with 4 VFs; yields the PF's ifindex (names may be renamed)."""
    if not Path("/sys/bus/netdevsim").exists():
        modprobe("psample")
        sh("insmod", os.environ[ENV_NETDEVSIM])
    dev_id = 40 + os.getpid() % 1000
    write("/sys/bus/netdevsim/new_device", f"{dev_id} 1")
    dev = Path(f"/sys/bus/netdevsim/devices/netdevsim{dev_id}")
    try:
        net = wait_for(lambda: (dev / "net").exists() and sorted((dev / "net").iterdir()), "netdevsim netdev")
        write(dev / "sriov_numvfs", "4")
        yield int(read(net[0] / "ifindex"))
    finally:
        write("/sys/bus/netdevsim/del_device", str(dev_id))


def _libvirtd_answers() -> bool:
    try:
        Virsh()("version", timeout=30)
    except AssertionError:
        return False
    return True


@pytest.fixture(scope="session")
def libvirt_conn() -> Virsh:
    """Real libvirtd in the guest (started early by the guest init when any test uses this)."""
    modprobe("vfio-pci")  # before libvirtd, or VFIO assignment is "not supported on this system"
    if not Path("/run/libvirt/libvirt-sock").exists() and not Path("/run/libvirtd.pid").exists():
        sh("/usr/sbin/virtlogd", "-d")
        sh("/usr/sbin/libvirtd", "-d")
    start = time.monotonic()
    wait_for(_libvirtd_answers, "libvirtd to answer on qemu:///system", timeout=180)
    print(f"libvirtd answered after {time.monotonic() - start:.1f}s")
    return Virsh()


@pytest.fixture(scope="session")
def libvirt_uri(libvirt_conn: Virsh) -> str:
    """The URI of the guest's running libvirtd (``qemu:///system``), for libvirt-python or virsh -c."""
    return libvirt_conn.uri
