"""The root helper, called by the real ``oneadmin`` through the real ``sudo`` and the suite's
sudoers snippet (:mod:`sudoharness`), refusing the test host's own devices on a real kernel: the
virtio-9p function that serves the guest's root filesystem, a function listed in ``[host]
host_devices``, and the NIC that carries the guest's address. Nothing stands between the helper
and the kernel here (no guard files): the device is checked untouched afterwards (driver link,
``driver_override``, the netdev and its address, the root still readable)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sudoharness import SudoStage, driver_link
from testhost.guest import PCI, driver_of

from aifactory_core.host.pcipath import pci_function_of

pytestmark = [pytest.mark.realkernel, pytest.mark.root_attack]
ADDRESS = "192.0.2.77"
VERBS = [["set-driver", "{}", "vfio-pci"], ["set-driver", "{}", "none"], ["reset", "{}"]]


def root_share_function() -> str:
    """The PCI function of the virtio-9p device whose share (``hostroot``) is the guest's ``/``."""
    for device in Path("/sys/bus/virtio/devices").iterdir():
        tag = device / "mount_tag"
        if tag.exists() and tag.read_text().strip("\0\n ") == "hostroot":
            address = pci_function_of(device)
            assert address is not None
            return address
    raise AssertionError("no virtio-9p device with mount_tag hostroot in the test host")


def netdev_of(address: str) -> str:
    names = os.listdir(PCI / address / "net")
    assert names, f"{address} has no netdev"
    return names[0]


@pytest.fixture
def stage() -> Iterator[SudoStage]:
    top = Path(tempfile.mkdtemp(prefix="aif-sudo-"))
    top.chmod(0o755)
    yield SudoStage(top / "stage")


@pytest.fixture
def addressed(e1000e_bdf: str) -> Iterator[str]:
    """The e1000e's netdev carrying ``ADDRESS`` (the guest's address on that NIC)."""
    name = netdev_of(e1000e_bdf)
    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/24", "dev", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/24", "dev", name], check=False, timeout=30)


def state_of(address: str) -> tuple[str | None, str, str | None]:
    override = (PCI / address / "driver_override").read_text()
    return driver_link(address), override, driver_of(address)


def refused(stage: SudoStage, verb: list[str], address: str, why: str) -> None:
    before = state_of(address)
    outcome = stage.run([word.format(address) for word in verb])
    assert outcome.status != 0 and len(outcome.stderr.splitlines()) == 1, outcome
    assert outcome.stderr.startswith(f"aifactory-root-helper: refusing {address}: the host uses it ("), outcome
    assert why in outcome.stderr, outcome
    assert state_of(address) == before


@pytest.mark.parametrize("verb", VERBS, ids=["to-vfio", "unbind", "reset"])
def test_helper_refuses_the_root_filesystems_device(stage: SudoStage, verb: list[str]) -> None:
    address = root_share_function()
    refused(stage, verb, address, "its 9p share hostroot is mounted on /")
    assert os.listdir("/usr")  # the root is still there


@pytest.mark.parametrize("verb", VERBS, ids=["to-vfio", "unbind", "reset"])
def test_helper_refuses_a_function_in_host_devices(stage: SudoStage, e1000e_bdf: str, verb: list[str]) -> None:
    stage.write_config(f'[host]\nhost_devices = ["{e1000e_bdf}"]\n')
    name = netdev_of(e1000e_bdf)
    refused(stage, verb, e1000e_bdf, "listed in [host] host_devices")
    assert netdev_of(e1000e_bdf) == name


@pytest.mark.parametrize("verb", VERBS, ids=["to-vfio", "unbind", "reset"])
def test_helper_refuses_the_nic_carrying_the_guests_address(stage: SudoStage, e1000e_bdf: str, addressed: str,
                                                            verb: list[str]) -> None:
    refused(stage, verb, e1000e_bdf, f"{addressed} carries {ADDRESS}")
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", addressed], capture_output=True, text=True,
                           check=True, timeout=30).stdout
    assert f"inet {ADDRESS}/24" in shown
